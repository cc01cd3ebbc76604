"""Pure-NumPy reference implementation of LSTM, GRU and Elman-RNN layers.

This module is the specification the C++ kernels are tested and benchmarked
against. It is written to be read side by side with the equations in the
torch.nn documentation, so it favours plain code over speed: one loop over time
steps, one cell step per iteration, masks for sequence lengths. It imports NumPy
and nothing else. It stays one file, longer than the package's others, so that the
whole specification (every cell's forward and backward side by side, the stack
around them) reads top to bottom and stays independent of the code it checks.

Letters used for shapes everywhere:
    T  time steps            N  batch size          I  input features
    H  hidden units          P  projection size     H_out = P if P > 0 else H
    D  directions (1 or 2)   L  layers              G  gates: 4 LSTM, 3 GRU, 1 RNN

Conventions:
* Arrays are time-major: x is (T, N, I), outputs are (T, N, D*H_out).
* Weights are in torch's layout and gate order, so a row batch times a weight is
  ``x @ W_ih.T``:  W_ih (G*H, I), W_hh (G*H, H_out), b_ih and b_hh (G*H,),
  W_hr (P, H). Gate blocks along G*H: LSTM (i, f, g, o), GRU (r, z, n).
* The gradient of ``name`` is called ``dname`` (dh, dW_hh).
* Backward functions RETURN gradients of their inputs and ADD gradients of
  parameters into the arrays they are given; the caller zeroes those.
* Everything is computed in the dtype of x: float32 stays float32.

Layout of the file: one ``*_cell_forward`` / ``*_cell_backward`` pair per cell
(one time step), then ``_layer_direction_forward`` / ``_backward`` (one cell
over the whole sequence, with lengths and time reversal), then ``forward`` /
``backward`` (the stack of layers and directions, with dropout between layers),
then the parameter shapes and initialisation.
"""

import numpy as np

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU", "CTRNN_TANH", "CTRNN_RELU", "LN_LSTM",
         "GRU_RESET_BEFORE")

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1, "CTRNN_TANH": 1, "CTRNN_RELU": 1,
         "LN_LSTM": 4, "GRU_RESET_BEFORE": 3}

#: The modes whose state is a pair (h, c).
CELL_STATE_MODES = ("LSTM", "LN_LSTM")

#: The continuous-time RNN's modes (ctrnn_cell_forward), by nonlinearity.
CTRNN_MODES = {"tanh": "CTRNN_TANH", "relu": "CTRNN_RELU"}


# ----------------------------------------------------------------------------
# Small helpers


def sigmoid(a):
    """1 / (1 + exp(-a)), written through tanh so that it never overflows."""
    return 0.5 * (1.0 + np.tanh(0.5 * a))


def _linear(x, W, b):
    """x W^T + b (b may be None: a layer built with bias=False). W may be reduced."""
    y = times_transposed(x, W)
    if b is not None:
        y = y + b
    return y


def _linear_backward(dy, x, W, dW, db):
    """Backward of y = x W^T + b: adds dW += dy^T x and db += sum_n dy; returns dx."""
    dW += product(dy.T, x)
    if db is not None:
        db += dy.sum(axis=0)
    return product(dy, W)


def _recurrent_input(h, w):
    """h as the recurrent product h W_hh^T sees it: times the layer-direction's
    recurrent dropout mask w["rec_mask"] (N, H_out) when there is one (docs/cells.md, Recurrent dropout and zoneout:
    one mask shared by all gates, kept for the whole sequence)."""
    mask = w.get("rec_mask")
    return h if mask is None else h * mask


def _recurrent_input_backward(dh_rec, w):
    """The gradient of h from that of _recurrent_input(h, w)."""
    mask = w.get("rec_mask")
    return dh_rec if mask is None else dh_rec * mask


# ----------------------------------------------------------------------------
# Activations and clip (docs/cells.md, Activations, clip and the coupled gates)
#
# The LSTM, GRU and RNN cells take their activations from w["activations"]: one
# (name, alpha, beta) triple per role, in ONNX's letters: f (the gates: LSTM i, f, o;
# GRU r, z; the RNN's only one), g (LSTM's cell input, GRU's n) and h (LSTM's
# output of c). torch's cells are the defaults below. w["clip"] (None or a number
# c > 0) bounds every pre-activation of f and g to [-c, c] before the activation;
# h's input c_t is not bounded (as ONNX Runtime computes it).


def _hard_sigmoid(a, alpha, beta):
    return np.clip(alpha * a + beta, 0, 1)


#: name -> (y = function(a, alpha, beta), dy/da = derivative(a, y, alpha, beta)).
#: ONNX's names, lower case; each derivative is written from what is cheapest.
ACTIVATIONS = {
    "sigmoid": (lambda a, al, be: sigmoid(a), lambda a, y, al, be: y * (1 - y)),
    "tanh": (lambda a, al, be: np.tanh(a), lambda a, y, al, be: 1 - y * y),
    # relu's derivative is 1 where a is NaN, as torch's relu passes the gradient there
    "relu": (lambda a, al, be: np.maximum(a, 0), lambda a, y, al, be: ((a > 0) | np.isnan(a)).astype(a.dtype)),
    "affine": (lambda a, al, be: al * a + be, lambda a, y, al, be: np.full_like(a, al)),
    "leakyrelu": (lambda a, al, be: np.where(a >= 0, a, al * a),
                  lambda a, y, al, be: np.where(a >= 0, 1, al).astype(a.dtype)),
    "thresholdedrelu": (lambda a, al, be: np.where(a > al, a, 0).astype(a.dtype),
                        lambda a, y, al, be: (a > al).astype(a.dtype)),
    "scaledtanh": (lambda a, al, be: al * np.tanh(be * a),
                   lambda a, y, al, be: al * be * (1 - np.tanh(be * a) ** 2)),
    "hardsigmoid": (_hard_sigmoid,
                    lambda a, y, al, be: np.where((y > 0) & (y < 1), al, 0).astype(a.dtype)),
    "elu": (lambda a, al, be: np.where(a >= 0, a, al * np.expm1(np.minimum(a, 0))),
            lambda a, y, al, be: np.where(a >= 0, 1, al * np.exp(np.minimum(a, 0))).astype(a.dtype)),
    "softsign": (lambda a, al, be: a / (1 + np.abs(a)),
                 lambda a, y, al, be: 1 / (1 + np.abs(a)) ** 2),
    "softplus": (lambda a, al, be: np.logaddexp(0, a).astype(a.dtype),
                 lambda a, y, al, be: sigmoid(a)),
}

#: The activations each mode takes (f, g, h as the cell has them), and torch's choice.
DEFAULT_ACTIVATIONS = {
    "LSTM": ("sigmoid", "tanh", "tanh"),
    "GRU": ("sigmoid", "tanh"),
    "GRU_RESET_BEFORE": ("sigmoid", "tanh"),
    "RNN_TANH": ("tanh",),
    "RNN_RELU": ("relu",),
}

#: ONNX Runtime's alpha and beta where a node gives none: 0 unless listed here.
ACTIVATION_DEFAULTS = {"leakyrelu": (0.01, 0.0), "hardsigmoid": (0.2, 0.5), "elu": (1.0, 0.0)}

#: The activations that read alpha, beta (the others ignore them).
ACTIVATION_PARAMETERS = {"affine": (True, True), "leakyrelu": (True, False),
                         "thresholdedrelu": (True, False), "scaledtanh": (True, True),
                         "hardsigmoid": (True, True), "elu": (True, False)}


