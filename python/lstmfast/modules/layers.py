"""The layers of torch.nn: ``LSTM`` (with the peephole option), ``GRU``, ``RNN``.

Each gives ``_RNNBase`` its backend mode and torch's constructor signature, followed
by lstmfast's own options: ``dtype``, ``backend`` and ``seed`` (the package's
docstring), then keyword-only ``peephole`` (LSTM), ``recurrent_dropout`` and
``zoneout`` (docs/cells.md), and ONNX's ``activations`` (with ``activation_alpha``,
``activation_beta``), ``clip``, ``input_forget`` (LSTM) and ``reverse`` (docs/onnx.md).
"""

from .base import _RNNBase
from .options import _NONLINEARITIES, _check_flag, _rnn_nonlinearity


class LSTM(_RNNBase):
    """Multi-layer LSTM, as ``torch.nn.LSTM`` (gates i, f, g, o; optional projection).

    ``peephole=True`` adds the peephole connections of the ONNX / TensorFlow form
    (docs/cells.md, Peephole LSTM): i and f also see the previous cell state, o the new one,
    through per-unit vectors ``weight_ci_l{k}``, ``weight_cf_l{k}``, ``weight_co_l{k}``
    (``(H,)`` each, plus ``_reverse``), drawn like the other parameters.

    ONNX's options (docs/onnx.md): ``activations`` (f, g, h; default ``("sigmoid",
    "tanh", "tanh")``) with ``activation_alpha`` / ``activation_beta`` (one entry or
    None per activation), ``clip`` (bounds every gate pre-activation), ``input_forget``
    (f = 1 - i) and ``reverse`` (one direction, each sequence from its end).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, dtype="float32",
                 backend="fused", seed=None, *, peephole=False, recurrent_dropout=0.0,
                 zoneout=0.0, activations=None, activation_alpha=None, activation_beta=None,
                 clip=None, input_forget=False, reverse=False):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, proj_size, dtype, backend, seed, peephole,
                         recurrent_dropout, zoneout, activations, activation_alpha,
                         activation_beta, clip, input_forget, reverse)


class GRU(_RNNBase):
    """Multi-layer GRU, as ``torch.nn.GRU`` (gates r, z, n; reset applied after W_hn h).

    ``linear_before_reset=False`` gives the GRU of the original paper instead (docs/cells.md,
    GRU with the reset before W_hn): n = tanh(W_in x + b_in + W_hn (r * h) + b_hn), as
    ONNX's ``linear_before_reset=0`` and Keras's ``reset_after=False``; the same
    parameters, names and shapes. ONNX's ``activations`` (f, g; default ``("sigmoid",
    "tanh")``), ``activation_alpha`` / ``activation_beta``, ``clip`` and ``reverse``
    as ``LSTM``'s."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, dtype="float32", backend="fused",
                 seed=None, *, proj_size=0, recurrent_dropout=0.0, zoneout=0.0,
                 linear_before_reset=True, activations=None, activation_alpha=None,
                 activation_beta=None, clip=None, reverse=False):
        self.linear_before_reset = _check_flag("linear_before_reset", linear_before_reset)
        super().__init__("GRU" if self.linear_before_reset else "GRU_RESET_BEFORE", input_size,
                         hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, proj_size, dtype, backend, seed,
                         recurrent_dropout=recurrent_dropout, zoneout=zoneout,
                         activations=activations, activation_alpha=activation_alpha,
                         activation_beta=activation_beta, clip=clip, reverse=reverse)

    def _options_repr(self):
        return "" if self.linear_before_reset else ", linear_before_reset=False"


class RNN(_RNNBase):
    """Multi-layer Elman RNN with tanh or ReLU, as ``torch.nn.RNN``.

    ONNX's ``activations`` (one name: ``("relu",)`` is ``nonlinearity="relu"``; another
    of ONNX's replaces ``nonlinearity``, which must then stay "tanh"),
    ``activation_alpha`` / ``activation_beta``, ``clip`` and ``reverse`` as ``LSTM``'s."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, dtype="float32",
                 backend="fused", seed=None, *, proj_size=0, recurrent_dropout=0.0,
                 zoneout=0.0, activations=None, activation_alpha=None, activation_beta=None,
                 clip=None, reverse=False):
        if nonlinearity not in _NONLINEARITIES:
            raise ValueError(
                f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(_NONLINEARITIES[nonlinearity], input_size, hidden_size, num_layers,
                         bias, batch_first, dropout, bidirectional, proj_size, dtype, backend,
                         seed, recurrent_dropout=recurrent_dropout, zoneout=zoneout,
                         activations=activations, activation_alpha=activation_alpha,
                         activation_beta=activation_beta, clip=clip, reverse=reverse)
        # the parameters of both nonlinearities are the same: the mode may change now
        self.nonlinearity = _rnn_nonlinearity(self, nonlinearity)
        self._mode = _NONLINEARITIES[self.nonlinearity]
