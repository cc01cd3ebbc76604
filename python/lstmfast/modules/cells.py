"""The one-step cells of torch.nn: ``LSTMCell``, ``GRUCell``, ``RNNCell``, and their
``backward``.

A cell is one time step of one layer: the backend's layer call with T = 1 and
num_layers = 1, its parameters named as torch's cells name them (``weight_ih``, not
``weight_ih_l0``). Without zoneout or recurrent dropout the fused backend's lean
``cell_forward`` runs instead of the layer call: a cell's calls are short, so the
layer call's generic wrapper would be a good part of their time. A cell's recurrent
dropout mask is kept from a sequence's first step until
``reset_recurrent_dropout_mask()``, as Keras's cells do.
"""

import importlib

from .base import _Module
from .inputs import _prepare_cell_grads, _prepare_cell_hx, _prepare_cell_input
from .masks import _cell_recurrent_dropout, _cell_zoneout
from .options import (_NONLINEARITIES, _PACKAGE, _check_flag, _check_probability, _check_size,
                      _check_sizes, _check_zoneout)

_CELL_TO_BACKEND = {"weight_ih": "weight_ih_l0", "weight_hh": "weight_hh_l0",
                    "bias_ih": "bias_ih_l0", "bias_hh": "bias_hh_l0"}


class _CellBase(_Module):
    """One time step of one layer: the backend with T = 1, num_layers = 1."""

    zoneout = (0.0, 0.0)
    recurrent_dropout = 0.0
    _recurrent_dropout_mask = None  # kept for the steps of a sequence (Keras's convention)

    def __init__(self, mode, input_size, hidden_size, bias, dtype, backend, seed, zoneout=0.0,
                 recurrent_dropout=0.0):
        self._mode = mode
        self.zoneout = _check_zoneout(zoneout, mode)
        self.recurrent_dropout = _check_probability("recurrent_dropout", recurrent_dropout,
                                                    upper_open=True)
        self.input_size = _check_size("input_size", input_size)
        self.hidden_size = _check_size("hidden_size", hidden_size)
        self.bias = _check_flag("bias", bias)
        self._setup(dtype, backend, seed)
        _check_sizes(type(self).__name__, mode, self.input_size, self.hidden_size, 1, False, 0,
                     self.dtype, self.backend)
        reference = importlib.import_module(_PACKAGE + ".reference")
        params = reference.init_params(mode, self.input_size, self.hidden_size, 1, self.bias,
                                       False, 0, self.dtype, self._init_rng)
        backend_to_cell = {v: k for k, v in _CELL_TO_BACKEND.items()}
        self._set_params({backend_to_cell[k]: v for k, v in params.items()})

    def _param_names(self):
        return ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias else [])

    def _backend_params(self, values):
        return {_CELL_TO_BACKEND[n]: v for n, v in values.items()}

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if any(self.zoneout):
            s += f", zoneout={self.zoneout}"
        if self.recurrent_dropout:
            s += f", recurrent_dropout={self.recurrent_dropout}"
        return s + self._extra_repr_tail()

    def reset_recurrent_dropout_mask(self):
        """Start a new sequence: the next training step draws a new recurrent dropout mask,
        which the steps after it keep (as Keras's cells do)."""
        self._recurrent_dropout_mask = None

    def forward(self, x, hx=None, *, zoneout_mask=None, recurrent_dropout_mask=None):
        """``h1 = cell(x, h0)``; LSTMCell: ``h1, c1 = cell(x, (h0, c0))``, as torch.
        With ``zoneout`` (ESPnet's ZoneOutCell, docs/cells.md, Recurrent dropout and zoneout) each unit keeps its old
        value where the mask (drawn per call in training, or ``zoneout_mask=(m_h, m_c)``
        of the state's shape) is 1; eval takes the expectation. With
        ``recurrent_dropout`` h is multiplied, where it enters the recurrent product, by a
        mask drawn at a sequence's first training step and kept until
        ``reset_recurrent_dropout_mask()`` (or given: ``recurrent_dropout_mask``, the
        state's shape)."""
        x_b, batched, N = _prepare_cell_input(x, self.input_size, self.dtype)
        hx_b = _prepare_cell_hx(self, hx, N, batched)
        zoneout = _cell_zoneout(self, N, batched, zoneout_mask) if N > 0 else None
        rec_mask = _cell_recurrent_dropout(self, N, batched, recurrent_dropout_mask) if N > 0 else None
        cell_forward = getattr(self._backend, "cell_forward", None)
        if cell_forward is not None and N > 0 and zoneout is None and rec_mask is None:
            # the lean path of the fused backend
            p = self._forward_params()
            training = self._trains
            h_n, c_n, cache = cell_forward(
                self._mode, x_b, hx_b,
                [p["weight_ih"], p["weight_hh"], p.get("bias_ih"), p.get("bias_hh")], training)
            self._keep_pending(cache, training, (batched, N))
        else:
            extra = {} if zoneout is None else {"zoneout_masks": zoneout}
            if rec_mask is not None:
                extra["recurrent_dropout_masks"] = rec_mask
            _, h_n, c_n = self._run_forward(
                x_b, hx_b, self._backend_params(self._forward_params()), num_layers=1,
                bidirectional=False, proj_size=0, lengths=None, dropout_masks=None,
                layout=(batched, N), **extra)
        h1 = h_n[0] if batched else h_n[0, 0]
        if self._mode == "LSTM":
            return h1, (c_n[0] if batched else c_n[0, 0])
        return h1

    def _cell_backward(self, grad_h1, grad_c1):
        batched, N = self._check_backward_allowed()
        d_h1, d_c1 = _prepare_cell_grads(self, grad_h1, grad_c1, batched, N)
        # h1 is both output[0] and h_n[0]; its gradient goes in as d_output.
        dx, dh0, dc0 = self._run_backward(d_h1, None, d_c1, self._backend_params(self.grad))

        def back(a):
            return a[0] if batched else a[0, 0]

        dx, dh0 = back(dx), back(dh0)
        if self._mode == "LSTM":
            return dx, (dh0, back(dc0))
        return dx, dh0


