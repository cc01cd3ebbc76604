"""Loops of torch ops computing what lstmfast's kernels compute (docs/cells.md's equations).

Two uses: the autograd Functions differentiate them when a backward needs a graph
(``_torch_stack``, ``_torch_cell``: double backward, batched gradients), and the
layers run them wherever the kernels cannot take a call but torch's own module does
not compute the same thing (``_torch_loop_forward``: peepholes, layer norm, CTRNN,
recurrent dropout and zoneout on CUDA, other dtypes, under tracing, export,
``torch.func`` or autocast). They import nothing of lstmfast.torch.
"""

import warnings

import torch
from torch import _VF, nn
from torch.nn.utils.rnn import PackedSequence


_VF_LAYER = {"LSTM": _VF.lstm, "GRU": _VF.gru, "RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu}


def _torch_layer_loop(s, x, h0, c0, masks, step):
    """The loop of the torch-op stacks below, with _torch_stack's contract: layers,
    directions (the reverse one walks time backwards, as every layer does with ONNX's
    reverse in s["cell_options"]), dropout between layers, and lengths: x is padded
    (T, N, I); with s["lengths"] a row holds its state past its length and outputs 0
    there (as the reference does), so a reverse walk starts at each row's own end.
    ``step(k, sfx, t, x_t, h, c)`` gives (h_next, c_next) of layer-direction k
    (parameter suffix sfx) at time t; c0 None: no cell state (c is None throughout and
    c_n is None)."""
    D = 2 if s["bidirectional"] else 1
    reverse = bool((s.get("cell_options") or {}).get("reverse"))
    T = x.shape[0]
    lengths = None if s["lengths"] is None else torch.as_tensor(s["lengths"], device=x.device)
    h_n, c_n = [], []
    layer_input = x
    for layer in range(s["num_layers"]):
        if layer > 0 and masks.numel():
            layer_input = layer_input * masks[layer - 1]
        outputs = []
        for d in range(D):
            k = layer * D + d
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            h, c = h0[k], None if c0 is None else c0[k]
            steps = [None] * T
            for t in (reversed(range(T)) if d or reverse else range(T)):
                h_next, c_next = step(k, sfx, t, layer_input[t], h, c)
                if lengths is None:
                    steps[t], h, c = h_next, h_next, c_next
                else:
                    running = (t < lengths)[:, None]
                    steps[t] = torch.where(running, h_next, torch.zeros_like(h_next))
                    h = torch.where(running, h_next, h)
                    if c is not None:
                        c = torch.where(running, c_next, c)
            outputs.append(torch.stack(steps))
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outputs, 2)
    return layer_input, torch.stack(h_n), (None if c0 is None else torch.stack(c_n))


def _torch_ctrnn_stack(s, x, h0, c0, masks, *weights):
    """A CTRNN stack (docs/cells.md, Continuous-time RNN) as a loop of torch ops (_torch_layer_loop); the
    noise, s["cell_options"]["noise"] ((L*D, T, N, H) or None), is a constant."""
    w = dict(zip(s["names"], weights))
    options = s["cell_options"]
    alpha, inside, noise = options["alpha"], options["leak"] == "inside", options["noise"]
    act = torch.relu if s["mode"] == "CTRNN_RELU" else torch.tanh

    def step(k, sfx, t, x_t, h, c):
        z = x_t @ w["weight_ih" + sfx].T + h @ w["weight_hh" + sfx].T
        if s["bias"]:
            z = z + w["bias_ih" + sfx] + w["bias_hh" + sfx]
        e = 0 if noise is None else noise[k, t]
        if inside:
            return act((1 - alpha) * h + alpha * z + e), None
        return (1 - alpha) * h + alpha * act(z) + e, None

    return _torch_layer_loop(s, x, h0, None, masks, step)


