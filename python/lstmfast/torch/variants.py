"""The layers torch.nn lacks: ``PeepholeLSTM``, ``LayerNormLSTM``, ``CTRNN``.

Each is torch's layer (``LSTM`` or ``RNN`` here) with more parameters or options: the
kernels compute it, and a loop of torch ops (loops.py) wherever only torch can.
Also the forward ``accelerate`` gives torchaudio's RNN-T ``_CustomLSTM`` modules,
which runs on the LayerNormLSTM kernels.
"""

import torch
from torch import nn

from ..modules.options import _check_ctrnn_options, _check_layer_norm_eps
from ._backend import _backend, _in_torch_only_context, _unsupported_reason
from .autograd import _RecurrentFunction, _stack_step
from .layers import LSTM, RNN, _fused_layer_forward
from .loops import _torch_ctrnn_stack, _torch_ln_lstm_stack, _torch_loop_forward, _torch_loop_stack


class PeepholeLSTM(LSTM):
    """An LSTM with peephole connections (docs/cells.md, Peephole LSTM, the ONNX and TensorFlow
    form), which torch.nn lacks: i and f also see the previous cell state, o the new
    one, through per-unit parameters ``weight_ci_l{k}``, ``weight_cf_l{k}``,
    ``weight_co_l{k}`` (``(hidden_size,)``, plus ``_reverse``), drawn as torch draws
    the others. Constructor and call are ``torch.nn.LSTM``'s; forward and BPTT run on
    lstmfast's fused kernels. Where only torch can compute (CUDA, other dtypes,
    tracing, export, ``torch.func``, autocast, double backward) a loop of torch ops
    computes the same equations; ONNX export writes ONNX's LSTM node with ``P``
    (onnx_export.py). ``lstmfast.LSTM(..., peephole=True)`` loads its ``state_dict``.
    """

    _lstmfast_autocast = False  # torch's loop under autocast, as for torch's own ops

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        bound = 1.0 / self.hidden_size ** 0.5
        like = self.weight_ih_l0
        for name in self._peephole_names():
            self.register_parameter(name, nn.Parameter(
                torch.empty(self.hidden_size, dtype=like.dtype, device=like.device).uniform_(-bound, bound)))

    def _peephole_names(self):
        return [f"weight_c{gate}_l{k}{suffix}" for k in range(self.num_layers)
                for suffix in ("", "_reverse")[: 2 if self.bidirectional else 1] for gate in "ifo"]

    def _lstmfast_weights(self):
        weights, names, reduced = super()._lstmfast_weights()
        names = names + self._peephole_names()
        return weights + [getattr(self, name) for name in self._peephole_names()], names, reduced

    def _torch_forward(self, input, hx, given=None):
        return _torch_loop_forward(self, input, hx, _torch_loop_stack, given)

    def __prepare_scriptable__(self):
        raise TypeError("PeepholeLSTM cannot be scripted: torch has no peephole LSTM to compile; "
                        "use torch.jit.trace")


