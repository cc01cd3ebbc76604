"""What turns a user's call into the backend's arrays, and the backend's results back.

The backends take one layout only: time-major and batched, ``x (T, N, I)``, states
``(L*D, N, H)``, C-contiguous, of the layer's dtype. The caller may give batch-first
or unbatched input, torch tensors, or no state at all. Here each argument of a call
(x, hx, lengths, the upstream gradients of backward, a given per-layer array such as
a zoneout mask or a CTRNN's noise) is checked, with its name in the message, and
converted; ``_from_time_major`` turns results back into the caller's layout.

Nothing is cast: an array of another dtype than the layer's is a TypeError. Functions
that need a layer's sizes take the layer (``layer.num_layers``, ``_num_directions``,
``_out_size``, ``hidden_size``, ``batch_first``, ``dtype``, ``_mode``) and read nothing
else of it.
"""

import numpy as np

from .options import _CELL_STATE_MODES


def _to_numpy(value):
    """np.asarray, also for torch tensors (without importing torch)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
    return np.asarray(value)


def _shape_str(shape):
    return str(tuple(int(s) for s in shape))


def _as_input(name, value, dtype):
    """``value`` as an array of exactly ``dtype`` (the layer's), else TypeError."""
    if type(value) is np.ndarray and value.dtype == dtype:
        return value
    try:
        array = _to_numpy(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name}: cannot convert to an array ({exc})") from None
    if array.dtype != dtype:
        raise TypeError(
            f"{name} must have dtype {dtype} (the layer's dtype), got {array.dtype}; "
            f"convert it explicitly, e.g. {name}.astype(np.{dtype})")
    return array


def _check_shape(name, array, expected):
    if array.shape != tuple(expected):
        raise ValueError(
            f"{name}: expected shape {_shape_str(expected)}, got {_shape_str(array.shape)}")


# ----------------------------------------------------------------------------------
# layouts


def _caller_lead(T, N, batched, batch_first):
    """The leading dimensions of one direction's output in the caller's layout."""
    return ((N, T) if batch_first else (T, N)) if batched else (T,)


def _from_time_major(a, batched, batch_first):
    if not batched:
        return a[:, 0]
    if batch_first:
        return np.ascontiguousarray(a.transpose(1, 0, 2))
    return a


def _to_time_major(a, batched, batch_first):
    if not batched:
        return np.ascontiguousarray(a[:, None, :])
    if batch_first:
        return np.ascontiguousarray(a.transpose(1, 0, 2))
    return np.ascontiguousarray(a)


def _to_time_major_state(a, batched):
    return np.ascontiguousarray(a if batched else a[:, None, :])


def _per_layer_to_time_major(a, batched, batch_first):
    """An array ``(L*D,) + caller's lead + (W,)``, already checked, as the backend takes
    one array per layer and direction: ``(L*D, T, N, W)``, contiguous."""
    if not batched:
        a = a[:, :, None, :]
    elif batch_first:
        a = a.transpose(0, 2, 1, 3)
    return np.ascontiguousarray(a)


# ----------------------------------------------------------------------------------
# a layer's call: x, hx, lengths, and backward's upstream gradients


def _checked_x(x, input_size, dtype, batched_ndim):
    """``(x, batched)``: x as an array of ``dtype``, with ``batched_ndim`` dimensions
    (batched) or one fewer (unbatched), and ``input_size`` features in the last; a layer's
    x is batched at 3-D, a cell's at 2-D."""
    x = _as_input("x", x, dtype)
    if x.ndim not in (batched_ndim - 1, batched_ndim):
        raise ValueError(
            f"x: expected a {batched_ndim}-D (batched) or {batched_ndim - 1}-D (unbatched) "
            f"array, got {x.ndim}-D with shape {_shape_str(x.shape)}")
    if x.shape[-1] != input_size:
        raise ValueError(
            f"x: expected input_size={input_size} features in the last dimension, "
            f"got {x.shape[-1]} (shape {_shape_str(x.shape)})")
    return x, x.ndim == batched_ndim


def _prepare_input(x, input_size, batch_first, dtype):
    """``(x_tm, batched)``: x checked, time-major batched and contiguous."""
    x, batched = _checked_x(x, input_size, dtype, batched_ndim=3)
    if not batched:
        x_tm = x[:, None, :]
    elif batch_first:
        x_tm = x.transpose(1, 0, 2)
    else:
        x_tm = x
    if x_tm.shape[0] == 0:
        raise ValueError(
            f"x: empty sequence (sequence length 0, shape {_shape_str(x.shape)}); "
            f"it must be >= 1 (an empty batch is fine)")
    return np.ascontiguousarray(x_tm), batched


def _state_shapes(layer, N, batched):
    """Expected (h, c) shapes in the caller's layout."""
    LD = layer.num_layers * layer._num_directions
    lead = (LD, N) if batched else (LD,)
    return lead + (layer._out_size,), lead + (layer.hidden_size,)


def _prepare_hx(layer, hx, N, batched):
    """(h0, c0) time-major batched, zeros when hx is None; c0 is None unless LSTM."""
    LD = layer.num_layers * layer._num_directions
    dtype = layer.dtype
    h_shape, c_shape = _state_shapes(layer, N, batched)
    kind = "batched 3-D" if batched else "unbatched 2-D"
    if hx is None:
        h0 = np.zeros((LD, N, layer._out_size), dtype=dtype)
        c0 = (np.zeros((LD, N, layer.hidden_size), dtype=dtype)
              if layer._mode in _CELL_STATE_MODES else None)
        return h0, c0
    if layer._mode in _CELL_STATE_MODES:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise ValueError(
                f"hx: LSTM expects a pair (h0, c0), got {type(hx).__name__}"
                + (f" of length {len(hx)}" if isinstance(hx, (tuple, list)) else ""))
        h0 = _as_input("hx[0] (h0)", hx[0], dtype)
        c0 = _as_input("hx[1] (c0)", hx[1], dtype)
        _check_state("hx[0] (h0)", h0, h_shape, kind)
        _check_state("hx[1] (c0)", c0, c_shape, kind)
    else:
        if isinstance(hx, tuple):
            raise ValueError(
                f"hx: {type(layer).__name__} expects a single array h0, got a tuple "
                f"(a pair (h0, c0) is for LSTM)")
        h0 = _as_input("hx", hx, dtype)
        _check_state("hx", h0, h_shape, kind)
        c0 = None
    if not batched:
        h0 = h0[:, None, :]
        c0 = None if c0 is None else c0[:, None, :]
    return np.ascontiguousarray(h0), None if c0 is None else np.ascontiguousarray(c0)


def _check_state(name, array, expected, kind):
    if array.shape != expected:
        raise ValueError(
            f"{name}: for {kind} input expected shape {_shape_str(expected)} "
            f"(num_layers*num_directions, {'batch, ' if len(expected) == 3 else ''}size), "
            f"got {_shape_str(array.shape)}")


def _prepare_lengths(lengths, T, N):
    """``lengths`` as the backend takes them (int64, one per batch element, each in
    1..T), or None."""
    if lengths is None:
        return None
    try:
        array = _to_numpy(lengths)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"lengths: cannot convert to an array of ints ({exc})") from None
    if array.ndim != 1:
        raise ValueError(
            f"lengths: expected a 1-D sequence with one int per batch element, "
            f"got shape {_shape_str(array.shape)}")
    if array.dtype.kind not in "iu" and not (N == 0 and array.size == 0):
        raise TypeError(f"lengths: expected integers, got dtype {array.dtype}")  # a dtype: TypeError, as x's
    if array.shape[0] != N:
        raise ValueError(
            f"lengths: expected one length per batch element ({N}), got {array.shape[0]}")
    bad = np.flatnonzero((array < 1) | (array > T))
    if bad.size:
        raise ValueError(
            f"lengths: each length must be in 1..{T} (the sequence length), got "
            f"lengths[{bad[0]}] = {array[bad[0]]}")
    return np.ascontiguousarray(array, dtype=np.int64)


