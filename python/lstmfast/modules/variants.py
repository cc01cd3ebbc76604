"""The layers beyond torch.nn's: ``CTRNN`` and ``LayerNormLSTM``.

Each is an ``_RNNBase`` with a backend mode of its own, plus what that cell needs
beyond torch's arguments: its options checked at construction (options.py, shared
with the torch adapter's classes), its keyword arguments for the backend forward
(``_cell_options``), its parameter names where they differ, and its repr. The
peephole LSTM is not here: it is an option of ``LSTM`` (layers.py).
"""

from .base import _RNNBase
from .inputs import _as_input, _caller_lead, _check_shape, _per_layer_to_time_major
from .options import _CTRNN_MODES, _check_ctrnn_options, _check_layer_norm_eps


class CTRNN(_RNNBase):
    """Continuous-time (leaky) RNN, the Euler step of tau dh/dt = -h + phi(...) with
    ``alpha = dt / tau`` (docs/cells.md, Continuous-time RNN). With z = x W_ih^T + b_ih + h W_hh^T + b_hh:

    * ``leak="outside"`` (default): h' = (1 - alpha) h + alpha phi(z) + noise
    * ``leak="inside"``: h' = phi((1 - alpha) h + alpha z + noise), the form of Yang &
      Wang's primer code; it equals ``RNN(nonlinearity)`` with reparametrized weights
      when there is no noise.

    ``phi`` is ``nonlinearity`` ("relu" or "tanh"). ``noise_std > 0`` adds Gaussian
    noise of that standard deviation to the state at every step, in training and in
    eval (it is part of the model, as in PsychRNN; for PsychRNN's sqrt(2 alpha)
    sigma_rec pass that product), drawn from the layer's ``seed``; ``forward(...,
    noise=)`` gives it instead, one array per layer and direction of the shape of that
    direction's output. Backward needs none of it. Parameters are ``RNN``'s, and so is
    the rest of the API; ``alpha=1`` with ``leak="outside"`` and no noise is ``RNN``.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="relu", alpha=1.0,
                 leak="outside", noise_std=0.0, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, dtype="float32", backend="fused", seed=None, *,
                 recurrent_dropout=0.0):
        if nonlinearity not in _CTRNN_MODES:
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        self.alpha, self.leak, self.noise_std = _check_ctrnn_options(alpha, leak, noise_std)
        super().__init__(_CTRNN_MODES[nonlinearity], input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, 0, dtype, backend, seed,
                         recurrent_dropout=recurrent_dropout)

    def forward(self, x, hx=None, lengths=None, noise=None, *, recurrent_dropout_mask=None):
        """``output, h_n = layer(x, hx, lengths, noise)``. ``noise``: None (drawn when
        ``noise_std > 0``) or an array of shape ``(num_layers * D,) + `` the shape of one
        direction's output (``(T, N, H)``, ``(N, T, H)`` with batch_first, ``(T, H)``
        unbatched), added as it is. ``recurrent_dropout_mask``: as LSTM.forward's."""
        return self._forward(x, hx, lengths, noise, recurrent_dropout_mask)

    def _cell_options(self, T, N, batched, given):
        LD, H = self.num_layers * self._num_directions, self.hidden_size
        noise = None
        if given is not None:
            noise = _as_input("noise", given, self.dtype)
            _check_shape("noise", noise, (LD,) + _caller_lead(T, N, batched, self.batch_first) + (H,))
            noise = _per_layer_to_time_major(noise, batched, self.batch_first)
        elif self.noise_std > 0 and N > 0:
            # its own stream (layer._noise_rng): noise does not shift the dropout masks
            noise = (self.noise_std * self._noise_rng.standard_normal((LD, T, N, H))).astype(
                self.dtype)
        return {"alpha": self.alpha, "leak": self.leak, "noise": noise}

    def _options_repr(self):
        s = f", nonlinearity={self.nonlinearity!r}, alpha={self.alpha}"
        if self.leak != "outside":
            s += f", leak={self.leak!r}"
        if self.noise_std:
            s += f", noise_std={self.noise_std}"
        return s


class LayerNormLSTM(_RNNBase):
    """Layer-normalized LSTM in the form of torchaudio's RNN-T predictor
    (``torchaudio.models.rnnt._CustomLSTM(layer_norm=True)``, docs/cells.md, Layer-normalized LSTM):

        gates = LN_g(x W_ih^T + h W_hh^T)      one LayerNorm over all 4H, no linear biases
        i, f, o = sigmoid(gates), g = tanh(gates)   (torch's gate order i, f, g, o)
        c' = LN_c(f c + i g)                   the normalized cell state is carried
        h' = o tanh(c')

    Parameters per layer and direction: ``weight_ih_l{k}`` (4H, I), ``weight_hh_l{k}``
    (4H, H), ``ln_gates_weight_l{k}`` / ``ln_gates_bias_l{k}`` (4H,), ``ln_cell_weight_l{k}``
    / ``ln_cell_bias_l{k}`` (H,) (plus ``_reverse``); the layer norms start at weight 1
    and bias 0, as nn.LayerNorm. ``lstmfast.interop.from_torchaudio_lstm`` maps a
    torchaudio state_dict to these names. Call and return are ``LSTM``'s.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bidirectional=False,
                 batch_first=False, dropout=0.0, layer_norm_eps=1e-5, dtype="float32",
                 backend="fused", seed=None, *, recurrent_dropout=0.0):
        self.layer_norm_eps = _check_layer_norm_eps(layer_norm_eps)
        super().__init__("LN_LSTM", input_size, hidden_size, num_layers, False, batch_first,
                         dropout, bidirectional, 0, dtype, backend, seed,
                         recurrent_dropout=recurrent_dropout)

    def _param_names(self):
        names = []
        for k in range(self.num_layers):
            for suffix in ("", "_reverse")[: self._num_directions]:
                names += [f"{name}_l{k}{suffix}" for name in (
                    "weight_ih", "weight_hh", "ln_gates_weight", "ln_gates_bias", "ln_cell_weight",
                    "ln_cell_bias")]
        return names

    def _cell_options(self, T, N, batched, given):
        return {"layer_norm_eps": self.layer_norm_eps}

    def _options_repr(self):
        return f", layer_norm_eps={self.layer_norm_eps}" if self.layer_norm_eps != 1e-5 else ""