def resolve_activation(entry):
    """One activation as a (name, alpha, beta) triple, from a name or (name, alpha) or
    (name, alpha, beta), where a None or missing alpha or beta takes ONNX Runtime's
    default."""
    entry = (entry,) if isinstance(entry, str) else tuple(entry)
    if not 1 <= len(entry) <= 3:
        raise ValueError(f"activations: expected a name or (name, alpha, beta), got {entry!r}")
    name, alpha, beta = entry + (None,) * (3 - len(entry))
    if not isinstance(name, str) or name.lower() not in ACTIVATIONS:
        raise ValueError(f"activations: {name!r} is not one of {sorted(ACTIVATIONS)}")
    name = name.lower()
    alpha_default, beta_default = ACTIVATION_DEFAULTS.get(name, (0.0, 0.0))
    return (name, alpha_default if alpha is None else float(alpha),
            beta_default if beta is None else float(beta))


def resolve_activations(mode, activations=None):
    """The (name, alpha, beta) triples of ``mode``'s roles: ``activations`` (what
    resolve_activation takes, one per role) checked, or torch's when None."""
    default = DEFAULT_ACTIVATIONS.get(mode)
    if activations is None:
        activations = default or ()
    elif default is None:
        raise ValueError(f"activations: {mode} takes none (only LSTM, GRU and RNN do)")
    activations = tuple(activations)
    if len(activations) != len(default or ()):
        raise ValueError(f"activations: {mode} takes {len(default)} ({', '.join(default)}), "
                         f"got {len(activations)}")
    return tuple(resolve_activation(entry) for entry in activations)


def _activate(w, role, a, clipped=True):
    """y = activation ``role`` (0 f, 1 g, 2 h) of a, a bounded by w["clip"] first."""
    name, alpha, beta = w["activations"][role]
    if clipped and w["clip"] is not None:
        a = np.clip(a, -w["clip"], w["clip"])
    return ACTIVATIONS[name][0](a, alpha, beta)


def _activate_prime(w, role, a, y, clipped=True):
    """dy/da of y = _activate(w, role, a): zero where the clip bounded a."""
    name, alpha, beta = w["activations"][role]
    clip = w["clip"] if clipped else None
    if clip is None:
        return ACTIVATIONS[name][1](a, y, alpha, beta)
    return ACTIVATIONS[name][1](np.clip(a, -clip, clip), y, alpha, beta) * (np.abs(a) <= clip)


# ----------------------------------------------------------------------------
# LSTM cell
#
# The cell weights ``w`` are a dict with keys W_ih, W_hh, b_ih, b_hh, W_hr and
# P_i, P_f, P_o (a bias is None when bias=False, W_hr is None without projection,
# the peephole vectors are None without peepholes); the parameter gradients ``dw``
# are a dict with the same keys (see _cell_weights).


def lstm_cell_forward(x, h, c, w):
    """One LSTM step.

    x: (N, I) input;  h: (N, H_out) previous hidden state;  c: (N, H) previous cell state.
    Returns h_next (N, H_out), c_next (N, H) and the cache for lstm_cell_backward.

        gates  = x W_ih^T + b_ih + h W_hh^T + b_hh        (N, 4H), blocks i, f, g, o
        i, f, o = sigmoid(.)      g = tanh(.)
        c_next = f * c + i * g
        m      = o * tanh(c_next)
        h_next = m W_hr^T  with projection (P > 0), else m

    With peepholes (w["P_i"], w["P_f"], w["P_o"], each (H,): the ONNX and TensorFlow
    form), i and f also see the previous cell state and o the new one:
        i = sigmoid(gates_i + P_i * c)    f = sigmoid(gates_f + P_f * c)
        o = sigmoid(gates_o + P_o * c_next)
    ONNX's options (w["activations"], w["clip"], w["input_forget"]): sigmoid is the
    activation f, the first tanh g, the second h; every pre-activation of i, f, g and
    o (peepholes included) is clipped; with input_forget (the coupled gates) f = 1 - i.
    """
    H = c.shape[1]
    peephole = w.get("P_i") is not None
    h_rec = _recurrent_input(h, w)
    gates = _linear(x, w["W_ih"], w["b_ih"]) + _linear(h_rec, w["W_hh"], w["b_hh"])
    a_i, a_f, a_g = gates[:, 0 * H:1 * H], gates[:, 1 * H:2 * H], gates[:, 2 * H:3 * H]
    if peephole:
        a_i, a_f = a_i + w["P_i"] * c, a_f + w["P_f"] * c
    i = _activate(w, 0, a_i)
    f = 1 - i if w["input_forget"] else _activate(w, 0, a_f)
    g = _activate(w, 1, a_g)
    c_next = f * c + i * g
    a_o = gates[:, 3 * H:4 * H]
    if peephole:
        a_o = a_o + w["P_o"] * c_next
    o = _activate(w, 0, a_o)
    h_c_next = _activate(w, 2, c_next, clipped=False)
    m = o * h_c_next
    h_next = m if w["W_hr"] is None else times_transposed(m, w["W_hr"])
    cache = (x, h_rec, c, i, f, g, o, c_next, h_c_next, m, (a_i, a_f, a_g, a_o))
    return h_next, c_next, cache


def lstm_cell_backward(dh_next, dc_next, cache, w, dw):
    """Backward of lstm_cell_forward.

    dh_next: (N, H_out), dc_next: (N, H) gradients of the loss w.r.t. h_next and c_next.
    Adds dW_ih, dW_hh, db_ih, db_hh, dW_hr (and dP_i, dP_f, dP_o) into dw; returns
    dx (N, I), dh (N, H_out), dc (N, H).
    Derivatives are written from the saved activations (sigmoid' = s (1 - s), tanh' =
    1 - t^2: _activate_prime). With peepholes, o's pre-activation depends on c_next, so
    its gradient is taken first and flows into dc_next; i's and f's depend on c and
    flow into dc. With input_forget, f = 1 - i passes its gradient to i, negated.
    """
    x, h_rec, c, i, f, g, o, c_next, h_c_next, m, (a_i, a_f, a_g, a_o) = cache
    peephole = w.get("P_i") is not None
    if w["W_hr"] is None:
        dm = dh_next
    else:
        dm = product(dh_next, w["W_hr"])
        dw["W_hr"] += product(dh_next.T, m)
    da_o = dm * h_c_next * _activate_prime(w, 0, a_o, o)
    dc_next = dc_next + dm * o * _activate_prime(w, 2, c_next, h_c_next, clipped=False)
    if peephole:
        dc_next = dc_next + da_o * w["P_o"]
    di = dc_next * g
    if w["input_forget"]:
        di = di - dc_next * c
        da_f = np.zeros_like(di)
    else:
        da_f = dc_next * c * _activate_prime(w, 0, a_f, f)
    da_i = di * _activate_prime(w, 0, a_i, i)
    da_g = dc_next * i * _activate_prime(w, 1, a_g, g)
    dc = dc_next * f
    if peephole:
        dc = dc + da_i * w["P_i"] + da_f * w["P_f"]
        dw["P_i"] += (da_i * c).sum(axis=0)
        dw["P_f"] += (da_f * c).sum(axis=0)
        dw["P_o"] += (da_o * c_next).sum(axis=0)
    dgates = np.concatenate([da_i, da_f, da_g, da_o], axis=1)
    dx = _linear_backward(dgates, x, w["W_ih"], dw["W_ih"], dw["b_ih"])
    dh = _recurrent_input_backward(
        _linear_backward(dgates, h_rec, w["W_hh"], dw["W_hh"], dw["b_hh"]), w)
    return dx, dh, dc


