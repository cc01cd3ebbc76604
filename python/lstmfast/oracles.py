"""Recurrent cells as loops of torch ops, written as their communities write them: the
independent oracles the tests compare lstmfast's cells with (docs/cells.md), and the
``torch loop`` that ``python -m lstmfast.bench --variants`` times lstmfast against.

* ``PeepholeLoop``: the peephole LSTM of the ONNX/TensorFlow equations;
* ``PrimerCTRNN``: Yang & Wang's continuous-time RNN, their primer's module as published;
* ``CustomLSTMLoop``: torchaudio's RNN-T ``_CustomLSTM(layer_norm=True)``, its code
  transcribed (for where torchaudio does not import);
* ``HardSigmoidLSTMLoop``: Keras 2's LSTM with its default hard-sigmoid gates, ported to
  torch as a loop (what tf2onnx exports with ONNX's HardSigmoid);
* ``RecurrentDropoutLoop``: an ``nn.LSTMCell`` loop with one recurrent dropout mask on h
  per sequence; ``ZoneoutLoop``: ESPnet's ZoneOutCell around ``nn.LSTMCell``. Both take
  masks fixed by the caller (``fixed``), so that they can be compared with lstmfast's.

This module imports torch: it needs the torch extra (``pip install 'lstmfast[torch]'``).
``import lstmfast`` does not import it.
"""

import torch
from torch import nn


class _LSTMLoop(nn.Module):
    """An LSTM as a Python loop of torch ops over time, on torch's weights and gate order
    (i, f, g, o); ``cell(gates, c)`` of the subclass gives (h, c) of a step."""

    def __init__(self, input_size, hidden_size, per_unit=()):
        super().__init__()
        H = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * H, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * H, H))
        self.bias_ih = nn.Parameter(torch.empty(4 * H))
        self.bias_hh = nn.Parameter(torch.empty(4 * H))
        for name in per_unit:  # vectors of H, after the four above
            setattr(self, name, nn.Parameter(torch.empty(H)))
        for p in self.parameters():
            nn.init.uniform_(p, -H ** -0.5, H ** -0.5)

    def forward(self, x):  # (T, N, I)
        N, H = x.shape[1], self.weight_hh.shape[1]
        h = c = x.new_zeros(N, H)
        outputs = []
        for x_t in x:
            gates = nn.functional.linear(x_t, self.weight_ih, self.bias_ih) + \
                nn.functional.linear(h, self.weight_hh, self.bias_hh)
            h, c = self.cell(gates.chunk(4, 1), c)
            outputs.append(h)
        return torch.stack(outputs), (h, c)


class PeepholeLoop(_LSTMLoop):
    """A peephole LSTM as a Python loop of torch ops: i and f see c, o sees the new c."""

    def __init__(self, input_size, hidden_size):
        super().__init__(input_size, hidden_size, ("weight_ci", "weight_cf", "weight_co"))

    def cell(self, gates, c):
        i, f, g, o = gates
        i = torch.sigmoid(i + self.weight_ci * c)
        f = torch.sigmoid(f + self.weight_cf * c)
        c = f * c + i * torch.tanh(g)
        return torch.sigmoid(o + self.weight_co * c) * torch.tanh(c), c


class HardSigmoidLSTMLoop(_LSTMLoop):
    """Keras 2's LSTM (``recurrent_activation="hard_sigmoid"``, its default) ported to torch
    as a loop: the gates are clip(0.2 a + 0.5, 0, 1), the rest torch's LSTM (its gate
    order and weight layout), as a user moving such a model to torch writes it."""

    def cell(self, gates, c):
        i, f, g, o = gates
        i, f, o = (torch.clamp(0.2 * a + 0.5, 0.0, 1.0) for a in (i, f, o))
        c = f * c + i * torch.tanh(g)
        return o * torch.tanh(c), c