def _torch_ln_lstm_stack(s, x, h0, c0, masks, *weights):
    """A layer-normalized LSTM stack (docs/cells.md, Layer-normalized LSTM, torchaudio's form) as a loop of
    torch ops (_torch_layer_loop)."""
    w = dict(zip(s["names"], weights))
    eps = s["cell_options"]["layer_norm_eps"]

    def step(k, sfx, t, x_t, h, c):
        H = h.shape[1]
        a = x_t @ w["weight_ih" + sfx].T + h @ w["weight_hh" + sfx].T
        gates = nn.functional.layer_norm(a, (4 * H,), w["ln_gates_weight" + sfx],
                                         w["ln_gates_bias" + sfx], eps)
        i, f, g, o = gates.chunk(4, 1)
        c_next = nn.functional.layer_norm(
            torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g), (H,),
            w["ln_cell_weight" + sfx], w["ln_cell_bias" + sfx], eps)
        return torch.sigmoid(o) * torch.tanh(c_next), c_next

    return _torch_layer_loop(s, x, h0, c0, masks, step)


# ONNX's activations (docs/cells.md, Activations, clip and the coupled gates) as torch
# ops: name -> y = function(a, alpha, beta), as the reference computes them.
_ACTIVATIONS = {
    "sigmoid": lambda a, al, be: torch.sigmoid(a),
    "tanh": lambda a, al, be: torch.tanh(a),
    "relu": lambda a, al, be: torch.relu(a),
    "affine": lambda a, al, be: al * a + be,
    "leakyrelu": lambda a, al, be: torch.where(a >= 0, a, al * a),
    "thresholdedrelu": lambda a, al, be: torch.where(a > al, a, torch.zeros_like(a)),
    "scaledtanh": lambda a, al, be: al * torch.tanh(be * a),
    "hardsigmoid": lambda a, al, be: torch.clamp(al * a + be, 0, 1),
    "elu": lambda a, al, be: torch.where(a >= 0, a, al * torch.expm1(torch.clamp(a, max=0))),
    "softsign": lambda a, al, be: a / (1 + torch.abs(a)),
    "softplus": lambda a, al, be: torch.logaddexp(torch.zeros_like(a), a),
}


def _torch_loop_stack(s, x, h0, c0, masks, *weights):
    """An LSTM (peepholes and projection included), GRU or RNN stack, with recurrent
    dropout and zoneout (docs/cells.md, Recurrent dropout and zoneout) and ONNX's
    activations, clip and input_forget, as a loop of torch ops (_torch_layer_loop): what
    torch's kernels cannot compute (peepholes: docs/cells.md, Peephole LSTM; the regularizers;
    ONNX's options). The masks, s["cell_options"] (as the backends take them), are constants."""
    w = dict(zip(s["names"], weights))
    options = s.get("cell_options") or {}
    from ..reference import resolve_activations

    triples = options.get("activations") or resolve_activations(s["mode"])
    clip, input_forget = options.get("clip"), options.get("input_forget", False)

    def act(role, a, clipped=True):  # activation role (0 f, 1 g, 2 h), clip first
        name, alpha, beta = triples[role]
        if clipped and clip is not None:
            a = torch.clamp(a, -clip, clip)
        return _ACTIVATIONS[name](a, alpha, beta)

    rec = options.get("recurrent_dropout_masks")
    zone = options.get("zoneout_masks") or (None, None)
    mode = s["mode"]
    if options.get("zoneout_seed") is not None:  # the masks the kernels draw from the seed
        from ..reference import zoneout_masks_from_seed

        H = h0.shape[2] if c0 is None or not c0.numel() else c0.shape[2]
        zone = tuple(None if m is None else torch.from_numpy(m).to(x.dtype) for m in
                     zoneout_masks_from_seed(options["zoneout_seed"], zone, h0.shape[0],
                                             x.shape[0], x.shape[1], (h0.shape[2], H)))
        # the kernels number a PackedSequence's rows in its sorted order; x here is the caller's
        position = s.get("packed_positions")
        if position is not None:
            zone = tuple(None if m is None else m.index_select(2, position) for m in zone)

    def factor(m, k, t):
        return None if m is None else m if not isinstance(m, torch.Tensor) else m[k, t]

    def step(k, sfx, t, x_t, h, c):
        h_rec = h if rec is None else h * rec[k]
        gi = x_t @ w["weight_ih" + sfx].T
        gh = h_rec @ w["weight_hh" + sfx].T
        b_ih, b_hh = w.get("bias_ih" + sfx), w.get("bias_hh" + sfx)
        if b_ih is not None:
            gi, gh = gi + b_ih, gh + b_hh
        c_next = None
        if mode == "LSTM":
            i, f, g, o = (gi + gh).chunk(4, 1)
            if "weight_ci" + sfx in w:  # peepholes: i and f see c, o the new c
                i, f = i + w["weight_ci" + sfx] * c, f + w["weight_cf" + sfx] * c
            i = act(0, i)
            f = 1 - i if input_forget else act(0, f)  # ONNX's coupled gates
            c_next = f * c + i * act(1, g)
            if "weight_co" + sfx in w:
                o = o + w["weight_co" + sfx] * c_next
            h_next = act(0, o) * act(2, c_next, clipped=False)
            if s["proj_size"]:
                h_next = h_next @ w["weight_hr" + sfx].T
        elif mode == "GRU":
            i_r, i_z, i_n = gi.chunk(3, 1)
            h_r, h_z, h_n = gh.chunk(3, 1)
            r, z = act(0, i_r + h_r), act(0, i_z + h_z)
            n = act(1, i_n + r * h_n)
            h_next = (1 - z) * n + z * h
        elif mode == "GRU_RESET_BEFORE":  # r multiplies h before W_hn (gh's n block unused)
            H = h.shape[1]
            i_r, i_z, i_n = gi.chunk(3, 1)
            h_r, h_z, _ = gh.chunk(3, 1)
            r, z = act(0, i_r + h_r), act(0, i_z + h_z)
            h_n = (r * h_rec) @ w["weight_hh" + sfx][2 * H:].T
            if b_hh is not None:
                h_n = h_n + b_hh[2 * H:]
            n = act(1, i_n + h_n)
            h_next = (1 - z) * n + z * h
        else:
            h_next = act(0, gi + gh)
        m_h, m_c = factor(zone[0], k, t), factor(zone[1], k, t)
        if m_h is not None:
            h_next = m_h * h + (1 - m_h) * h_next
        if m_c is not None and c is not None:
            c_next = m_c * c + (1 - m_c) * c_next
        return h_next, c_next

    return _torch_layer_loop(s, x, h0, c0 if mode == "LSTM" else None, masks, step)