# ----------------------------------------------------------------------------
# Layer-normalized LSTM cell (docs/cells.md, Layer-normalized LSTM: torchaudio's RNN-T form)


def layer_norm(a, weight, bias, eps):
    """nn.LayerNorm over the last axis: returns the output, the normalized a (z-hat)
    and 1 / sqrt(var + eps) (biased variance), which backward needs."""
    mean = a.mean(axis=-1, keepdims=True)
    centered = a - mean
    rstd = 1.0 / np.sqrt((centered * centered).mean(axis=-1, keepdims=True) + eps)
    z = centered * rstd
    return z * weight + bias, z, rstd


def layer_norm_backward(dy, z, rstd, weight, dweight, dbias):
    """Backward of layer_norm: adds dweight, dbias; returns the gradient of a."""
    dweight += (dy * z).sum(axis=0)
    dbias += dy.sum(axis=0)
    gy = dy * weight
    return rstd * (gy - gy.mean(axis=-1, keepdims=True)
                   - z * (gy * z).mean(axis=-1, keepdims=True))


def ln_lstm_cell_forward(x, h, c, w):
    """One step of the layer-normalized LSTM of torchaudio's RNN-T (_CustomLSTM with
    layer_norm=True): no linear biases, one LayerNorm over all 4H gate
    pre-activations, one over the new cell state, which is what is carried.

        gates  = LN_g(x W_ih^T + h W_hh^T)                   (N, 4H), blocks i, f, g, o
        i, f, o = sigmoid(.)      g = tanh(.)
        c_next = LN_c(f * c + i * g)
        h_next = o * tanh(c_next)

    LN_g has weight w["ln_g_w"] and bias w["ln_g_b"] (4H,); LN_c w["ln_c_w"], w["ln_c_b"]
    (H,); both w["eps"]. Returns h_next, c_next (N, H) and the cache.
    """
    H = c.shape[1]
    h_rec = _recurrent_input(h, w)
    a = times_transposed(x, w["W_ih"]) + times_transposed(h_rec, w["W_hh"])
    gates, z_g, rstd_g = layer_norm(a, w["ln_g_w"], w["ln_g_b"], w["eps"])
    i = sigmoid(gates[:, 0 * H:1 * H])
    f = sigmoid(gates[:, 1 * H:2 * H])
    g = np.tanh(gates[:, 2 * H:3 * H])
    o = sigmoid(gates[:, 3 * H:4 * H])
    c_next, z_c, rstd_c = layer_norm(f * c + i * g, w["ln_c_w"], w["ln_c_b"], w["eps"])
    tanh_c_next = np.tanh(c_next)
    h_next = o * tanh_c_next
    cache = (x, h_rec, c, i, f, g, o, tanh_c_next, z_g, rstd_g, z_c, rstd_c)
    return h_next, c_next, cache


def ln_lstm_cell_backward(dh_next, dc_next, cache, w, dw):
    """Backward of ln_lstm_cell_forward: adds dW_ih, dW_hh and the four layer-norm
    gradients into dw; returns dx (N, I), dh (N, H), dc (N, H)."""
    x, h_rec, c, i, f, g, o, tanh_c_next, z_g, rstd_g, z_c, rstd_c = cache
    da_o = dh_next * tanh_c_next * o * (1 - o)
    dc_next = dc_next + dh_next * o * (1 - tanh_c_next * tanh_c_next)
    dc_raw = layer_norm_backward(dc_next, z_c, rstd_c, w["ln_c_w"], dw["ln_c_w"], dw["ln_c_b"])
    da_i = dc_raw * g * i * (1 - i)
    da_f = dc_raw * c * f * (1 - f)
    da_g = dc_raw * i * (1 - g * g)
    dc = dc_raw * f
    dgates = np.concatenate([da_i, da_f, da_g, da_o], axis=1)
    da = layer_norm_backward(dgates, z_g, rstd_g, w["ln_g_w"], dw["ln_g_w"], dw["ln_g_b"])
    dx = _linear_backward(da, x, w["W_ih"], dw["W_ih"], None)
    dh = _recurrent_input_backward(_linear_backward(da, h_rec, w["W_hh"], dw["W_hh"], None), w)
    return dx, dh, dc


# ----------------------------------------------------------------------------
# GRU cell


def gru_cell_forward(x, h, w):
    """One GRU step (torch's variant: the reset gate multiplies W_hn h + b_hn).

    x: (N, I) input;  h: (N, H) previous hidden state.
    Returns h_next (N, H) and the cache for gru_cell_backward.

        gi = x W_ih^T + b_ih,  gh = h W_hh^T + b_hh       (N, 3H) each, blocks r, z, n
        r  = sigmoid(gi_r + gh_r)
        z  = sigmoid(gi_z + gh_z)
        n  = tanh(gi_n + r * gh_n)
        h_next = (1 - z) * n + z * h

    ONNX's options (w["activations"], w["clip"]): sigmoid is the activation f, tanh
    g; the pre-activations of r, z and n are clipped.
    """
    H = h.shape[1]
    gi = _linear(x, w["W_ih"], w["b_ih"])
    h_rec = _recurrent_input(h, w)
    gh = _linear(h_rec, w["W_hh"], w["b_hh"])
    a_r = gi[:, 0 * H:1 * H] + gh[:, 0 * H:1 * H]
    a_z = gi[:, 1 * H:2 * H] + gh[:, 1 * H:2 * H]
    r, z = _activate(w, 0, a_r), _activate(w, 0, a_z)
    gh_n = gh[:, 2 * H:3 * H]
    a_n = gi[:, 2 * H:3 * H] + r * gh_n
    n = _activate(w, 1, a_n)
    h_next = (1 - z) * n + z * h
    cache = (x, h, h_rec, r, z, n, gh_n, (a_r, a_z, a_n))
    return h_next, cache


def gru_cell_backward(dh_next, cache, w, dw):
    """Backward of gru_cell_forward.

    dh_next: (N, H) gradient of the loss w.r.t. h_next.
    Adds dW_ih, dW_hh, db_ih, db_hh into dw; returns dx (N, I), dh (N, H).
    """
    x, h, h_rec, r, z, n, gh_n, (a_r, a_z, a_n) = cache
    dn = dh_next * (1 - z)
    dz = dh_next * (h - n)
    dh = dh_next * z
    da_n = dn * _activate_prime(w, 1, a_n, n)           # gradient w.r.t. the argument of tanh
    da_r = da_n * gh_n * _activate_prime(w, 0, a_r, r)  # ... of the sigmoid giving r
    da_z = dz * _activate_prime(w, 0, a_z, z)           # ... of the sigmoid giving z
    dgi = np.concatenate([da_r, da_z, da_n], axis=1)
    dgh = np.concatenate([da_r, da_z, da_n * r], axis=1)
    dx = _linear_backward(dgi, x, w["W_ih"], dw["W_ih"], dw["b_ih"])
    dh = dh + _recurrent_input_backward(
        _linear_backward(dgh, h_rec, w["W_hh"], dw["W_hh"], dw["b_hh"]), w)
    return dx, dh


