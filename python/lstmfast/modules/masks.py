"""The random masks of training: dropout between layers, recurrent dropout, zoneout.

They are drawn here, from the layer's dropout stream (``layer._dropout_rng``, the
second child of ``SeedSequence(seed)``), not in the backend, so one seed gives the
same masks whatever the backend and the dtype; the order of the draws within a call
(dropout between layers, then recurrent dropout, then zoneout's seed) is part of what
a seed means. A mask the caller gives instead (``recurrent_dropout_mask=``,
``zoneout_mask=``) is checked and laid out here; in eval mode there is none.
"""

import numpy as np

from .inputs import _as_input, _caller_lead, _check_shape, _per_layer_to_time_major
from .options import _CELL_STATE_MODES


def _dropout_masks(rng, p, num_layers, shape, dtype):
    """One mask per gap between layers, values 0 or 1/(1-p), each drawn from ``rng`` as
    a float64 uniform array of ``shape`` (``p == 1``: all zeros)."""
    masks = []
    for _ in range(num_layers - 1):
        u = rng.random(shape)
        if p >= 1:
            masks.append(np.zeros(shape, dtype=dtype))
        else:
            masks.append(np.where(u >= p, 1.0 / (1.0 - p), 0.0).astype(dtype))
    return masks


def _regularizer_args(layer, T, N, batched, rec_mask, zone_mask):
    """A layer's recurrent_dropout_masks and zoneout_masks for the backend, for this
    call: given (training only), drawn from the dropout stream (training), zoneout's
    probabilities (eval), or nothing."""
    args = {}
    LD, H_out, H = layer.num_layers * layer._num_directions, layer._out_size, layer.hidden_size
    training = layer._trains
    for name, given in (("recurrent_dropout_mask", rec_mask), ("zoneout_mask", zone_mask)):
        if given is not None and not training:
            raise ValueError(f"{name}: given in eval mode, where there is no mask "
                             f"(call train() first)")
    if rec_mask is not None:
        mask = _as_input("recurrent_dropout_mask", rec_mask, layer.dtype)
        _check_shape("recurrent_dropout_mask", mask, (LD, N, H_out) if batched else (LD, H_out))
        args["recurrent_dropout_masks"] = np.ascontiguousarray(
            mask if batched else mask[:, None, :])
    elif training and layer.recurrent_dropout > 0:
        p = layer.recurrent_dropout
        keep = layer._dropout_rng.random((LD, N, H_out)) >= p
        args["recurrent_dropout_masks"] = (keep / (1.0 - p)).astype(layer.dtype)
    if zone_mask is not None:
        if not isinstance(zone_mask, (tuple, list)) or len(zone_mask) != 2:
            raise ValueError("zoneout_mask: expected a pair (m_h, m_c)")
        if zone_mask[1] is not None and layer._mode not in _CELL_STATE_MODES:
            raise ValueError("zoneout_mask: m_c must be None for a cell without a cell state")
        lead = _caller_lead(T, N, batched, layer.batch_first)
        masks = []
        for name, m, width in (("zoneout_mask[0]", zone_mask[0], H_out),
                               ("zoneout_mask[1]", zone_mask[1], H)):
            if m is None:
                masks.append(None)
                continue
            m = _as_input(name, m, layer.dtype)
            if m.shape == lead + (width,):  # one mask for every layer and direction
                m = np.broadcast_to(m, (LD,) + m.shape)
            _check_shape(name, m, (LD,) + lead + (width,))
            masks.append(_per_layer_to_time_major(m, batched, layer.batch_first))
        args["zoneout_masks"] = tuple(masks)
    elif any(layer.zoneout):
        # training: masks drawn inside the backend from a seed of the dropout stream
        # (reference.zoneout_masks_from_seed), nothing stored; eval: the expectation
        args["zoneout_masks"] = tuple(p or None for p in layer.zoneout)
        if training:
            args["zoneout_seed"] = int(layer._dropout_rng.integers(2**63))
    return args


def _cell_recurrent_dropout(cell, N, batched, given):
    """A cell's recurrent_dropout_masks for the backend, for one step: given (training
    only), the mask kept for the sequence in ``cell._recurrent_dropout_mask`` (drawn at
    its first step, or again when the batch size changes), or None."""
    if given is None and not (cell.recurrent_dropout and cell._trains):
        return None
    if not cell._trains:
        raise ValueError("recurrent_dropout_mask: given in eval mode, where there is no mask")
    H = cell.hidden_size
    if given is not None:
        mask = _as_input("recurrent_dropout_mask", given, cell.dtype)
        _check_shape("recurrent_dropout_mask", mask, (N, H) if batched else (H,))
        return np.ascontiguousarray(mask.reshape(1, N, H))
    kept = cell._recurrent_dropout_mask
    if kept is None or kept.shape != (1, N, H):
        p = cell.recurrent_dropout
        keep = cell._dropout_rng.random((1, N, H)) >= p
        kept = cell._recurrent_dropout_mask = (keep / (1.0 - p)).astype(cell.dtype)
    return kept


def _cell_zoneout(cell, N, batched, given):
    """A cell's zoneout_masks for the backend, for one step: given ``(m_h, m_c)`` of the
    state's shape (training only), drawn per call (training), the probabilities (eval),
    or None."""
    if given is None and not any(cell.zoneout):
        return None
    training = cell._trains
    H = cell.hidden_size
    if given is not None:
        if not training:
            raise ValueError("zoneout_mask: given in eval mode, where there is no mask")
        if not isinstance(given, (tuple, list)) or len(given) != 2:
            raise ValueError("zoneout_mask: expected a pair (m_h, m_c), m_c None without c")
        if given[1] is not None and cell._mode != "LSTM":
            raise ValueError("zoneout_mask: m_c must be None for a cell without a cell state")
        shape = (N, H) if batched else (H,)
        masks = []
        for name, m in (("zoneout_mask[0]", given[0]), ("zoneout_mask[1]", given[1])):
            if m is None:
                masks.append(None)
                continue
            m = _as_input(name, m, cell.dtype)
            _check_shape(name, m, shape)
            masks.append(np.ascontiguousarray(m.reshape(1, 1, N, H)))
        return tuple(masks)
    if training:
        return tuple(None if not p else (cell._dropout_rng.random((1, 1, N, H))
                                         < p).astype(cell.dtype) for p in cell.zoneout)
    return tuple(p or None for p in cell.zoneout)