def _prepare_grads(layer, grad_output, grad_h_n, batched, T, N):
    """A layer's upstream gradients, checked, time-major batched: ``(d_output, d_h_n,
    d_c_n)``, d_h_n and d_c_n None where not given."""
    dtype = layer.dtype
    out_shape = _caller_lead(T, N, batched, layer.batch_first)
    out_shape += (layer._num_directions * layer._out_size,)
    d_output = _as_input("grad_output", grad_output, dtype)
    _check_shape("grad_output", d_output, out_shape)
    h_shape, c_shape = _state_shapes(layer, N, batched)
    d_h = d_c = None
    if layer._mode in _CELL_STATE_MODES:
        if grad_h_n is not None:
            if not isinstance(grad_h_n, (tuple, list)) or len(grad_h_n) != 2:
                raise ValueError(
                    "grad_h_n: LSTM expects None or a pair (grad_h_n, grad_c_n), "
                    f"got {type(grad_h_n).__name__}")
            d_h, d_c = grad_h_n
    else:
        if isinstance(grad_h_n, tuple):
            raise ValueError(
                f"grad_h_n: {type(layer).__name__} expects None or a single array, got a tuple")
        d_h = grad_h_n
    if d_h is not None:
        name = "grad_h_n[0]" if layer._mode in _CELL_STATE_MODES else "grad_h_n"
        d_h = _as_input(name, d_h, dtype)
        _check_shape(name, d_h, h_shape)
        d_h = _to_time_major_state(d_h, batched)
    if d_c is not None:
        d_c = _as_input("grad_h_n[1]", d_c, dtype)
        _check_shape("grad_h_n[1]", d_c, c_shape)
        d_c = _to_time_major_state(d_c, batched)
    return _to_time_major(d_output, batched, layer.batch_first), d_h, d_c