def gru_reset_before_cell_forward(x, h, w):
    """One step of the GRU of the original paper (Cho et al., 2014): the reset gate
    multiplies h before W_hn, as ONNX's GRU with ``linear_before_reset=0`` and Keras's
    ``reset_after=False`` define it.

    x: (N, I) input;  h: (N, H) previous hidden state.
    Returns h_next (N, H) and the cache for gru_reset_before_cell_backward.

        gi = x W_ih^T + b_ih                              (N, 3H), blocks r, z, n
        r  = sigmoid(gi_r + h W_hr^T + b_hr)              (W_hr, W_hz, W_hn: the blocks of W_hh)
        z  = sigmoid(gi_z + h W_hz^T + b_hz)
        n  = tanh(gi_n + (r * h) W_hn^T + b_hn)
        h_next = (1 - z) * n + z * h

    With recurrent dropout the mask multiplies h in all three products (so n sees
    r * (mask * h)); the update z * h takes h itself. ONNX's options as gru_cell_forward.
    """
    H = h.shape[1]
    W_hh, b_hh = w["W_hh"], w["b_hh"]
    gi = _linear(x, w["W_ih"], w["b_ih"])
    h_rec = _recurrent_input(h, w)
    gh_rz = _linear(h_rec, W_hh[:2 * H], None if b_hh is None else b_hh[:2 * H])
    a_r = gi[:, 0 * H:1 * H] + gh_rz[:, 0 * H:1 * H]
    a_z = gi[:, 1 * H:2 * H] + gh_rz[:, 1 * H:2 * H]
    r, z = _activate(w, 0, a_r), _activate(w, 0, a_z)
    rh = r * h_rec
    a_n = gi[:, 2 * H:3 * H] + _linear(rh, W_hh[2 * H:], None if b_hh is None else b_hh[2 * H:])
    n = _activate(w, 1, a_n)
    h_next = (1 - z) * n + z * h
    cache = (x, h, h_rec, r, z, n, rh, (a_r, a_z, a_n))
    return h_next, cache


def gru_reset_before_cell_backward(dh_next, cache, w, dw):
    """Backward of gru_reset_before_cell_forward.

    dh_next: (N, H) gradient of the loss w.r.t. h_next.
    Adds dW_ih, dW_hh, db_ih, db_hh into dw; returns dx (N, I), dh (N, H).
    """
    x, h, h_rec, r, z, n, rh, (a_r, a_z, a_n) = cache
    H = h.shape[1]
    W_hh, dW_hh, db_hh = w["W_hh"], dw["W_hh"], dw["b_hh"]
    da_n = dh_next * (1 - z) * _activate_prime(w, 1, a_n, n)  # gradient w.r.t. the argument of tanh
    da_z = dh_next * (h - n) * _activate_prime(w, 0, a_z, z)  # ... of the sigmoid giving z
    drh = _linear_backward(da_n, rh, W_hh[2 * H:], dW_hh[2 * H:],
                           None if db_hh is None else db_hh[2 * H:])
    da_r = drh * h_rec * _activate_prime(w, 0, a_r, r)        # ... of the sigmoid giving r
    dx = _linear_backward(np.concatenate([da_r, da_z, da_n], axis=1), x, w["W_ih"], dw["W_ih"],
                          dw["b_ih"])
    dh_rec = drh * r + _linear_backward(np.concatenate([da_r, da_z], axis=1), h_rec,
                                        W_hh[:2 * H], dW_hh[:2 * H],
                                        None if db_hh is None else db_hh[:2 * H])
    dh = dh_next * z + _recurrent_input_backward(dh_rec, w)
    return dx, dh


# ----------------------------------------------------------------------------
# Elman RNN cell


def rnn_cell_forward(x, h, w):
    """One Elman RNN step.

    x: (N, I) input;  h: (N, H) previous hidden state.
    Returns h_next (N, H) and the cache for rnn_cell_backward.

        h_next = act(x W_ih^T + b_ih + h W_hh^T + b_hh)

    act is w["activations"]'s only one: tanh (RNN_TANH), relu (RNN_RELU) or ONNX's
    choice, its input clipped with w["clip"].
    """
    h_rec = _recurrent_input(h, w)
    a = _linear(x, w["W_ih"], w["b_ih"]) + _linear(h_rec, w["W_hh"], w["b_hh"])
    h_next = _activate(w, 0, a)
    cache = (x, h_rec, a, h_next)
    return h_next, cache


def rnn_cell_backward(dh_next, cache, w, dw):
    """Backward of rnn_cell_forward.

    dh_next: (N, H) gradient of the loss w.r.t. h_next.
    Adds dW_ih, dW_hh, db_ih, db_hh into dw; returns dx (N, I), dh (N, H).
    """
    x, h_rec, a, h_next = cache
    da = dh_next * _activate_prime(w, 0, a, h_next)
    dx = _linear_backward(da, x, w["W_ih"], dw["W_ih"], dw["b_ih"])
    dh = _recurrent_input_backward(_linear_backward(da, h_rec, w["W_hh"], dw["W_hh"], dw["b_hh"]), w)
    return dx, dh


# ----------------------------------------------------------------------------
# Continuous-time (leaky) RNN cell (docs/cells.md, Continuous-time RNN)


def ctrnn_cell_forward(x, h, w, nonlinearity, alpha, leak, noise=None):
    """One step of a continuous-time RNN, Euler-discretized with alpha = dt / tau.

    x: (N, I);  h: (N, H);  nonlinearity: "tanh" or "relu";  alpha in (0, 1];
    leak: "outside" or "inside";  noise: (N, H) added to the state, or None.
    With z = x W_ih^T + b_ih + h W_hh^T + b_hh (the Elman RNN's pre-activation):

        leak="outside":  h_next = (1 - alpha) h + alpha act(z) + noise
        leak="inside":   h_next = act((1 - alpha) h + alpha z + noise)

    Returns h_next (N, H) and the cache for ctrnn_cell_backward.
    """
    act = np.tanh if nonlinearity == "tanh" else (lambda v: np.maximum(v, 0))
    h_rec = _recurrent_input(h, w)
    z = _linear(x, w["W_ih"], w["b_ih"]) + _linear(h_rec, w["W_hh"], w["b_hh"])
    noise = 0 if noise is None else noise
    if leak == "outside":
        a = act(z)
        h_next = (1 - alpha) * h + alpha * a + noise
    else:
        a = h_next = act((1 - alpha) * h + alpha * z + noise)
    # a is act() of the step's argument: act' is taken from it in backward
    cache = (x, h_rec, a, nonlinearity, alpha, leak)
    return h_next, cache


def ctrnn_cell_backward(dh_next, cache, w, dw):
    """Backward of ctrnn_cell_forward (the noise is added, so it plays no part).

    dh_next: (N, H). Adds dW_ih, dW_hh, db_ih, db_hh into dw; returns dx (N, I), dh (N, H).
    """
    x, h_rec, a, nonlinearity, alpha, leak = cache
    act_prime = (1 - a * a) if nonlinearity == "tanh" else (a > 0) | np.isnan(a)  # relu: as ACTIVATIONS'
    if leak == "outside":  # h_next = (1 - alpha) h + alpha act(z)
        dz = alpha * dh_next * act_prime
        dh_leak = (1 - alpha) * dh_next
    else:  # h_next = act(u), u = (1 - alpha) h + alpha z
        du = dh_next * act_prime
        dz = alpha * du
        dh_leak = (1 - alpha) * du
    dx = _linear_backward(dz, x, w["W_ih"], dw["W_ih"], dw["b_ih"])
    dh = dh_leak + _recurrent_input_backward(
        _linear_backward(dz, h_rec, w["W_hh"], dw["W_hh"], dw["b_hh"]), w)
    return dx, dh


# ----------------------------------------------------------------------------
# One cell over time: one direction of one layer