class PrimerCTRNN(nn.Module):
    """Yang & Wang's CTRNN from their primer's code (the module computational
    neuroscience tutorials copy), as published: input2h and h2h are nn.Linear, the
    leak sits inside the relu, and forward loops over time."""

    def __init__(self, input_size, hidden_size, dt=20.0, tau=100.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.alpha = dt / tau
        self.oneminusalpha = 1 - self.alpha
        self.input2h = nn.Linear(input_size, hidden_size)
        self.h2h = nn.Linear(hidden_size, hidden_size)

    def recurrence(self, input, hidden):  # noqa: A002  (the published code's name)
        pre_activation = self.input2h(input) + self.h2h(hidden)
        return torch.relu(hidden * self.oneminusalpha + pre_activation * self.alpha)

    def forward(self, x):  # (T, N, I)
        hidden = x.new_zeros(x.shape[1], self.hidden_size)
        outputs = []
        for x_t in x:
            hidden = self.recurrence(x_t, hidden)
            outputs.append(hidden)
        return torch.stack(outputs), hidden


class CustomLSTMLoop(nn.Module):
    """torchaudio.models.rnnt._CustomLSTM(layer_norm=True)'s code, transcribed (used when
    torchaudio does not import): x2g, p2g without biases, g_norm over 4H, c_norm over H."""

    def __init__(self, input_dim, hidden_dim, layer_norm=True, layer_norm_epsilon=1e-5):
        super().__init__()
        self.x2g = nn.Linear(input_dim, 4 * hidden_dim, bias=False)
        self.p2g = nn.Linear(hidden_dim, 4 * hidden_dim, bias=False)
        self.c_norm = nn.LayerNorm(hidden_dim, eps=layer_norm_epsilon)
        self.g_norm = nn.LayerNorm(4 * hidden_dim, eps=layer_norm_epsilon)
        self.hidden_dim = hidden_dim

    def forward(self, input, state):  # noqa: A002  (the published code's name)
        if state is None:
            h = c = input.new_zeros(input.size(1), self.hidden_dim)
        else:
            h, c = state
        outputs = []
        for gates in self.x2g(input).unbind(0):
            gates = self.g_norm(gates + self.p2g(h))
            i, f, g, o = gates.chunk(4, 1)
            c = self.c_norm(f.sigmoid() * c + i.sigmoid() * g.tanh())
            h = o.sigmoid() * c.tanh()
            outputs.append(h)
        return torch.stack(outputs, dim=0), [h, c]


class _Regularized(nn.Module):
    """A regularized loop whose forward runs with the masks in ``fixed`` when they are set
    (as lstmfast.torch's forward takes them: the same masks for both, to compare them),
    else draws its own in training."""

    fixed = None


class RecurrentDropoutLoop(_Regularized):
    """Variational (Gal & Ghahramani) recurrent dropout as users write it: a loop over
    nn.LSTMCell, one mask on h per sequence, kept for every step."""

    def __init__(self, input_size, hidden_size, p):
        super().__init__()
        self.cell = nn.LSTMCell(input_size, hidden_size)
        self.p = p

    def forward(self, x):
        N, H = x.shape[1], self.cell.hidden_size
        h = c = x.new_zeros(N, H)
        mask = None
        if self.fixed is not None:
            mask = self.fixed["recurrent_dropout_mask"][0]
        elif self.training:
            mask = x.new_full((N, H), 1 - self.p).bernoulli() / (1 - self.p)
        outputs = []
        for x_t in x:
            h, c = self.cell(x_t, (h if mask is None else h * mask, c))
            outputs.append(h)
        return torch.stack(outputs), (h, c)


class ZoneoutLoop(_Regularized):
    """ESPnet's ZoneOutCell (Tacotron 2's decoders) around nn.LSTMCell, stepped over the
    sequence: masks fresh each step, 1 keeps the old value; the expectation in eval."""

    def __init__(self, input_size, hidden_size, p):
        super().__init__()
        self.cell = nn.LSTMCell(input_size, hidden_size)
        self.p = p

    def _zoneout(self, old, new, mask):
        if mask is not None:
            return mask * old + (1 - mask) * new
        if self.training:
            mask = old.new_empty(old.shape).bernoulli_(self.p)
            return mask * old + (1 - mask) * new
        return self.p * old + (1 - self.p) * new

    def forward(self, x):
        N, H = x.shape[1], self.cell.hidden_size
        h = c = x.new_zeros(N, H)
        outputs = []
        for t, x_t in enumerate(x):
            h_new, c_new = self.cell(x_t, (h, c))
            masks = (None, None) if self.fixed is None else (
                self.fixed["zoneout_mask"][0][0, t], self.fixed["zoneout_mask"][1][0, t])
            h, c = self._zoneout(h, h_new, masks[0]), self._zoneout(c, c_new, masks[1])
            outputs.append(h)
        return torch.stack(outputs), (h, c)