class LayerNormLSTM(LSTM):
    """A layer-normalized LSTM in the form of torchaudio's RNN-T predictor (docs/cells.md,
    Layer-normalized LSTM), which torch.nn lacks: no linear biases, one LayerNorm over the 4H gate
    pre-activations and one over the new cell state, which is what is carried:

        gates = LN_g(x W_ih^T + h W_hh^T);  c' = LN_c(f c + i g);  h' = o tanh(c')

    Parameters: ``weight_ih_l{k}``, ``weight_hh_l{k}`` (drawn as torch draws an LSTM's),
    ``ln_gates_weight_l{k}`` / ``ln_gates_bias_l{k}`` (4H), ``ln_cell_weight_l{k}`` /
    ``ln_cell_bias_l{k}`` (H), 1 and 0 at first, as nn.LayerNorm; plus ``_reverse``.
    Call and return are ``torch.nn.LSTM``'s; forward and BPTT run on lstmfast's fused
    kernels, or, where only torch can compute (CUDA, other dtypes, tracing, export,
    ``torch.func``, autocast, double backward), a loop of torch ops.
    ``lstmfast.LayerNormLSTM`` loads its ``state_dict``; ``lstmfast.interop
    .from_torchaudio_lstm`` maps torchaudio's keys to these names.
    """

    _lstmfast_autocast = False  # torch's loop under autocast, as for torch's own ops

    def __init__(self, input_size, hidden_size, num_layers=1, bidirectional=False,
                 batch_first=False, dropout=0.0, layer_norm_eps=1e-5, device=None, dtype=None):
        eps = _check_layer_norm_eps(layer_norm_eps)
        super().__init__(input_size, hidden_size, num_layers, bias=False, batch_first=batch_first,
                         dropout=dropout, bidirectional=bidirectional, device=device, dtype=dtype)
        self.layer_norm_eps = eps
        like = self.weight_ih_l0
        for name in self._layer_norm_names():
            width = (4 if "_gates_" in name else 1) * hidden_size
            fill = 1.0 if "_weight_" in name else 0.0
            self.register_parameter(name, nn.Parameter(
                torch.full((width,), fill, dtype=like.dtype, device=like.device)))

    def forward(self, input, hx=None):  # noqa: A002  (torch's; no regularizer masks here)
        return super().forward(input, hx)

    def _layer_norm_names(self):
        return [f"ln_{part}_l{k}{suffix}" for k in range(self.num_layers)
                for suffix in ("", "_reverse")[: 2 if self.bidirectional else 1]
                for part in ("gates_weight", "gates_bias", "cell_weight", "cell_bias")]

    @property
    def _lstmfast_mode(self):
        return "LN_LSTM"

    def _lstmfast_cell_options(self, T, N, like, given):
        return {"layer_norm_eps": self.layer_norm_eps}

    def _lstmfast_weights(self):
        weights, names, reduced = super()._lstmfast_weights()
        names = names + self._layer_norm_names()
        return weights + [getattr(self, name) for name in self._layer_norm_names()], names, reduced

    def _torch_forward(self, input, hx, given=None):
        return _torch_loop_forward(self, input, hx, _torch_ln_lstm_stack)

    def extra_repr(self):
        s = super().extra_repr().replace(", bias=False", "")
        return s + (f", layer_norm_eps={self.layer_norm_eps}" if self.layer_norm_eps != 1e-5 else "")

    def __prepare_scriptable__(self):
        raise TypeError("LayerNormLSTM cannot be scripted: torch has no layer-normalized LSTM "
                        "to compile; use torch.jit.trace")


class _TorchaudioLSTMForward:
    """The forward of torchaudio's RNN-T ``_CustomLSTM(layer_norm=True)`` on lstmfast's
    layer-normalized LSTM kernels, mixed by ``accelerate()`` into such modules (their
    parameters, ``x2g``, ``p2g``, ``g_norm``, ``c_norm``, stay where they are). Anything
    the kernels do not take, a ``_CustomLSTM`` without layer norms included, runs
    torchaudio's own forward."""

    _lstmfast_names = ["weight_ih_l0", "weight_hh_l0", "ln_gates_weight_l0", "ln_gates_bias_l0",
                       "ln_cell_weight_l0", "ln_cell_bias_l0"]

    def forward(self, input, state):  # noqa: A002  (torchaudio's argument name)
        g_norm, c_norm = self.g_norm, self.c_norm
        if not (isinstance(g_norm, nn.LayerNorm) and isinstance(c_norm, nn.LayerNorm)
                and self.x2g.bias is None and self.p2g.bias is None and g_norm.eps == c_norm.eps
                and isinstance(input, torch.Tensor) and input.dim() == 3 and input.shape[1] > 0):
            return super().forward(input, state)
        weights = [self.x2g.weight, self.p2g.weight, g_norm.weight, g_norm.bias, c_norm.weight,
                   c_norm.bias]
        state = list(state) if state is not None else []
        if (torch.compiler.is_exporting() or _in_torch_only_context()
                or _unsupported_reason(input, weights + state) is not None):
            return super().forward(input, state or None)
        B, H = input.shape[1], self.p2g.weight.shape[1]
        h0, c0 = (s[None] for s in state) if state else (input.new_zeros(1, B, H),) * 2
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in [input, h0, c0] + weights)
        settings = {"backend": _backend("fused"), "mode": "LN_LSTM", "names": self._lstmfast_names,
                    "num_layers": 1, "bidirectional": False, "bias": False, "proj_size": 0,
                    "lengths": None, "rows": None, "batch_sizes": None,
                    "cell_options": {"layer_norm_eps": g_norm.eps}, "keep_for_backward": needs_grad}
        masks = input.new_empty(0)
        if needs_grad:
            out, h_n, c_n = _RecurrentFunction.apply(settings, input, h0, c0, masks, None, *weights)
        else:
            out, h_n, c_n, _ = _stack_step(settings, input, h0, c0, masks, weights)
        return out, [h_n[0], c_n[0]]