def _cell_step_forward(mode, x, h, c, w, noise=None):
    """One step of the cell of `mode`; returns h_next, c_next (None unless LSTM), cache.
    noise: a CTRNN's (N, H) noise of this step, or None."""
    if mode == "LSTM":
        return lstm_cell_forward(x, h, c, w)
    if mode == "LN_LSTM":
        return ln_lstm_cell_forward(x, h, c, w)
    if mode == "GRU":
        h_next, cache = gru_cell_forward(x, h, w)
    elif mode == "GRU_RESET_BEFORE":
        h_next, cache = gru_reset_before_cell_forward(x, h, w)
    elif mode in ("CTRNN_TANH", "CTRNN_RELU"):
        h_next, cache = ctrnn_cell_forward(x, h, w, "tanh" if mode == "CTRNN_TANH" else "relu",
                                           w["alpha"], w["leak"], noise)
    else:
        h_next, cache = rnn_cell_forward(x, h, w)
    return h_next, None, cache


def _cell_step_backward(mode, dh_next, dc_next, cache, w, dw):
    """Backward of _cell_step_forward; returns dx, dh, dc (None unless LSTM)."""
    if mode == "LSTM":
        return lstm_cell_backward(dh_next, dc_next, cache, w, dw)
    if mode == "LN_LSTM":
        return ln_lstm_cell_backward(dh_next, dc_next, cache, w, dw)
    if mode == "GRU":
        dx, dh = gru_cell_backward(dh_next, cache, w, dw)
    elif mode == "GRU_RESET_BEFORE":
        dx, dh = gru_reset_before_cell_backward(dh_next, cache, w, dw)
    elif mode in ("CTRNN_TANH", "CTRNN_RELU"):
        dx, dh = ctrnn_cell_backward(dh_next, cache, w, dw)
    else:
        dx, dh = rnn_cell_backward(dh_next, cache, w, dw)
    return dx, dh, None


def _splitmix64(x):
    """splitmix64 of uint64 values (arrays wrap modulo 2**64)."""
    x = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def zoneout_masks_from_seed(seed, probabilities, LD, T, N, widths):
    """The zoneout masks the fused kernels draw inside themselves from ``seed``
    (``zoneout_seed``), so that backward draws them again instead of storing them: a
    counter-based generator. For layer-direction ld, state which (0 h, 1 c), time t,
    row n (the caller's) and unit j:

        s    = splitmix64(seed + ld)
        key  = low 32 bits of splitmix64(s ^ (which T N + t N + n))
        hash = fmix32(key + j * 0x9E3779B9 mod 2**32)     (MurmurHash3's finalizer)
        mask = 1 (keep the old value) where hash < p * 2**32

    probabilities: (p_h, p_c), each a number or None; widths: (H_out, H).
    Returns (m_h, m_c), each None or (LD, T, N, width) of 0.0 and 1.0.
    """
    masks = []
    with np.errstate(over="ignore"):
        for which, (p, width) in enumerate(zip(probabilities, widths)):
            if p is None:
                masks.append(None)
                continue
            ld = np.arange(LD, dtype=np.uint64)[:, None, None]
            layer = _splitmix64(np.uint64(seed) + ld)
            at = (np.arange(T, dtype=np.uint64)[:, None] * np.uint64(N)
                  + np.arange(N, dtype=np.uint64)[None, :])
            key = (_splitmix64(layer ^ (np.uint64(which * T * N) + at)) & np.uint64(0xFFFFFFFF))
            h = (key[..., None] + np.arange(width, dtype=np.uint64) * np.uint64(0x9E3779B9))
            h &= np.uint64(0xFFFFFFFF)
            h ^= h >> np.uint64(16)
            h = (h * np.uint64(0x85EBCA6B)) & np.uint64(0xFFFFFFFF)
            h ^= h >> np.uint64(13)
            h = (h * np.uint64(0xC2B2AE35)) & np.uint64(0xFFFFFFFF)
            h ^= h >> np.uint64(16)
            if p >= 1:
                masks.append(np.ones(h.shape))
            elif p <= 0:
                masks.append(np.zeros(h.shape))
            else:
                masks.append((h < np.uint64(int(p * 4294967296.0))).astype(np.float64))
    return tuple(masks)


def _zoneout_at(masks, t):
    """Step t's zoneout (m_h, m_c), each None, a number or an (N, width) array."""
    return tuple(m if m is None or np.ndim(m) == 0 else m[t] for m in masks)


def _layer_direction_forward(mode, x, h0, c0, w, lengths, reverse, noise=None,
                             zoneout=(None, None)):
    """Run one cell over the whole sequence.

    x: (T, N, I);  h0: (N, H_out);  c0: (N, H) or None;  lengths: (N,) ints in 1..T.
    reverse: walk t = T-1 down to 0 instead of 0 up to T-1.
    noise: a CTRNN's (T, N, H) noise, step t's at noise[t], or None.
    zoneout: (m_h, m_c) (docs/cells.md, Recurrent dropout and zoneout, ESPnet's convention: 1 keeps the old value),
        each None, a number (eval: the probability itself) or a (T, N, width) array:
            h_t = m_h h_{t-1} + (1 - m_h) h~_t,   c_t = m_c c_{t-1} + (1 - m_c) c~_t
        where h~_t, c~_t are the cell's step from (h_{t-1}, c_{t-1}); h~_t is computed
        from the un-zoned c~_t, and the zoned h_t and c_t are output and carried.
    Sequence b has steps 0..lengths[b]-1 only: at any other step its state is held
    unchanged and its output is 0. So the forward direction ends at its own last step,
    and the reverse direction starts from h0 at its own last step.
    Returns output (T, N, H_out), h_n (N, H_out), c_n (N, H) or None, and the cache.
    """
    T, N, _ = x.shape
    output = np.zeros((T, N, h0.shape[1]), dtype=x.dtype)
    h, c = h0, c0
    steps = []
    for t in (reversed(range(T)) if reverse else range(T)):
        valid = (t < lengths)[:, None]          # (N, 1): which sequences have a step t
        h_next, c_next, cell_cache = _cell_step_forward(
            mode, x[t], h, c, w, None if noise is None else noise[t])
        m_h, m_c = _zoneout_at(zoneout, t)
        if m_h is not None:
            h_next = m_h * h + (1 - m_h) * h_next
        if m_c is not None and c is not None:
            c_next = m_c * c + (1 - m_c) * c_next
        h = np.where(valid, h_next, h)
        if c is not None:
            c = np.where(valid, c_next, c)
        output[t] = np.where(valid, h_next, 0)
        steps.append((t, valid, cell_cache, (m_h, m_c)))
    cache = {"steps": steps, "input_shape": x.shape}
    return output, h, c, cache