# ----------------------------------------------------------------------------------
# a cell's call: one step, T = 1 and one layer


def _prepare_cell_input(x, input_size, dtype):
    """``(x_b, batched, N)``: x checked, as the backend's ``(1, N, I)``, contiguous."""
    x, batched = _checked_x(x, input_size, dtype, batched_ndim=2)
    N = x.shape[0] if batched else 1
    return np.ascontiguousarray(x[None] if batched else x[None, None]), batched, N


def _prepare_cell_hx(cell, hx, N, batched):
    """The state as the backend takes it, ``(1, N, H)`` each, zeros when hx is None:
    a pair (h0, c0) for an LSTM cell, else h0."""
    H, dtype, lstm = cell.hidden_size, cell.dtype, cell._mode == "LSTM"
    state_shape = (N, H) if batched else (H,)
    states = []
    if hx is None:
        states = [np.zeros((1, N, H), dtype=dtype) for _ in range(2 if lstm else 1)]
    else:
        if lstm:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise ValueError(
                    f"hx: LSTMCell expects a pair (h0, c0), got {type(hx).__name__}"
                    + (f" of length {len(hx)}" if isinstance(hx, (tuple, list)) else ""))
            named = [("hx[0] (h0)", hx[0]), ("hx[1] (c0)", hx[1])]
        else:
            if isinstance(hx, tuple):
                raise ValueError(
                    f"hx: {type(cell).__name__} expects a single array h0, got a tuple "
                    f"(a pair (h0, c0) is for LSTMCell)")
            named = [("hx", hx)]
        for name, value in named:
            a = _as_input(name, value, dtype)
            if a.shape != state_shape:
                kind = "batched 2-D" if batched else "unbatched 1-D"
                raise ValueError(
                    f"{name}: for {kind} input expected shape {_shape_str(state_shape)}, "
                    f"got {_shape_str(a.shape)}")
            states.append(np.ascontiguousarray(a[None] if batched else a[None, None]))
    return tuple(states) if lstm else states[0]


def _prepare_cell_grads(cell, grad_h1, grad_c1, batched, N):
    """A cell's upstream gradients, checked, as the backend's ``(1, N, H)``: ``(d_h1,
    d_c1)``, d_c1 None where not given."""
    shape = (N, cell.hidden_size) if batched else (cell.hidden_size,)
    d_h1 = _as_input("grad_h1", grad_h1, cell.dtype)
    _check_shape("grad_h1", d_h1, shape)
    d_c1 = None
    if grad_c1 is not None:
        d_c1 = _as_input("grad_c1", grad_c1, cell.dtype)
        _check_shape("grad_c1", d_c1, shape)

    def to_backend(a):
        return np.ascontiguousarray((a if batched else a[None])[None])

    return to_backend(d_h1), None if d_c1 is None else to_backend(d_c1)