class CTRNN(RNN):
    """A continuous-time (leaky) RNN (docs/cells.md, Continuous-time RNN), which torch.nn lacks: with
    z = x W_ih^T + b_ih + h W_hh^T + b_hh and alpha = dt / tau,

    * ``leak="outside"``: h' = (1 - alpha) h + alpha phi(z) + noise
    * ``leak="inside"``: h' = phi((1 - alpha) h + alpha z + noise) (Yang & Wang's primer)

    phi = ``nonlinearity``. ``noise_std > 0`` adds Gaussian noise of that standard
    deviation to the state at every step, in training and in eval, drawn from torch's
    generator (``torch.manual_seed``); ``forward(input, hx, noise=)`` gives it instead,
    ``(num_layers * D, T, N, H)`` time-major (a constant: no gradient flows into it).
    Parameters, constructor and call are ``torch.nn.RNN``'s; forward and BPTT run on
    lstmfast's fused kernels, or, where only torch can compute (CUDA, other dtypes,
    tracing, export, ``torch.func``, autocast, double backward), a loop of torch ops.
    ``lstmfast.CTRNN`` loads its ``state_dict``.
    """

    _lstmfast_autocast = False  # torch's loop under autocast, as for torch's own ops

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="relu", alpha=1.0,
                 leak="outside", noise_std=0.0, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, device=None, dtype=None):
        options = _check_ctrnn_options(alpha, leak, noise_std)
        super().__init__(input_size, hidden_size, num_layers, nonlinearity=nonlinearity,
                         bias=bias, batch_first=batch_first, dropout=dropout,
                         bidirectional=bidirectional, device=device, dtype=dtype)
        self.alpha, self.leak, self.noise_std = options

    def forward(self, input, hx=None, noise=None):  # noqa: A002  (torch's argument name)
        if torch.compiler.is_exporting():
            return self._torch_forward(input, hx, noise)
        return _fused_layer_forward(self, input, hx, noise)

    @property
    def _lstmfast_mode(self):
        return "CTRNN_RELU" if self.nonlinearity == "relu" else "CTRNN_TANH"

    def _lstmfast_cell_options(self, T, N, like, given):
        shape = (self.num_layers * (2 if self.bidirectional else 1), T, N, self.hidden_size)
        noise = given
        if noise is not None:
            if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != shape:
                raise ValueError(f"noise: expected a tensor of shape {shape} (num_layers * "
                                 f"directions, T, N, hidden_size), got "
                                 f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
            noise = noise.detach().to(like.dtype).contiguous()
        elif self.noise_std > 0:
            noise = self.noise_std * torch.randn(shape, dtype=like.dtype, device=like.device)
        return {"alpha": self.alpha, "leak": self.leak, "noise": noise}

    def _torch_forward(self, input, hx, given=None):
        return _torch_loop_forward(self, input, hx, _torch_ctrnn_stack, given)

    def extra_repr(self):
        s = super().extra_repr() + f", nonlinearity={self.nonlinearity!r}, alpha={self.alpha}"
        if self.leak != "outside":
            s += f", leak={self.leak!r}"
        if self.noise_std:
            s += f", noise_std={self.noise_std}"
        return s

    def __prepare_scriptable__(self):
        raise TypeError("CTRNN cannot be scripted: torch has no CTRNN to compile; "
                        "use torch.jit.trace")