def _layer_direction_backward(mode, d_output, dh_n, dc_n, cache, w, dw):
    """Backward of _layer_direction_forward.

    d_output: (T, N, H_out);  dh_n: (N, H_out);  dc_n: (N, H) or None.
    Adds the parameter gradients into dw; returns dx (T, N, I), dh0 (N, H_out), dc0 (N, H) or None.
    Steps are undone in the reverse of the order they were taken. Where a sequence had
    no step, its state was copied through: its gradient is copied back unchanged, and
    the (constant zero) output there receives no gradient. Zoneout splits a step's
    gradient: (1 - m) of it enters the cell, m of it goes straight to the step before.
    """
    dx = np.zeros(cache["input_shape"], dtype=d_output.dtype)
    dh, dc = dh_n, dc_n
    for t, valid, cell_cache, (m_h, m_c) in reversed(cache["steps"]):
        # Rows without a step enter the cell with zero gradients, so they also add
        # nothing to the parameter gradients.
        dh_step = np.where(valid, dh + d_output[t], 0)
        dc_step = None if dc is None else np.where(valid, dc, 0)
        dh_next = dh_step if m_h is None else (1 - m_h) * dh_step
        dc_next = dc_step if (dc_step is None or m_c is None) else (1 - m_c) * dc_step
        dx_t, dh_prev, dc_prev = _cell_step_backward(mode, dh_next, dc_next, cell_cache, w, dw)
        if m_h is not None:
            dh_prev = dh_prev + m_h * dh_step
        if m_c is not None and dc_prev is not None:
            dc_prev = dc_prev + m_c * dc_step
        dx[t] = np.where(valid, dx_t, 0)
        dh = np.where(valid, dh_prev, dh)
        if dc is not None:
            dc = np.where(valid, dc_prev, dc)
    return dx, dh, dc


def _cell_weights(arrays, layer, direction, alpha=1.0, leak="outside", eps=1e-5,
                  activations=(), clip=None, input_forget=False):
    """The arrays of one layer and direction, from a dict keyed by torch's names,
    the CTRNN's constants alpha and leak, the layer norms' eps, and ONNX's options
    (activations: resolve_activations's triples; clip; input_forget).

    Used for params (giving the cell weights w) and for grads (giving dw).
    """
    suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
    return {
        "W_ih": arrays[f"weight_ih{suffix}"],
        "W_hh": arrays[f"weight_hh{suffix}"],
        "b_ih": arrays.get(f"bias_ih{suffix}"),
        "b_hh": arrays.get(f"bias_hh{suffix}"),
        "W_hr": arrays.get(f"weight_hr{suffix}"),
        "P_i": arrays.get(f"weight_ci{suffix}"),
        "P_f": arrays.get(f"weight_cf{suffix}"),
        "P_o": arrays.get(f"weight_co{suffix}"),
        "ln_g_w": arrays.get(f"ln_gates_weight{suffix}"),
        "ln_g_b": arrays.get(f"ln_gates_bias{suffix}"),
        "ln_c_w": arrays.get(f"ln_cell_weight{suffix}"),
        "ln_c_b": arrays.get(f"ln_cell_bias{suffix}"),
        "alpha": alpha,
        "leak": leak,
        "eps": eps,
        "activations": activations,
        "clip": clip,
        "input_forget": input_forget,
    }


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


# ----------------------------------------------------------------------------
# The stack: layers, directions, dropout between layers


def forward(mode, x, hx, params, *, num_layers, bidirectional, proj_size=0,
            lengths=None, dropout_masks=None, training=False, alpha=1.0, leak="outside",
            noise=None, layer_norm_eps=1e-5, recurrent_dropout_masks=None, zoneout_masks=None,
            zoneout_seed=None, activations=None, clip=None, input_forget=False, reverse=False):
    """Forward pass of a stacked (bi)directional LSTM / GRU / RNN, as torch.nn computes it.

    mode: one of MODES.
    x: (T, N, I) float32 or float64.
    hx: LSTM: a pair (h0 (L*D, N, H_out), c0 (L*D, N, H)); others: h0 (L*D, N, H).
        Index layer*D + direction, direction 0 forward, 1 reverse.
    params: dict of torch's names -> arrays of x's dtype: weight_ih_l{k}, weight_hh_l{k},
        bias_ih_l{k}, bias_hh_l{k} (absent when bias=False), weight_hr_l{k} (LSTM with
        proj_size > 0), and the same names with suffix "_reverse" for the reverse direction.
        They are kept by reference in the cache: do not change them before backward.
    lengths: None (all T) or (N,) ints, each in 1..T, in any order. Sequence b has
        steps 0..lengths[b]-1 only (the semantics of a PackedSequence).
    dropout_masks: None or a list of L-1 arrays; mask k, (T, N, D*H_out), multiplies the
        output of layer k before it enters layer k+1. Applied whenever given: the caller
        decides (training mode) and draws them (values 0 or 1/(1-p)).
    training: when True also return the cache that backward needs; else the cache is None.
    alpha, leak, noise: the CTRNN modes' (ctrnn_cell_forward): alpha = dt / tau in (0, 1],
        leak "outside" or "inside", noise None or (L*D, T, N, H), layer-direction k's
        noise at noise[k], added at every step (rows past their length get none).
    layer_norm_eps: LN_LSTM's (ln_lstm_cell_forward), > 0.
    recurrent_dropout_masks: None or (L*D, N, H_out): mask k multiplies h_{t-1} of
        layer-direction k, for every step and gate, where it enters h W_hh^T (values 0 or
        1/(1-p)); applied whenever given, like dropout_masks.
    zoneout_masks: None or a pair (m_h, m_c) (_layer_direction_forward), each None, a
        number in [0, 1] (eval: the zoneout probability) or an (L*D, T, N, width) array
        of 0s and 1s (1 keeps the old value), width H_out for h and H for c (cells with c).
    zoneout_seed: None, or an int: the masks are drawn with the probabilities of
        zoneout_masks (numbers) by zoneout_masks_from_seed, as the fused kernels draw them.
    activations, clip, input_forget: ONNX's options of the LSTM, GRU and RNN modes
        (Activations and clip above): activations None (torch's) or what
        resolve_activations takes; clip None or a number > 0; input_forget (LSTM) True
        couples f = 1 - i.
    reverse: a one-direction stack (bidirectional False) whose every layer walks the
        sequences from their ends, as ONNX's direction="reverse"; output stays in time order.

    Returns (output (T, N, D*H_out), h_n (L*D, N, H_out), c_n (L*D, N, H) or None, cache).
    Output of each direction is concatenated along the last axis, forward first; output
    rows past a sequence's length are exactly 0.
    """
    _check_mode(mode)
    x = np.asarray(x)
    dtype = x.dtype
    T, N, _ = x.shape
    D = 2 if bidirectional else 1
    if mode in CELL_STATE_MODES:
        h0, c0 = hx
        c0 = np.asarray(c0, dtype=dtype)
    else:
        h0, c0 = hx, None
    h0 = np.asarray(h0, dtype=dtype)
    lengths = np.full(N, T) if lengths is None else np.asarray(lengths)
    if mode == "LN_LSTM" and not layer_norm_eps > 0:
        raise ValueError(f"layer_norm_eps must be > 0, got {layer_norm_eps}")
    ctrnn = mode in CTRNN_MODES.values()
    if ctrnn and not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if ctrnn and leak not in ("outside", "inside"):
        raise ValueError(f"leak must be 'outside' or 'inside', got {leak!r}")
    if noise is not None:
        if not ctrnn:
            raise ValueError(f"noise: only a CTRNN takes noise, not {mode}")
        noise = np.asarray(noise, dtype=dtype)
    activations = resolve_activations(mode, activations)
    if clip is not None:
        if mode not in DEFAULT_ACTIVATIONS:
            raise ValueError(f"clip: only LSTM, GRU and RNN modes clip, not {mode}")
        if not clip > 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        clip = float(clip)
    if input_forget and mode != "LSTM":
        raise ValueError(f"input_forget: only the LSTM couples its gates, not {mode}")
    input_forget = bool(input_forget)
    if reverse and bidirectional:
        raise ValueError("reverse: a bidirectional stack already runs both ways")
    reverse = bool(reverse)

    if zoneout_seed is not None:
        if zoneout_masks is None or any(m is not None and np.ndim(m) != 0 for m in zoneout_masks):
            raise ValueError("zoneout_seed: draws masks with the probabilities of zoneout_masks "
                             "(numbers, not arrays)")
        H = (c0 if c0 is not None else h0).shape[2]
        zoneout_masks = zoneout_masks_from_seed(
            zoneout_seed, zoneout_masks, num_layers * (2 if bidirectional else 1), T, N,
            (h0.shape[2], H))
    if zoneout_masks is not None:
        if len(zoneout_masks) != 2:
            raise ValueError("zoneout_masks: expected a pair (m_h, m_c)")
        if zoneout_masks[1] is not None and mode not in CELL_STATE_MODES:
            raise ValueError(f"zoneout_masks: {mode} has no cell state; m_c must be None")
        zoneout_masks = tuple(None if m is None else np.asarray(m, dtype=dtype)
                              for m in zoneout_masks)

    h_n, c_n, layer_caches = [], [], []
    layer_input = x
    for layer in range(num_layers):
        outputs, direction_caches = [], []
        for direction in range(D):
            k = layer * D + direction
            w = _cell_weights(params, layer, direction, alpha, leak, layer_norm_eps,
                              activations, clip, input_forget)
            if recurrent_dropout_masks is not None:
                w["rec_mask"] = np.asarray(recurrent_dropout_masks[k], dtype=dtype)
            zoneout = (None, None) if zoneout_masks is None else tuple(
                m if m is None or m.ndim == 0 else m[k] for m in zoneout_masks)
            output, h, c, direction_cache = _layer_direction_forward(
                mode, layer_input, h0[k], None if c0 is None else c0[k], w, lengths,
                reverse=(direction == 1) != reverse, noise=None if noise is None else noise[k],
                zoneout=zoneout)
            outputs.append(output)
            h_n.append(h)
            c_n.append(c)
            direction_caches.append(direction_cache)
        layer_caches.append(direction_caches)
        layer_output = np.concatenate(outputs, axis=2)
        if dropout_masks is not None and layer < num_layers - 1:
            layer_output = layer_output * np.asarray(dropout_masks[layer], dtype=dtype)
        layer_input = layer_output

    output = layer_input
    h_n = np.stack(h_n)
    c_n = np.stack(c_n) if mode in CELL_STATE_MODES else None
    cache = None
    if training:
        cache = {
            "mode": mode, "num_layers": num_layers, "D": D, "dtype": dtype,
            "alpha": alpha, "leak": leak, "layer_norm_eps": layer_norm_eps,
            "activations": activations, "clip": clip, "input_forget": input_forget,
            "recurrent_dropout_masks": recurrent_dropout_masks,
            "params": params, "dropout_masks": dropout_masks, "layers": layer_caches,
            "h0_shape": h0.shape, "c0_shape": None if c0 is None else c0.shape,
        }
    return output, h_n, c_n, cache