class LSTMCell(_CellBase):
    """One LSTM step, as ``torch.nn.LSTMCell``: ``h1, c1 = cell(x, (h0, c0))``."""

    def __init__(self, input_size, hidden_size, bias=True, dtype="float32", backend="fused",
                 seed=None, *, zoneout=0.0, recurrent_dropout=0.0):
        super().__init__("LSTM", input_size, hidden_size, bias, dtype, backend, seed, zoneout,
                         recurrent_dropout)

    def backward(self, grad_h1, grad_c1=None):
        """``grad_x, (grad_h0, grad_c0)`` of the last training-mode step; adds into ``grad``."""
        return self._cell_backward(grad_h1, grad_c1)


class GRUCell(_CellBase):
    """One GRU step, as ``torch.nn.GRUCell``: ``h1 = cell(x, h0)``."""

    def __init__(self, input_size, hidden_size, bias=True, dtype="float32", backend="fused",
                 seed=None, *, zoneout=0.0, recurrent_dropout=0.0):
        super().__init__("GRU", input_size, hidden_size, bias, dtype, backend, seed, zoneout,
                         recurrent_dropout)

    def backward(self, grad_h1):
        """``grad_x, grad_h0`` of the last training-mode step; adds into ``grad``."""
        return self._cell_backward(grad_h1, None)


class RNNCell(_CellBase):
    """One Elman RNN step with tanh or ReLU, as ``torch.nn.RNNCell``: ``h1 = cell(x, h0)``."""

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh",
                 dtype="float32", backend="fused", seed=None, *, zoneout=0.0,
                 recurrent_dropout=0.0):
        if nonlinearity not in _NONLINEARITIES:
            raise ValueError(
                f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(_NONLINEARITIES[nonlinearity], input_size, hidden_size, bias, dtype,
                         backend, seed, zoneout, recurrent_dropout)

    def backward(self, grad_h1):
        """``grad_x, grad_h0`` of the last training-mode step; adds into ``grad``."""
        return self._cell_backward(grad_h1, None)