def _torch_stack(s, x, h0, c0, masks, *weights):
    """The stack of ``_RecurrentFunction`` computed layer by layer with torch's own
    kernels, the same dropout masks included (for double backward)."""
    if "weight_ci_l0" in s["names"]:
        return _torch_loop_stack(s, x, h0, c0, masks, *weights)
    if "ln_gates_weight_l0" in s["names"]:
        return _torch_ln_lstm_stack(s, x, h0, c0, masks, *weights)
    if s["mode"].startswith("CTRNN"):
        return _torch_ctrnn_stack(s, x, h0, c0, masks, *weights)
    if s.get("cell_options") or s["mode"] == "GRU_RESET_BEFORE":  # torch has no such GRU
        return _torch_loop_stack(s, x, h0, c0, masks, *weights)
    is_lstm = s["mode"] == "LSTM"
    D = 2 if s["bidirectional"] else 1
    per_layer = len(weights) // s["num_layers"]
    T, N = x.shape[0], x.shape[1]
    rows = s["rows"]  # packed: the (t, n) rows of x that are inside their sequence
    h_n, c_n = [], []
    layer_input = x
    for layer in range(s["num_layers"]):
        if layer > 0 and masks.numel():
            layer_input = layer_input * masks[layer - 1]
        w = list(weights[layer * per_layer:(layer + 1) * per_layer])
        hx = h0[layer * D:(layer + 1) * D]
        if is_lstm:
            hx = (hx, c0[layer * D:(layer + 1) * D])
        if rows is None:
            result = _VF_LAYER[s["mode"]](layer_input, hx, w, s["bias"], 1, 0.0, False,
                                          s["bidirectional"], False)
            layer_output = result[0]
        else:
            data = layer_input.reshape(T * N, -1).index_select(0, rows)
            result = _VF_LAYER[s["mode"]](data, s["batch_sizes"], hx, w, s["bias"], 1, 0.0,
                                          False, s["bidirectional"])
            layer_output = data.new_zeros(T * N, result[0].shape[1]).index_copy(
                0, rows, result[0]).view(T, N, -1)
        h_n.append(result[1])
        if is_lstm:
            c_n.append(result[2])
        layer_input = layer_output
    return layer_input, torch.cat(h_n), (torch.cat(c_n) if is_lstm else None)