def backward(cache, d_output, d_h_n=None, d_c_n=None, grads=None, consume=False):
    """Backpropagation through time for a forward(..., training=True) call.

    d_output: (T, N, D*H_out);  d_h_n: (L*D, N, H_out) or None (= zeros);
    d_c_n: (L*D, N, H) or None (= zeros; LSTM only).
    grads: dict with the same keys and shapes as params; parameter gradients are ADDED
        into these arrays in place (the caller zeroes them). If None, a zero dict is made.
    consume: the caller will not pass this cache again (a backend may then reuse its
        memory); the reference has nothing to gain and keeps it as it is.
    Returns (dx (T, N, I), dh0 (L*D, N, H_out), dc0 (L*D, N, H) or None, grads).
    """
    if cache is None:
        raise ValueError("backward needs the cache of a forward(..., training=True) call")
    mode, D, dtype = cache["mode"], cache["D"], cache["dtype"]
    params, dropout_masks = cache["params"], cache["dropout_masks"]
    if grads is None:
        grads = {name: np.zeros(np.shape(p), dtype=dtype) for name, p in params.items()}
    d_output = np.asarray(d_output, dtype=dtype)
    d_h_n = (np.zeros(cache["h0_shape"], dtype=dtype) if d_h_n is None
             else np.asarray(d_h_n, dtype=dtype))
    dh0 = np.zeros(cache["h0_shape"], dtype=dtype)
    if mode in CELL_STATE_MODES:
        d_c_n = (np.zeros(cache["c0_shape"], dtype=dtype) if d_c_n is None
                 else np.asarray(d_c_n, dtype=dtype))
        dc0 = np.zeros(cache["c0_shape"], dtype=dtype)
    else:
        dc0 = None
    H_out = cache["h0_shape"][2]

    d_layer_output = d_output
    for layer in reversed(range(cache["num_layers"])):
        direction_caches = cache["layers"][layer]
        d_layer_input = np.zeros(direction_caches[0]["input_shape"], dtype=dtype)
        for direction in range(D):
            k = layer * D + direction
            w = _cell_weights(params, layer, direction, cache["alpha"], cache["leak"],
                              cache["layer_norm_eps"], cache["activations"], cache["clip"],
                              cache["input_forget"])
            if cache["recurrent_dropout_masks"] is not None:
                w["rec_mask"] = np.asarray(cache["recurrent_dropout_masks"][k], dtype=dtype)
            dw = _cell_weights(grads, layer, direction)
            d_direction_output = d_layer_output[:, :, direction * H_out:(direction + 1) * H_out]
            dx, dh, dc = _layer_direction_backward(
                mode, d_direction_output, d_h_n[k], None if dc0 is None else d_c_n[k],
                direction_caches[direction], w, dw)
            d_layer_input += dx
            dh0[k] = dh
            if dc0 is not None:
                dc0[k] = dc
        if dropout_masks is not None and layer > 0:
            d_layer_input = d_layer_input * np.asarray(dropout_masks[layer - 1], dtype=dtype)
        d_layer_output = d_layer_input

    dx = d_layer_output
    return dx, dh0, dc0, grads


# ----------------------------------------------------------------------------
# Reduced precision (inference only: lstmfast.quantize)
#
# A weight W (M, K) in torch's layout may be given to forward as an Int8Weight or a
# BFloat16Weight instead of an array; every product x W^T then goes through
# times_transposed. State, gate math and outputs stay in x's dtype (float32).
#
# int8: W ~ scale[:, None] * q, per output row, symmetric. Each product quantizes
# its left operand per row to 0..127 with a zero point (quantize_activations),
# sums the integer products exactly, and scales back:
#     x W^T ~ (sx[:, None] * sw[None, :]) * ((qx - zx[:, None]) @ q^T)
# 0..127 rather than 0..255 is what the AVX2 kernels can sum without saturating
# (torch's dynamic quantization makes the same choice, reduce_range).
# bfloat16: W and each product's left operand rounded to bfloat16 (the upper 16
# bits of float32, round to nearest even); the product of two bfloat16 values is
# exact in float32, and the products are summed in float32, as AVX512_BF16's
# vdpbf16ps and torch's bfloat16 autocast do. Every instruction set computes this
# (without AVX512_BF16 the kernels widen both operands to float32), so results
# differ between them only by the order of the float32 sums.


class Int8Weight:
    """W ~ scale[:, None] * q: q (M, K) int8, scale (M,) float32 > 0."""

    def __init__(self, q, scale):
        self.q = np.asarray(q, dtype=np.int8)
        self.scale = np.asarray(scale, dtype=np.float32)
        self.shape = self.q.shape

    def __getitem__(self, rows):
        """Rows of W (a slice), each with its own scale."""
        return Int8Weight(self.q[rows], self.scale[rows])


