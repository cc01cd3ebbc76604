"""The cells ``LSTMCell``, ``GRUCell``, ``RNNCell``, with their recurrent dropout and
zoneout.

One time step per call: decoders step them in loops, so this path is kept short.
"""

import numpy as np
import torch
from torch import nn

from ..modules.options import _check_probability, _check_zoneout
from ._backend import (_as_class, _backend, _in_torch_only_context,
                       _unsupported_reason, _warn_once, _weight_arrays)
from .autograd import _CellFunction, _cell_step, _weight_gradient_sums_for
from .layers import _regularizer_masks


class _FastCellMixin:
    """The forward shared by the three cell classes; the rest is torch's nn.RNNCellBase.

    Well-formed calls go to the kernels; anything else goes to torch's forward, which
    computes or raises exactly what torch does.
    """

    _lstmfast_backend = "fused"
    _lstmfast_frozen = False  # freeze: weight_ih and weight_hh packed once (swap.py)
    zoneout = (0.0, 0.0)  # set by the constructors (docs/cells.md, Recurrent dropout and zoneout)
    recurrent_dropout = 0.0
    _recurrent_dropout_mask = None  # kept for the steps of a sequence (Keras's convention)

    def __init__(self, *args, zoneout=0.0, recurrent_dropout=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.zoneout = _check_zoneout(zoneout, "LSTM" if isinstance(self, nn.LSTMCell) else "GRU")
        self.recurrent_dropout = _check_probability("recurrent_dropout", recurrent_dropout,
                                                    upper_open=True)

    def _lstmfast_packs(self):
        """Whether the kernels read weight_ih and weight_hh packed (see the layers')."""
        return self._lstmfast_backend == "fused"

    def reset_recurrent_dropout_mask(self):
        """Start a new sequence: the next training step draws a new recurrent dropout mask
        (from torch's generator), which the steps after it keep, as Keras's cells do."""
        self._recurrent_dropout_mask = None

    def forward(self, input, hx=None, **masks):  # noqa: A002  (torch's name)
        """torch's forward; ``zoneout_mask=`` and ``recurrent_dropout_mask=`` (keywords), as
        the layers' (``**masks`` for torch's legacy ONNX exporter: layers.py)."""
        recurrent_dropout_mask, zoneout_mask = _regularizer_masks(type(self).__name__, masks)
        mask = _cell_recurrent_dropout_mask(self, input, recurrent_dropout_mask)
        if mask is not None:
            result = _masked_cell_step(self, input, hx, mask)
        elif torch.compiler.is_exporting():
            result = self._lstmfast_torch_class.forward(self, input, hx)
        else:
            result = _fused_cell_forward(self, input, hx)
        if zoneout_mask is None and not any(self.zoneout):
            return result
        return _zoneout_cell_step(self, input, hx, result, zoneout_mask)

    def extra_repr(self):
        s = super().extra_repr()
        s += f", zoneout={self.zoneout}" if any(self.zoneout) else ""
        return s + (f", recurrent_dropout={self.recurrent_dropout}" if self.recurrent_dropout else "")

    def __prepare_scriptable__(self):
        """``torch.jit.script`` compiles torch's class on the same parameters."""
        if any(self.zoneout) or self.recurrent_dropout:
            raise TypeError(f"{type(self).__name__} with zoneout or recurrent dropout cannot be "
                            "scripted: torch's cell has neither; use torch.jit.trace")
        return _as_class(self, self._lstmfast_torch_class)


def _cell_recurrent_dropout_mask(cell, input, given):
    """A cell step's recurrent dropout mask: given (training only), the sequence's kept
    mask (drawn at its first training step), or None."""
    if given is None and not (cell.recurrent_dropout and cell.training):
        return None
    shape = input.shape[:-1] + (cell.hidden_size,)
    if not cell.training:
        raise ValueError("recurrent_dropout_mask: given in eval mode, where there is no mask")
    if given is not None:
        if not isinstance(given, torch.Tensor) or given.shape != shape:
            got = tuple(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__
            raise ValueError(f"recurrent_dropout_mask: expected a tensor of shape {tuple(shape)}, "
                             f"got {got}")
        return given.detach()
    kept = cell._recurrent_dropout_mask
    if kept is None or kept.shape != shape or kept.dtype != input.dtype:
        keep = 1.0 - cell.recurrent_dropout
        kept = cell._recurrent_dropout_mask = input.new_full(shape, keep).bernoulli() / keep
    return kept


def _masked_cell_step(cell, input, hx, mask):
    """One step with h times the recurrent dropout mask where it enters the recurrent
    product: the LSTM and RNN cells read h nowhere else, so their (fused) step on h * M
    is exact; the GRU also reads h in z * h, unmasked, so its step is written in torch ops."""
    is_lstm = isinstance(cell, nn.LSTMCell)
    h = (hx[0] if is_lstm else hx) if hx is not None else input.new_zeros(mask.shape)
    if is_lstm:
        c = hx[1] if hx is not None else input.new_zeros(mask.shape)
        return _fused_cell_forward(cell, input, (h * mask, c))
    if not isinstance(cell, nn.GRUCell):
        return _fused_cell_forward(cell, input, h * mask)
    gi = input @ cell.weight_ih.T
    gh = (h * mask) @ cell.weight_hh.T
    if cell.bias:
        gi, gh = gi + cell.bias_ih, gh + cell.bias_hh
    i_r, i_z, i_n = gi.chunk(3, -1)
    h_r, h_z, h_n = gh.chunk(3, -1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def _zoneout_cell_step(cell, input, hx, result, given):
    """Zoneout of one cell step (docs/cells.md, Recurrent dropout and zoneout, ESPnet's ZoneOutCell: the convention of
    Tacotron 2's decoders): each unit keeps its old value with a mask drawn each call
    in training (1 keeps it), or given as ``zoneout_mask=(m_h, m_c)`` (training only),
    and with the probability's weight in eval: new = m old + (1 - m) new. Torch ops on
    the cell's result, so autograd takes the identity path too."""
    is_lstm = isinstance(cell, nn.LSTMCell)
    new = tuple(result) if is_lstm else (result,)
    if hx is None:
        old = tuple(torch.zeros_like(n) for n in new)
    else:
        old = tuple(hx) if is_lstm else (hx,)
    if given is not None:
        if not cell.training:
            raise ValueError("zoneout_mask: given in eval mode, where there is no mask")
        if not isinstance(given, (tuple, list)) or len(given) != 2:
            raise ValueError("zoneout_mask: expected a pair (m_h, m_c), m_c None without c")
        masks = tuple(given[:len(new)])
        for name, m, n in zip(("zoneout_mask[0]", "zoneout_mask[1]"), masks, new):
            if m is not None and (not isinstance(m, torch.Tensor) or m.shape != n.shape):
                got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
                raise ValueError(f"{name}: expected a tensor of shape {tuple(n.shape)}, got {got}")
    elif cell.training:
        masks = tuple(torch.empty_like(n).bernoulli_(p) if p else None
                      for p, n in zip(cell.zoneout, new))
    else:
        masks = tuple(p or None for p in cell.zoneout[:len(new)])
    zoned = tuple(n if m is None else m * o + (1 - m) * n for m, o, n in zip(masks, old, new))
    return zoned if is_lstm else zoned[0]


_CELL_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _cell_weights(cell):
    """The cell's four parameters (a bias None without bias). Read from the parameter
    registry where they are there (module attribute lookup costs about 0.6 us each);
    through the attribute where a parametrization or a weight-norm hook serves them."""
    params = cell._parameters
    return tuple(params[name] if name in params else getattr(cell, name)
                 for name in _CELL_WEIGHTS)


def _plain_cell_forward(self, input, hx, weights):
    """A cell's step at inference in few steps (the call a decoder makes per token
    under no_grad): a 2-D tensor, the state(s) whole or None, nothing to
    differentiate, on the fused kernels. Returns None, for the full path to take the
    call, unless every condition holds; the full path would then pass the kernels the
    same arrays."""
    # Cheapest first, and each state checked on its own (no loop, no generator): a
    # decoder pays this at every step, where its kernels take 3 us (LSTM H=32).
    if type(input) is not torch.Tensor or input.dim() != 2:
        return None
    dtype = input.dtype
    N, I = input.shape
    H = self.hidden_size
    if (dtype not in _NUMPY_DTYPES or not input.is_cpu or I != self.input_size or not N
            or not H or self._lstmfast_backend != "fused" or _in_torch_only_context()):
        return None
    grad = torch.is_grad_enabled()
    if grad and input.requires_grad:
        return None
    for w in weights:
        if w is not None and (w.dtype is not dtype or not w.is_cpu or (grad and w.requires_grad)):
            return None
    mode = self._lstmfast_mode
    is_lstm = mode == "LSTM"
    if hx is None:
        h0 = np.zeros((1, N, H), dtype=_NUMPY_DTYPES[dtype])
        c0 = np.zeros_like(h0) if is_lstm else None
    else:
        if is_lstm:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                return None
            h, c = hx
        else:
            h, c = hx, None
        if (type(h) is not torch.Tensor or h.dtype is not dtype or not h.is_cpu
                or h.shape != (N, H) or (grad and h.requires_grad)):
            return None
        if c is not None and (type(c) is not torch.Tensor or c.dtype is not dtype or not c.is_cpu
                              or c.shape != (N, H) or (grad and c.requires_grad)):
            return None
        h0, c0 = h.numpy()[None], None if c is None else c.numpy()[None]
    _, h_n, c_n, _ = _backend("fused")._core.cell_step(
        mode, input.numpy()[None], h0, c0, *_weight_arrays(self, weights, _CELL_WEIGHTS), False)
    if is_lstm:
        return torch.from_numpy(h_n[0]), torch.from_numpy(c_n[0])
    return torch.from_numpy(h_n[0])


@torch.compiler.disable  # as layers._fused_layer_forward, which says why
def _fused_cell_forward(self, input, hx):
    # Decoders call this once per step: every check here is paid per step, so the
    # path is kept short (LSTM H=32: about 12 us a call over the kernels' 5 us).
    weights = _cell_weights(self)
    result = _plain_cell_forward(self, input, hx, weights)
    if result is not None:
        return result
    mode = self._lstmfast_mode
    is_lstm = mode == "LSTM"
    if hx is None:
        states = ()
    else:
        states = tuple(hx) if is_lstm and isinstance(hx, (tuple, list)) else (hx,)
    dim = input.dim() if isinstance(input, torch.Tensor) else 0
    if (dim not in (1, 2) or _in_torch_only_context() or input.shape[-1] != self.input_size
            or len(states) not in (0, 2 if is_lstm else 1) or input.numel() == 0
            or self.hidden_size == 0):  # torch's empty results
        return self._lstmfast_torch_class.forward(self, input, hx)
    state_shape = input.shape[:-1] + (self.hidden_size,)
    for state in states:
        if not isinstance(state, torch.Tensor) or state.shape != state_shape:
            return self._lstmfast_torch_class.forward(self, input, hx)  # torch's error
    reason = _unsupported_reason(input, states + weights)
    if reason is not None:
        if reason:
            _warn_once((type(self).__name__, reason),
                       f"lstmfast.torch.{type(self).__name__}: {reason} is not supported by the "
                       "fused kernels; using torch's implementation")
        return self._lstmfast_torch_class.forward(self, input, hx)

    x = input if dim == 2 else input.unsqueeze(0)
    if states:
        if dim == 1:
            states = tuple(s.unsqueeze(0) for s in states)
    else:
        zeros = torch.zeros(x.shape[0], self.hidden_size, dtype=x.dtype)
        states = (zeros, zeros) if is_lstm else (zeros,)
    h0, c0 = states if is_lstm else (states[0], None)
    backend = _backend(self._lstmfast_backend)
    if torch.is_grad_enabled() and (
            x.requires_grad or h0.requires_grad or (c0 is not None and c0.requires_grad)
            or any(w is not None and w.requires_grad for w in weights)):
        # the weights' arrays made once, not at every step (_weight_arrays): a training
        # loop steps the cell as often as inference does
        arrays = _weight_arrays(self, weights, _CELL_WEIGHTS)
        # the steps' weight gradients made once per backward pass (autograd.py)
        sums = _weight_gradient_sums_for(self, backend, weights)
        result = _CellFunction.apply(backend, mode, arrays, sums,
                                     None if sums is None else sums.token, x, h0, c0, *weights)
    else:  # nothing to differentiate: the kernels alone, no autograd node
        h1, c1, _ = _cell_step(backend, mode, False, x, h0, c0, weights,
                               _weight_arrays(self, weights, _CELL_WEIGHTS))
        result = (h1, c1) if is_lstm else h1
    if dim == 1:
        return (result[0].squeeze(0), result[1].squeeze(0)) if is_lstm else result.squeeze(0)
    return result


class LSTMCell(_FastCellMixin, nn.LSTMCell):
    """``torch.nn.LSTMCell`` computed by lstmfast's fused kernels."""

    _lstmfast_torch_class = nn.LSTMCell
    _lstmfast_mode = "LSTM"


class GRUCell(_FastCellMixin, nn.GRUCell):
    """``torch.nn.GRUCell`` computed by lstmfast's fused kernels."""

    _lstmfast_torch_class = nn.GRUCell
    _lstmfast_mode = "GRU"


class RNNCell(_FastCellMixin, nn.RNNCell):
    """``torch.nn.RNNCell`` computed by lstmfast's fused kernels."""

    _lstmfast_torch_class = nn.RNNCell

    @property
    def _lstmfast_mode(self):
        return "RNN_RELU" if self.nonlinearity == "relu" else "RNN_TANH"