def _torch_loop_forward(self, input, hx, stack, given=None):
    """A variant's forward as a loop of torch ops (``stack``: _torch_loop_stack,
    _torch_ctrnn_stack or _torch_ln_lstm_stack), for what the kernels do not take; the layouts and checks of
    nn.LSTM / nn.RNN.forward."""
    is_lstm = self.mode == "LSTM"
    if torch.jit.is_tracing() and torch.onnx.is_in_onnx_export():
        warnings.warn(
            f"{type(self).__name__}: torch's TorchScript-based ONNX exporter records this "
            "layer's loop unrolled at the example input's number of steps; the exported "
            "graph computes inputs of that length only (longer ones lose their last steps). "
            "Export with the example length you will run, or with dynamo=True, whose graph "
            "holds that length fixed", UserWarning, stacklevel=3)
    packed = isinstance(input, PackedSequence)
    if packed:
        x, lengths = torch.nn.utils.rnn.pad_packed_sequence(input)  # the callers' row order
        batched = True
    else:
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1 - int(self.batch_first))
        if hx is not None:
            unsqueezed = (tuple(h if batched else h.unsqueeze(1) for h in hx) if is_lstm
                          else hx if batched else hx.unsqueeze(1))
            self.check_forward_args(x, unsqueezed, None)
        if self.batch_first:
            x = x.transpose(0, 1)
        lengths = None
    D = 2 if self.bidirectional else 1
    T, N = x.shape[:2]
    H_out = self.proj_size if self.proj_size > 0 else self.hidden_size
    if hx is None:
        h0 = x.new_zeros(D * self.num_layers, N, H_out)
        c0 = x.new_zeros(D * self.num_layers, N, self.hidden_size) if is_lstm else None
    else:
        h0, c0 = hx if is_lstm else (hx, None)
        if not batched:
            h0, c0 = h0.unsqueeze(1), (c0.unsqueeze(1) if is_lstm else None)
    masks = x.new_empty(0)
    if self.training and self.dropout > 0 and self.num_layers > 1:
        keep = 1.0 - self.dropout
        masks = x.new_full((self.num_layers - 1, T, N, D * H_out), keep).bernoulli() / keep
    weights, names, _ = self._lstmfast_weights()
    settings = {"mode": self._lstmfast_mode, "names": names, "num_layers": self.num_layers,
                "bidirectional": self.bidirectional, "bias": self.bias,
                "proj_size": self.proj_size, "lengths": lengths,
                "cell_options": self._lstmfast_cell_options(T, N, x, given),
                "packed_positions": input.unsorted_indices if packed else None}
    out, h_n, c_n = stack(settings, x, h0, c0, masks, *weights)
    state = (h_n, c_n) if is_lstm else h_n
    if packed:
        data = torch.cat([out[t, input.sorted_indices[:int(size)]] if input.sorted_indices is not None
                          else out[t, :int(size)] for t, size in enumerate(input.batch_sizes)])
        return PackedSequence(data, input.batch_sizes, input.sorted_indices,
                              input.unsorted_indices), state
    if not batched:
        return out.squeeze(1), ((h_n.squeeze(1), c_n.squeeze(1)) if is_lstm else h_n.squeeze(1))
    return (out.transpose(0, 1) if self.batch_first else out), state


_VF_CELL = {"LSTM": _VF.lstm_cell, "GRU": _VF.gru_cell, "RNN_TANH": _VF.rnn_tanh_cell,
            "RNN_RELU": _VF.rnn_relu_cell}


def _torch_cell(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
    """One step of ``_CellFunction`` with torch's own kernels (for double backward)."""
    if mode == "LSTM":
        return _VF.lstm_cell(x, (h0, c0), w_ih, w_hh, b_ih, b_hh)
    return _VF_CELL[mode](x, h0, w_ih, w_hh, b_ih, b_hh), None