class BFloat16Weight:
    """W in bfloat16, held as its bit patterns: bits (M, K) uint16."""

    def __init__(self, bits):
        self.bits = np.asarray(bits, dtype=np.uint16)
        self.shape = self.bits.shape

    def __getitem__(self, rows):
        """Rows of W (a slice)."""
        return BFloat16Weight(self.bits[rows])


def quantize_int8(W):
    """Per output row symmetric int8: returns q (M, K) int8 and scale (M,) float32 with
    scale = max |W[m]| / 127 (1 for a row of zeros), q = round(W / scale)."""
    W = np.asarray(W, dtype=np.float32)
    if not np.isfinite(W).all():
        raise ValueError("quantize_int8: the weight has values that are not finite")
    peak = np.abs(W).max(axis=1)
    scale = np.where(peak > 0, peak / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(W / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def quantize_activations(a):
    """Rows of a (n, K) float32 as a ~ scale[:, None] * (q - zero[:, None]), q in 0..127.

    Each row's range is widened to include 0, so that 0 is exact: scale = (hi - lo) / 127,
    zero = round(-lo / scale). A row of zeros gets scale 1 and zero 0. A row holding a
    NaN gets the scale NaN (its q and zero from its other values), so that its products
    are NaN, as a float product of that row is.
    Returns q (n, K) int64, scale (n,) float32, zero (n,) int64.
    """
    a = np.asarray(a, dtype=np.float32)
    with_nan = np.isnan(a).any(axis=1)
    lo = np.minimum(np.fmin.reduce(a, axis=1, initial=0), 0)
    hi = np.maximum(np.fmax.reduce(a, axis=1, initial=0), 0)
    scale = ((hi - lo) / np.float32(127)).astype(np.float32)
    scale[~((scale > 0) & np.isfinite(scale))] = 1
    zero = np.minimum(np.rint(-lo / scale), 127)  # above 127 only for a reset scale
    with np.errstate(invalid="ignore"):
        q = np.nan_to_num(np.rint(a / scale[:, None]) + zero[:, None], nan=0.0)
    scale[with_nan] = np.nan
    return np.clip(q, 0, 127).astype(np.int64), scale, zero.astype(np.int64)


def to_bfloat16_bits(W):
    """The bfloat16 bit patterns (uint16) of float32 W, rounded to nearest even."""
    bits = np.ascontiguousarray(W, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(W), np.uint16(0x7FC0), rounded)


def from_bfloat16_bits(bits):
    """float32 values of bfloat16 bit patterns."""
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


def times_transposed(x, W):
    """x W^T for x (n, K) and W an array, an Int8Weight or a BFloat16Weight."""
    if isinstance(W, Int8Weight):
        qx, sx, zx = quantize_activations(x)
        # Integer sums of at most K * 127 * 128 are exact in float64 (< 2**53), and
        # a float64 product runs through BLAS.
        q = W.q.astype(np.float64)
        exact = product(qx.astype(np.float64), q.T) - zx[:, None] * q.sum(axis=1)[None, :]
        return exact.astype(np.float32) * (sx[:, None] * W.scale[None, :])
    if isinstance(W, BFloat16Weight):
        return product(from_bfloat16_bits(to_bfloat16_bits(x)), from_bfloat16_bits(W.bits).T)
    return product(x, W.T)


def product(a, b):
    """a @ b, through BLAS, with its "invalid" flag not reported.

    BLAS kernels do not promise clean IEEE flags, and NumPy turns the flags a product
    leaves into RuntimeWarnings: in one test run, a float32 product of a 1 x 5 row of h
    and a weight matrix, all finite, left "invalid" raised (not seen again in hundreds
    of reruns). Not reporting "invalid" alone hides nothing the result does not show:
    from finite operands a NaN needs an infinity first, whose overflow is still
    reported, and a non-finite operand shows in the result.
    """
    with np.errstate(invalid="ignore"):
        return a @ b


# ----------------------------------------------------------------------------
# Parameters


def param_shapes(mode, input_size, hidden_size, num_layers, bias, bidirectional, proj_size,
                 peephole=False):
    """Torch's parameter names -> shapes, in torch's order (that of state_dict().keys()).

    peephole (LSTM only): each layer and direction also has weight_ci, weight_cf and
    weight_co, (H,) each, after torch's parameters of that layer and direction.
    LN_LSTM has no linear biases (bias must be False) and no projection; each layer and
    direction has weight_ih, weight_hh, then ln_gates_weight, ln_gates_bias (4H,) and
    ln_cell_weight, ln_cell_bias (H,).
    """
    _check_mode(mode)
    if mode == "LN_LSTM" and bias:
        raise ValueError("LN_LSTM has no linear biases (its layer norms' biases take their "
                         "place): pass bias=False")
    if peephole and mode != "LSTM":
        raise ValueError(f"peephole=True is only supported for LSTM, not {mode}")
    if proj_size < 0:
        raise ValueError(f"proj_size must be >= 0, got {proj_size}")
    if proj_size > 0 and mode != "LSTM":
        raise ValueError(f"proj_size > 0 is only supported for LSTM, not {mode}")
    if proj_size > 0 and proj_size >= hidden_size:
        raise ValueError(
            f"proj_size ({proj_size}) must be smaller than hidden_size ({hidden_size})")
    G, H, P = GATES[mode], hidden_size, proj_size
    H_out = P if P > 0 else H
    D = 2 if bidirectional else 1
    shapes = {}
    for layer in range(num_layers):
        layer_input_size = input_size if layer == 0 else D * H_out
        for direction in range(D):
            suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
            shapes[f"weight_ih{suffix}"] = (G * H, layer_input_size)
            shapes[f"weight_hh{suffix}"] = (G * H, H_out)
            if bias:
                shapes[f"bias_ih{suffix}"] = (G * H,)
                shapes[f"bias_hh{suffix}"] = (G * H,)
            if P > 0:
                shapes[f"weight_hr{suffix}"] = (P, H)
            if peephole:
                for name in ("weight_ci", "weight_cf", "weight_co"):
                    shapes[f"{name}{suffix}"] = (H,)
            if mode == "LN_LSTM":
                shapes[f"ln_gates_weight{suffix}"] = (G * H,)
                shapes[f"ln_gates_bias{suffix}"] = (G * H,)
                shapes[f"ln_cell_weight{suffix}"] = (H,)
                shapes[f"ln_cell_bias{suffix}"] = (H,)
    return shapes


def init_params(mode, input_size, hidden_size, num_layers, bias, bidirectional, proj_size,
                dtype, rng, peephole=False):
    """Parameters initialised as torch does: each U(-1/sqrt(H), 1/sqrt(H)) (the
    peephole vectors too), layer-norm weights 1 and biases 0 (as nn.LayerNorm).

    Drawn from the numpy Generator rng in torch's parameter order (see param_shapes),
    in float64 and then cast to dtype, so one seed gives the same values in both dtypes
    up to rounding.
    """
    bound = 1.0 / np.sqrt(hidden_size)
    shapes = param_shapes(mode, input_size, hidden_size, num_layers, bias, bidirectional,
                          proj_size, peephole)
    def draw(name, shape):
        if name.startswith("ln_"):
            return np.full(shape, 1.0 if "_weight" in name else 0.0, dtype=dtype)
        return rng.uniform(-bound, bound, size=shape).astype(dtype)

    return {name: draw(name, shape) for name, shape in shapes.items()}
