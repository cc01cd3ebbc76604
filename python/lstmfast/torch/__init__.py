"""lstmfast inside torch models: ``LSTM``, ``GRU``, ``RNN``, the cells, ``accelerate``.

The classes are subclasses of ``torch.nn.LSTM`` / ``GRU`` / ``RNN`` and
``LSTMCell`` / ``GRUCell`` / ``RNNCell``: same constructor, parameters,
``state_dict`` keys and forward signature. On CPU float32/float64 tensors the
forward pass and its backward run through lstmfast's fused kernels inside one
``torch.autograd.Function``; contiguous tensors are shared with the kernels, not
copied.

Everything the kernels cannot do exactly as torch does runs on torch's own
implementation of the same module, so the result is torch's by construction:
  * CUDA, other dtypes, weights of another dtype than the input (with a warning
    the first time);
  * tracing (``torch.jit.trace``, ONNX export), ``torch.export``, scripting (the
    scripted module is the torch class, see ``__prepare_scriptable__``),
    ``torch.func`` transforms, and autocast;
  * input torch would reject: torch's forward raises its own error;
  * double backward (``create_graph=True``): the backward then differentiates
    torch's own graph of the same computation, built from the saved inputs.
Under ``torch.compile`` the fused call runs eagerly behind a graph break: for a
layer the same one torch's own RNN costs (dynamo runs nn.LSTM/GRU/RNN eagerly),
for a cell one per call; the rest of the model compiles.

``accelerate(model)`` swaps the class of every torch RNN module inside ``model`` in
place; ``restore(model)`` swaps them back. The modules keep their parameter objects,
so optimizers built before the swap keep working.

This is the only module of lstmfast that imports torch.
"""

import collections
import copy
import sys
import threading
import warnings
import weakref

import numpy as np
import torch
from torch import _VF, nn
from torch.ao.nn.quantized import dynamic as nnqd
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

from ..modules import (_backend_weight, _check_ctrnn_options, _check_layer_norm_eps,
                      _check_probability, _check_zoneout)

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "PeepholeLSTM", "CTRNN",
           "LayerNormLSTM",
           "QuantizedLSTM", "QuantizedGRU", "accelerate", "restore", "quantize_dynamic"]

_SUPPORTED_DTYPES = (torch.float32, torch.float64)
_CELL_STATE_MODES = ("LSTM", "LN_LSTM")  # the backends' modes whose state is (h, c)
_warned = set()


_backends = {}


def _backend(name):
    backend = _backends.get(name)
    if backend is not None:
        return backend
    if name == "numpy":
        from .. import reference as backend
    else:
        from .. import _fused as backend

        if not getattr(backend, "available", False):
            raise NotImplementedError("lstmfast's fused kernels are not built")
    _backends[name] = backend
    return backend


def _fused_backend_or_none():
    try:
        return _backend("fused")
    except (ImportError, NotImplementedError):
        return None


class _GradientArrays:
    """Arrays for the parameter gradients that backward hands to autograd, each made
    again once autograd has let go of it.

    A cell stepped T times returns T sets of weight gradients, which autograd adds up
    and frees one by one. New arrays each time meant new memory from the system each
    time (glibc gives freed blocks of this size back to it at once), and the page
    faults cost more than the backward: a 100-step LSTMCell(256) loop at N=1 took
    298 ms a training step against torch's 99 ms, and 68 ms with malloc told to keep
    its memory. An array is free again when nothing but this pool refers to it (the
    tensor that torch.from_numpy made of it holds a reference until it is freed).
    """

    _PER_SHAPE = 4  # in flight per step: the one autograd is summing into, and the new one
    _SHAPES = 16

    def __init__(self):
        self._lock = threading.Lock()
        self._free = collections.OrderedDict()  # (shape, dtype) -> arrays, most recent last

    def empty(self, shape, dtype):
        key = (tuple(shape), np.dtype(dtype))
        with self._lock:
            arrays = self._free.get(key)
            if arrays is None:
                arrays = self._free[key] = []
                if len(self._free) > self._SHAPES:
                    self._free.popitem(last=False)
            else:
                self._free.move_to_end(key)
            for array in arrays:
                # references: the list, this loop's name, getrefcount's argument
                if sys.getrefcount(array) == 3:
                    return array
            array = np.empty(shape, dtype)
            if len(arrays) < self._PER_SHAPE:
                arrays.append(array)
            return array


_gradient_arrays = _GradientArrays()


def _backward_new_gradients(backend, cache, d_output, d_h_n, d_c_n):
    """backend.backward into gradient arrays of its own (the fused backend's come from
    _gradient_arrays, filled without being cleared first)."""
    if backend is _fused_backend_or_none():
        return backend.fresh_gradients_backward(cache, d_output, d_h_n, d_c_n,
                                                empty=_gradient_arrays.empty)
    return backend.backward(cache, d_output, d_h_n, d_c_n)


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=5)


def _as_numpy(t):
    """A NumPy view of a CPU tensor (no copy); the kernels copy non-contiguous input themselves."""
    return t.detach().numpy()


def _in_torch_only_context(autocast=True):
    """True where only torch's own implementation can give torch's result: while
    tracing (the kernels are invisible to the tracer), under a ``torch.func``
    transform (they see no wrapped tensors), and under autocast (torch's dtype
    rules; the layers serve bfloat16 autocast themselves and pass autocast=False).
    Exporting is checked before (``torch.compiler.is_exporting``)."""
    return (torch.jit.is_tracing() or (autocast and torch.is_autocast_enabled("cpu"))
            or torch._C._are_functorch_transforms_active())


def _unsupported_reason(data, tensors):
    """Why the kernels cannot take this call, or None: a reason for a warning, or ""
    when torch's path needs no warning (it raises, as for an input of another dtype
    than the weights; a warning would only hide torch's error)."""
    if not data.is_cpu:
        return f"device {data.device.type}"
    dtype = data.dtype
    for t in tensors:
        if t is not None and (t.dtype != dtype or not t.is_cpu):
            return ""
    if dtype not in _SUPPORTED_DTYPES:
        return f"dtype {dtype}"
    return None


def _backward_through_torch_ops(grad_outputs):
    """Whether a backward must differentiate torch's own ops instead of running the
    fused BPTT: with ``create_graph=True`` (the fused backward gives numbers, not a
    graph, and double backward needs one), and when the gradients are batched by a
    vmap, as ``gradcheck(check_batched_grad=True)`` batches them (the kernels see no
    batched tensors): ``torch.func``'s vmap, or the one gradcheck uses."""
    if torch.is_grad_enabled() or torch._C._are_functorch_transforms_active():
        return True
    return any(isinstance(g, torch.Tensor) and _batched_by_legacy_vmap(g) for g in grad_outputs)


def _batched_by_legacy_vmap(t):
    """Whether t is a batched tensor of torch's first vmap (torch._vmap_internals, which
    gradcheck uses): its dispatch key Batched is not in the DispatchKey enum torch
    exposes, so it is read from the key set's names."""
    names = str(torch._C._dispatch_keys(t))
    return "Batched" in names[names.find("(") + 1:names.rfind(")")].split(", ")


def _differentiate_torch_graph(recompute, saved, needs_input_grad, grad_outputs):
    """Gradients of ``recompute(*saved)`` (torch's own ops) with a graph of their own
    (see _backward_through_torch_ops)."""
    with torch.enable_grad():
        outputs = recompute(*saved)
        wanted = [t for t, need in zip(saved, needs_input_grad) if need and t is not None]
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                    create_graph=True, allow_unused=True, materialize_grads=True)
    grads = iter(grads)
    return [next(grads) if need and t is not None else None
            for t, need in zip(saved, needs_input_grad)]


# ---------------------------------------------------------------------------
# Layers: LSTM, GRU, RNN
# ---------------------------------------------------------------------------

_VF_LAYER = {"LSTM": _VF.lstm, "GRU": _VF.gru, "RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu}


def _torch_layer_loop(s, x, h0, c0, masks, step):
    """The loop of the torch-op stacks below, with _torch_stack's contract: layers,
    directions (the reverse one walks time backwards), dropout between layers, and
    lengths: x is padded (T, N, I); with s["lengths"] a row holds its state past its
    length and outputs 0 there (as the reference does), so the reverse direction starts
    at each row's own end. ``step(k, sfx, t, x_t, h, c)`` gives (h_next, c_next) of
    layer-direction k (parameter suffix sfx) at time t; c0 None: no cell state (c is
    None throughout and c_n is None)."""
    D = 2 if s["bidirectional"] else 1
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
            for t in (reversed(range(T)) if d else range(T)):
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


def _torch_loop_stack(s, x, h0, c0, masks, *weights):
    """An LSTM (peepholes and projection included), GRU or RNN stack, with recurrent
    dropout and zoneout (docs/cells.md, Recurrent dropout and zoneout), as a loop of torch ops (_torch_layer_loop): what
    torch's kernels cannot compute (peepholes: docs/cells.md, Peephole LSTM; the regularizers). The
    masks, s["cell_options"] (as the backends take them), are constants."""
    w = dict(zip(s["names"], weights))
    options = s.get("cell_options") or {}
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
            c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            if "weight_co" + sfx in w:
                o = o + w["weight_co" + sfx] * c_next
            h_next = torch.sigmoid(o) * torch.tanh(c_next)
            if s["proj_size"]:
                h_next = h_next @ w["weight_hr" + sfx].T
        elif mode == "GRU":
            i_r, i_z, i_n = gi.chunk(3, 1)
            h_r, h_z, h_n = gh.chunk(3, 1)
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h_next = (1 - z) * n + z * h
        else:
            a = gi + gh
            h_next = torch.relu(a) if mode == "RNN_RELU" else torch.tanh(a)
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
    if s.get("cell_options"):
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


def _numpy_options(options):
    """A backend's extra keyword arguments (settings["cell_options"]) with tensors, alone
    or in a pair (zoneout's), as arrays."""
    def as_numpy(value):
        if isinstance(value, torch.Tensor):
            return _as_numpy(value.detach().contiguous())
        if isinstance(value, tuple):
            return tuple(as_numpy(v) for v in value)
        return value

    return {key: as_numpy(value) for key, value in (options or {}).items()}


def _stack_step(settings, x, h0, c0, masks, weights):
    """The whole stack on the backend: output, h_n, c_n (an empty tensor but for
    LSTM) as tensors, and the cache (None unless settings["keep_for_backward"])."""
    is_lstm = settings["mode"] in _CELL_STATE_MODES
    params = {name: _as_numpy(w) if isinstance(w, torch.Tensor) else w
              for name, w in zip(settings["names"], weights)}
    hx = (_as_numpy(h0), _as_numpy(c0)) if is_lstm else _as_numpy(h0)
    dropout_masks = list(_as_numpy(masks)) if masks.numel() else None
    options = _numpy_options(settings.get("cell_options"))
    output, h_n, c_n, cache = settings["backend"].forward(
        settings["mode"], _as_numpy(x), hx, params,
        num_layers=settings["num_layers"], bidirectional=settings["bidirectional"],
        proj_size=settings["proj_size"], lengths=settings["lengths"],
        dropout_masks=dropout_masks, training=settings["keep_for_backward"], **options)
    c_n = torch.from_numpy(c_n) if is_lstm else torch.empty(0, dtype=x.dtype)
    return torch.from_numpy(output), torch.from_numpy(h_n), c_n, cache


class _RecurrentFunction(torch.autograd.Function):
    """Forward and BPTT of a whole stack through an lstmfast backend.

    Inputs: a dict of static settings, x (T, N, I), h0, c0 (or an empty tensor for
    non-LSTM), dropout masks (or an empty tensor), then the flat weights in the
    module's ``_flat_weights_names`` order. All are saved for backward, so changing
    one in place before backward raises torch's "modified by an inplace operation"
    error (the kernels' cache reads x and the weights where they are).
    """

    @staticmethod
    def forward(ctx, settings, x, h0, c0, masks, *weights):
        out, h_n, c_n, ctx.cache = _stack_step(settings, x, h0, c0, masks, weights)
        ctx.settings = settings
        is_lstm = settings["mode"] in _CELL_STATE_MODES
        ctx.save_for_backward(x, h0, c0 if is_lstm else None, masks, *weights)
        if not is_lstm:
            ctx.mark_non_differentiable(c_n)
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, d_output, d_h_n, d_c_n):
        saved = ctx.saved_tensors  # raises if one was changed in place since forward
        settings = ctx.settings
        is_lstm = settings["mode"] in _CELL_STATE_MODES
        if _backward_through_torch_ops((d_output, d_h_n, d_c_n)):
            grads = _differentiate_torch_graph(
                lambda *t: _torch_stack(settings, *t), saved, ctx.needs_input_grad[1:],
                (d_output, d_h_n, d_c_n if is_lstm else None))
            return (None, *grads)
        if ctx.cache is None:
            raise RuntimeError("lstmfast: this forward kept nothing for backward")
        dx, dh0, dc0, grads = _backward_new_gradients(
            settings["backend"], ctx.cache, _as_numpy(d_output.contiguous()),
            _as_numpy(d_h_n.contiguous()), _as_numpy(d_c_n.contiguous()) if is_lstm else None)
        return (None, torch.from_numpy(dx), torch.from_numpy(dh0),
                torch.from_numpy(dc0) if is_lstm else None, None,
                *(torch.from_numpy(grads[name]) for name in settings["names"]))


def _packed_rows(batch_sizes, N):
    """The rows t*N + n of a padded (T, N, ...) tensor that a PackedSequence with these
    batch sizes holds, in its order, and each sequence's length."""
    inside = torch.arange(N)[None, :] < batch_sizes[:, None]  # (T, N)
    return inside.reshape(-1).nonzero().squeeze(1), inside.sum(0).numpy().astype(np.int64)


def _set_regularizers(module, recurrent_dropout, zoneout):
    module.recurrent_dropout = _check_probability("recurrent_dropout", recurrent_dropout,
                                                  upper_open=True)
    module.zoneout = _check_zoneout(zoneout, "LSTM" if module.mode == "LSTM" else "GRU")


class _FastRNNMixin:
    """The forward shared by the three layer classes; the rest is torch's nn.RNNBase.

    It follows torch's own forward step by step and calls torch's own checks, so
    shapes, errors and messages are torch's; where it is unsure (a malformed call),
    it hands the call to torch's forward, which raises exactly what torch raises.
    """

    _lstmfast_backend = "fused"
    _lstmfast_quantized = False  # QuantizedLSTM / QuantizedGRU: int8 weights, inference only
    _lstmfast_autocast = True  # bfloat16 autocast runs on the bfloat16 weights path
    recurrent_dropout = 0.0  # set by the constructors of LSTM, GRU and RNN (docs/cells.md, Recurrent dropout and zoneout)
    zoneout = (0.0, 0.0)

    def forward(self, input, hx=None, *, recurrent_dropout_mask=None,  # noqa: A002
                zoneout_mask=None):
        given = None
        if recurrent_dropout_mask is not None or zoneout_mask is not None:
            given = {"recurrent_dropout_mask": recurrent_dropout_mask, "zoneout_mask": zoneout_mask}
        if torch.compiler.is_exporting():
            return self._torch_forward(input, hx, given)
        return _fused_layer_forward(self, input, hx, given)

    def _regularized(self, given):
        return bool(self.recurrent_dropout or any(self.zoneout) or given)

    def extra_repr(self):
        s = super().extra_repr()
        if self.recurrent_dropout:
            s += f", recurrent_dropout={self.recurrent_dropout}"
        if any(self.zoneout):
            s += f", zoneout={self.zoneout}"
        return s

    def _torch_forward(self, input, hx, given=None):
        if self._regularized(given):  # torch has no recurrent dropout or zoneout
            return _torch_loop_forward(self, input, hx, _torch_loop_stack, given)
        return self._lstmfast_torch_class.forward(self, input, hx)

    @property
    def _lstmfast_mode(self):
        """The backends' name of this layer's cell (a variant's differs from torch's mode)."""
        return self.mode

    def _lstmfast_cell_options(self, T, N, like, given):
        """Keyword arguments of the backend forward beyond torch's, from ``given``, what
        the caller passed beyond torch's arguments: here recurrent dropout's and
        zoneout's masks (given, or drawn from torch's generator in training), or
        zoneout's probabilities (eval); a variant's own otherwise."""
        if not self._regularized(given):
            return None
        given = given or {}
        LD = self.num_layers * (2 if self.bidirectional else 1)
        H = self.hidden_size
        H_out = self.proj_size if self.proj_size > 0 else H
        options = {}

        def checked(name, value, shape):
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{name}: expected a tensor of shape {shape}, got {got}")
            if not self.training:
                raise ValueError(f"{name}: given in eval mode, where there is no mask")
            return value.detach().to(like.dtype)

        rec = given.get("recurrent_dropout_mask")
        if rec is not None:
            options["recurrent_dropout_masks"] = checked("recurrent_dropout_mask", rec, (LD, N, H_out))
        elif self.training and self.recurrent_dropout > 0:
            keep = 1.0 - self.recurrent_dropout
            options["recurrent_dropout_masks"] = like.new_full((LD, N, H_out), keep).bernoulli() / keep
        zone = given.get("zoneout_mask")
        if zone is not None:
            if not isinstance(zone, (tuple, list)) or len(zone) != 2:
                raise ValueError("zoneout_mask: expected a pair (m_h, m_c)")
            options["zoneout_masks"] = tuple(
                None if m is None else checked(f"zoneout_mask[{i}]", m, (LD, T, N, width))
                for i, (m, width) in enumerate(zip(zone, (H_out, H))))
        elif any(self.zoneout):
            # training: masks drawn inside the kernels from a seed of torch's generator
            # (reference.zoneout_masks_from_seed), nothing stored; eval: the expectation
            options["zoneout_masks"] = tuple(p or None for p in self.zoneout)
            if self.training:
                options["zoneout_seed"] = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        return options or None

    def _lstmfast_weights(self):
        """The weights for _layer_forward_on: the flat weights, their names, and
        whether they are reduced (QuantizedLSTM / QuantizedGRU: packed int8); None
        when only torch's forward can run them."""
        self._update_flat_weights()
        return list(self._flat_weights), list(self._flat_weights_names), False

    def __prepare_scriptable__(self):
        """``torch.jit.script`` compiles torch's class on the same parameters."""
        return _as_class(self, self._lstmfast_torch_class)


# torch.compile cannot trace into the kernels: the fused call runs eagerly behind a
# graph break. Dynamo never traces torch's own nn.LSTM/GRU/RNN either (it runs
# them eagerly), so a layer costs the same break either way; a cell costs one
# break per call, where torch's cell compiles into the graph. Disabled also when
# called eagerly, because dynamo would otherwise try to compile the frames this
# function runs on behalf of a compiled caller (about 1 us per call).
@torch.compiler.disable
def _fused_layer_forward(self, input, hx, given=None):
    packed = isinstance(input, PackedSequence)
    data = input.data if packed else input
    is_lstm = self.mode == "LSTM"
    if hx is None:
        hx_list = []
    elif is_lstm and isinstance(hx, (tuple, list)) and len(hx) == 2:
        hx_list = list(hx)
    elif not is_lstm and isinstance(hx, torch.Tensor):
        hx_list = [hx]
    else:
        return self._torch_forward(input, hx, given)  # torch's answer to a malformed hx
    if not all(isinstance(h, torch.Tensor) for h in hx_list):
        return self._torch_forward(input, hx, given)
    if (_in_torch_only_context(autocast=False) or not isinstance(data, torch.Tensor)
            or data.numel() == 0):
        return self._torch_forward(input, hx, given)
    if torch.is_autocast_enabled("cpu") and not self._lstmfast_quantized:
        if not self._lstmfast_autocast or not _autocast_serves(self, data):
            return self._torch_forward(input, hx, given)
        return _bfloat16_autocast_forward(self, input, hx, hx_list)
    weights = self._lstmfast_weights()
    if weights is None:
        return self._torch_forward(input, hx, given)
    return _layer_forward_on(self, input, hx, hx_list, *weights, given=given)


def _layer_forward_on(self, input, hx, hx_list, weights, names, reduced=False, given=None):
    """The rest of _fused_layer_forward with the given weights: tensors, or for
    ``reduced`` the packed reduced weights (and bias tensors) of an inference-only path.
    ``given``: what the caller passed beyond torch's arguments (a CTRNN's noise)."""
    packed = isinstance(input, PackedSequence)
    data = input.data if packed else input
    is_lstm = self.mode == "LSTM"
    tensors = [w for w in weights if isinstance(w, torch.Tensor)]
    reason = _unsupported_reason(data, hx_list + tensors)
    if reason is not None:
        if reason:
            _warn_once((type(self).__name__, reason),
                       f"lstmfast.torch.{type(self).__name__}: {reason} is not supported by the "
                       "fused kernels; using torch's implementation")
        return self._torch_forward(input, hx, given)

    D = 2 if self.bidirectional else 1
    H_out = self.proj_size if self.proj_size > 0 else self.hidden_size
    batch_sizes = rows = lengths = None
    if packed:
        x, batch_sizes, sorted_indices, unsorted_indices = input
        N = int(batch_sizes[0])
        T = batch_sizes.shape[0]
        if hx is not None:
            hx = self.permute_hidden(hx, sorted_indices)
    else:
        if data.dim() not in (2, 3) or any(h.dim() != data.dim() for h in hx_list):
            return self._torch_forward(input, hx, given)  # raises torch's own error
        batch_dim = 0 if self.batch_first else 1
        x = input if input.dim() == 3 else input.unsqueeze(batch_dim)
        if hx is not None and input.dim() == 2:
            hx = tuple(h.unsqueeze(1) for h in hx) if is_lstm else hx.unsqueeze(1)
        N = x.shape[batch_dim]
    if hx is None:
        h0 = torch.zeros(D * self.num_layers, N, H_out, dtype=data.dtype)
        hx = (h0, torch.zeros(D * self.num_layers, N, self.hidden_size, dtype=data.dtype)) if is_lstm else h0
    self.check_forward_args(x, hx, batch_sizes)  # torch's own checks and messages
    if not packed:
        x = x.transpose(0, 1) if self.batch_first else x
        T = x.shape[0]
    if packed:
        rows, lengths = _packed_rows(batch_sizes, N)
        x = x.new_zeros(T * N, x.shape[1]).index_copy(0, rows, x).view(T, N, -1)
    h0, c0 = hx if is_lstm else (hx, torch.empty(0, dtype=data.dtype))

    masks = torch.empty(0, dtype=data.dtype)
    if self.training and self.dropout > 0 and self.num_layers > 1:
        keep = 1.0 - self.dropout
        shape = (self.num_layers - 1, T, N, D * H_out)
        masks = (torch.bernoulli(torch.full(shape, keep, dtype=data.dtype)) / keep
                 if keep > 0 else torch.zeros(shape, dtype=data.dtype))

    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or h0.requires_grad or c0.requires_grad or any(w.requires_grad for w in tensors))
    if needs_grad and reduced:  # reduced weights have no backward: torch's answer
        return self._torch_forward(input, hx, given)
    settings = {
        "backend": _backend(self._lstmfast_backend),
        "mode": self._lstmfast_mode,
        "cell_options": self._lstmfast_cell_options(T, N, x, given),
        "names": names,
        "num_layers": self.num_layers,
        "bidirectional": self.bidirectional,
        "bias": self.bias,
        "proj_size": self.proj_size,
        "lengths": lengths,
        "rows": rows,
        "batch_sizes": batch_sizes,
        "keep_for_backward": needs_grad,
    }
    options = settings["cell_options"]
    if packed and sorted_indices is not None and options:
        # masks and noise have their rows in the caller's batch order; x's here is the packed order
        def to_packed_order(value, dim):
            return value.index_select(dim, sorted_indices) if isinstance(value, torch.Tensor) else value

        options = dict(options)
        if options.get("noise") is not None:
            options["noise"] = to_packed_order(options["noise"], 2)
        if options.get("recurrent_dropout_masks") is not None:
            options["recurrent_dropout_masks"] = to_packed_order(options["recurrent_dropout_masks"], 1)
        if options.get("zoneout_masks") is not None:
            options["zoneout_masks"] = tuple(to_packed_order(m, 2) for m in options["zoneout_masks"])
        settings["cell_options"] = options
    if needs_grad:
        out, h_n, c_n = _RecurrentFunction.apply(settings, x, h0, c0, masks, *weights)
    else:  # nothing to differentiate: the kernels alone, no autograd node
        out, h_n, c_n, _ = _stack_step(settings, x, h0, c0, masks, weights)

    if packed:
        output = PackedSequence(out.reshape(T * N, -1).index_select(0, rows), batch_sizes,
                                sorted_indices, unsorted_indices)
        return output, self.permute_hidden((h_n, c_n) if is_lstm else h_n, unsorted_indices)
    if input.dim() == 2:
        output, h_n, c_n = out.squeeze(1), h_n.squeeze(1), c_n.squeeze(1) if is_lstm else c_n
    else:
        output = out.transpose(0, 1) if self.batch_first else out
    return output, ((h_n, c_n) if is_lstm else h_n)


# ---------------------------------------------------------------------------
# Reduced precision: bfloat16 autocast, and torch's dynamically quantized int8
# layers (QuantizedLSTM, QuantizedGRU)
# ---------------------------------------------------------------------------

# module -> (what its packed weights were made from, the packed weights): kept out
# of the module itself, whose copies, pickles and state_dicts must not carry them.
_packed_weights = weakref.WeakKeyDictionary()
_packed_lock = threading.Lock()


def _packed_for(module, source_key, make):
    """``make()`` once per ``source_key`` of ``module`` (the packed weights of its
    current parameters), cached until the key changes."""
    with _packed_lock:
        entry = _packed_weights.get(module)
        if entry is not None and len(entry[0]) == len(source_key) and all(
                a is b or (isinstance(a, tuple) and a == b) for a, b in zip(entry[0], source_key)):
            return entry[1]
    value = make()
    with _packed_lock:
        _packed_weights[module] = (source_key, value)
    return value


def _autocast_serves(self, data):
    """Whether the kernels give torch's result under this autocast: CPU bfloat16
    autocast, float32 weights, input of float32 or bfloat16."""
    if torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return False
    self._update_flat_weights()
    return (data.is_cpu and data.dtype in (torch.float32, torch.bfloat16)
            and all(w.dtype == torch.float32 and w.is_cpu for w in self._flat_weights))


def _bfloat16_autocast_forward(self, input, hx, hx_list):
    """A layer under CPU bfloat16 autocast: torch multiplies by bfloat16 weights.
    Here the weights are rounded to bfloat16 once (until they change), state and
    gate math stay float32 (README "Reduced precision"), and the results get the
    dtypes torch gives them (_autocast_dtypes). Training under autocast needs
    torch's backward: torch's path."""
    from .. import reference

    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in [input.data if isinstance(input, PackedSequence) else input]
        + hx_list + list(self._flat_weights))
    if needs_grad:
        return self._torch_forward(input, hx)
    backend = _backend(self._lstmfast_backend)
    weights = list(self._flat_weights)
    names = list(self._flat_weights_names)
    key = tuple((w.data_ptr(), w._version, tuple(w.shape)) for w in weights) + (backend,)

    def make():
        return [_backend_weight(backend, reference.BFloat16Weight(
                    reference.to_bfloat16_bits(w.detach().numpy())))
                if name.startswith("weight") else w.detach().clone()
                for name, w in zip(names, weights)]

    reduced = _packed_for(self, key, make)
    data_dtype = (input.data if isinstance(input, PackedSequence) else input).dtype
    as_float = [h.float() for h in hx_list]
    if isinstance(input, PackedSequence):
        input = PackedSequence(input.data.float(), input.batch_sizes, input.sorted_indices,
                               input.unsorted_indices)
    else:
        input = input.float()
    hx = None if hx is None else (tuple(as_float) if self.mode == "LSTM" else as_float[0])
    with torch.autocast("cpu", enabled=False):
        output, state = _layer_forward_on(self, input, hx, as_float, reduced, names, True)
    out_dtype, h_dtype, c_dtype = _autocast_dtypes(self.mode, self.proj_size, data_dtype)
    if isinstance(output, PackedSequence):
        output = PackedSequence(output.data.to(out_dtype), output.batch_sizes,
                                output.sorted_indices, output.unsorted_indices)
    else:
        output = output.to(out_dtype)
    if self.mode == "LSTM":
        return output, (state[0].to(h_dtype), state[1].to(c_dtype))
    return output, state.to(h_dtype)


def _autocast_dtypes(mode, proj_size, input_dtype):
    """The dtypes of (output, h_n, c_n) that torch's layer returns under CPU bfloat16
    autocast (torch 2.13; tests/test_torch_quantized.py compares them with torch's
    wherever torch's kernels run). Autocast lowers the LSTM and RNN ops to bfloat16,
    but not the GRU, whose results keep the input's dtype; a projected LSTM's
    float32 input keeps c_n in float32 (it never passes through the projection)."""
    bf16 = torch.bfloat16
    if mode == "GRU":
        return input_dtype, input_dtype, None
    if mode == "LSTM":
        return bf16, bf16, torch.float32 if proj_size and input_dtype == torch.float32 else bf16
    return bf16, bf16, None


class LSTM(_FastRNNMixin, nn.LSTM):
    """``torch.nn.LSTM`` computed by lstmfast's fused kernels; ``recurrent_dropout=p`` and
    ``zoneout`` (a probability, or (p_h, p_c) for h and c)
    add the regularizers of docs/cells.md, Recurrent dropout and zoneout (``lstmfast.LSTM``'s)."""

    _lstmfast_torch_class = nn.LSTM

    def __init__(self, *args, recurrent_dropout=0.0, zoneout=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        _set_regularizers(self, recurrent_dropout, zoneout)


class GRU(_FastRNNMixin, nn.GRU):
    """``torch.nn.GRU`` computed by lstmfast's fused kernels; ``recurrent_dropout=p`` and
    ``zoneout`` (a probability, or (p_h, p_c), p_c 0)
    add the regularizers of docs/cells.md, Recurrent dropout and zoneout (``lstmfast.GRU``'s)."""

    _lstmfast_torch_class = nn.GRU

    def __init__(self, *args, recurrent_dropout=0.0, zoneout=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        _set_regularizers(self, recurrent_dropout, zoneout)


class RNN(_FastRNNMixin, nn.RNN):
    """``torch.nn.RNN`` computed by lstmfast's fused kernels; ``recurrent_dropout=p`` and
    ``zoneout`` (a probability, or (p_h, p_c), p_c 0)
    add the regularizers of docs/cells.md, Recurrent dropout and zoneout (``lstmfast.RNN``'s)."""

    _lstmfast_torch_class = nn.RNN

    def __init__(self, *args, recurrent_dropout=0.0, zoneout=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        _set_regularizers(self, recurrent_dropout, zoneout)


def _int8_weight(qweight):
    """A reference.Int8Weight holding a torch quantized weight as it is: its int8
    values and its scale (per tensor, or per output row), when it is symmetric
    (zero point 0), which torch's dynamic quantization makes. Any other scheme is
    quantized again per output row from its float values."""
    from .. import reference

    M = qweight.shape[0]
    scheme = qweight.qscheme()
    if qweight.dtype == torch.qint8:
        if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric) and \
                qweight.q_zero_point() == 0:
            return reference.Int8Weight(qweight.int_repr().numpy(),
                                        np.full(M, qweight.q_scale(), dtype=np.float32))
        if scheme in (torch.per_channel_affine, torch.per_channel_symmetric) and \
                qweight.q_per_channel_axis() == 0 and not qweight.q_per_channel_zero_points().any():
            return reference.Int8Weight(qweight.int_repr().numpy(),
                                        qweight.q_per_channel_scales().numpy().astype(np.float32))
    return reference.Int8Weight(*reference.quantize_int8(qweight.dequantize().numpy()))


class _QuantizedRNNMixin(_FastRNNMixin):
    """torch's dynamically quantized LSTM / GRU (``torch.ao.nn.quantized.dynamic``) on
    lstmfast's int8 kernels, with the module's own int8 weights and scales.

    Activations are quantized as lstmfast does (per row and per product, 7 bits),
    not per tensor as torch does, so results differ from torch's within int8's
    error, which is no larger than torch's (README "Reduced precision"). Modules of
    another dtype (float16 weights) and calls that need gradients run torch's forward.
    """

    _lstmfast_quantized = True
    proj_size = 0  # torch's quantized layers have no projection

    def _lstmfast_weights(self):
        if self.dtype != torch.qint8:
            return None
        backend = _backend(self._lstmfast_backend)
        key = tuple(v.param for v in self._all_weight_values) + (backend,)

        def make():
            weight_bias = self._weight_bias()
            weights, names = [], []
            for layer in range(self.num_layers):
                for suffix in ("", "_reverse")[: 2 if self.bidirectional else 1]:
                    for kind in ("ih", "hh"):
                        name = f"weight_{kind}_l{layer}{suffix}"
                        names.append(name)
                        weights.append(_backend_weight(backend, _int8_weight(weight_bias["weight"][name])))
                    for kind in ("ih", "hh"):
                        name = f"bias_{kind}_l{layer}{suffix}"
                        bias = weight_bias["bias"].get(name)
                        if bias is not None:
                            names.append(name)
                            weights.append(bias.detach().float().contiguous())
            return weights, names

        weights, names = _packed_for(self, key, make)
        return weights, names, True


class QuantizedLSTM(_QuantizedRNNMixin, nnqd.LSTM):
    """``torch.ao.nn.quantized.dynamic.LSTM`` computed by lstmfast's int8 kernels."""

    _lstmfast_torch_class = nnqd.LSTM


class QuantizedGRU(_QuantizedRNNMixin, nnqd.GRU):
    """``torch.ao.nn.quantized.dynamic.GRU`` computed by lstmfast's int8 kernels."""

    _lstmfast_torch_class = nnqd.GRU


class PeepholeLSTM(LSTM):
    """An LSTM with peephole connections (docs/cells.md, Peephole LSTM, the ONNX and TensorFlow
    form), which torch.nn lacks: i and f also see the previous cell state, o the new
    one, through per-unit parameters ``weight_ci_l{k}``, ``weight_cf_l{k}``,
    ``weight_co_l{k}`` (``(hidden_size,)``, plus ``_reverse``), drawn as torch draws
    the others. Constructor and call are ``torch.nn.LSTM``'s; forward and BPTT run on
    lstmfast's fused kernels. Where only torch can compute (CUDA, other dtypes,
    tracing, export, ``torch.func``, autocast, double backward) a loop of torch ops
    computes the same equations. ``lstmfast.LSTM(..., peephole=True)`` loads its
    ``state_dict``.
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


def _torch_loop_forward(self, input, hx, stack, given=None):
    """A variant's forward as a loop of torch ops (``stack``: _torch_loop_stack,
    _torch_ctrnn_stack or _torch_ln_lstm_stack), for what the kernels do not take; the layouts and checks of
    nn.LSTM / nn.RNN.forward."""
    is_lstm = self.mode == "LSTM"
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
            out, h_n, c_n = _RecurrentFunction.apply(settings, input, h0, c0, masks, *weights)
        else:
            out, h_n, c_n, _ = _stack_step(settings, input, h0, c0, masks, weights)
        return out, [h_n[0], c_n[0]]


_torchaudio_twins = {}  # torchaudio's _CustomLSTM class -> its accelerated twin


def _torchaudio_swaps():
    """{torchaudio's _CustomLSTM: its twin on lstmfast's kernels} when the program has
    imported torchaudio's RNN-T models (a model holding one has), else {}."""
    custom = getattr(sys.modules.get("torchaudio.models.rnnt"), "_CustomLSTM", None)
    if not isinstance(custom, type):
        return {}
    if custom not in _torchaudio_twins:
        _torchaudio_twins[custom] = type(custom.__name__, (_TorchaudioLSTMForward, custom),
                                         {"__module__": __name__})
    return {custom: _torchaudio_twins[custom]}


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


# ---------------------------------------------------------------------------
# Cells: LSTMCell, GRUCell, RNNCell (one time step; decoders step them in loops,
# so this path is kept short)
# ---------------------------------------------------------------------------

_VF_CELL = {"LSTM": _VF.lstm_cell, "GRU": _VF.gru_cell, "RNN_TANH": _VF.rnn_tanh_cell,
            "RNN_RELU": _VF.rnn_relu_cell}


def _torch_cell(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
    """One step of ``_CellFunction`` with torch's own kernels (for double backward)."""
    if mode == "LSTM":
        return _VF.lstm_cell(x, (h0, c0), w_ih, w_hh, b_ih, b_hh)
    return _VF_CELL[mode](x, h0, w_ih, w_hh, b_ih, b_hh), None


def _cell_step(backend, mode, keep, x, h0, c0, weights):
    """One step on the kernels: x (N, I), h0 and c0 (N, H) (c0 None but for LSTM),
    weights (weight_ih, weight_hh, bias_ih, bias_hh; biases may be None).
    Returns h1, c1 (None but for LSTM) as tensors, and the cache (None unless keep)."""
    N = x.shape[0]
    h0 = h0.detach().numpy().reshape(1, N, -1)
    hx = (h0, c0.detach().numpy().reshape(1, N, -1)) if c0 is not None else h0
    x = x.detach().numpy().reshape(1, N, -1)
    weights = [None if w is None else w.detach().numpy() for w in weights]
    if backend is _fused_backend_or_none():
        h1, c1, cache = backend.cell_forward(mode, x, hx, weights, keep)
    else:  # the reference has no one-step entry: the stack with T = 1
        names = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
        params = {name: w for name, w in zip(names, weights) if w is not None}
        _, h1, c1, cache = backend.forward(mode, x, hx, params, num_layers=1,
                                           bidirectional=False, training=keep)
    return torch.from_numpy(h1[0]), (None if c1 is None else torch.from_numpy(c1[0])), cache


class _CellFunction(torch.autograd.Function):
    """One step of one cell through the fused kernels, for autograd; the arguments
    after the backend and mode are those of ``_cell_step``, weights spread out."""

    @staticmethod
    def forward(ctx, backend, mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        h1, c1, ctx.cache = _cell_step(backend, mode, True, x, h0, c0, (w_ih, w_hh, b_ih, b_hh))
        ctx.mode = mode
        ctx.backend = backend
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
        return h1 if c1 is None else (h1, c1)

    @staticmethod
    def backward(ctx, d_h1, d_c1=None):
        saved = ctx.saved_tensors  # raises if one was changed in place since forward
        if _backward_through_torch_ops((d_h1, d_c1)):
            grads = _differentiate_torch_graph(
                lambda *t: _torch_cell(ctx.mode, *t), saved, ctx.needs_input_grad[2:],
                (d_h1, d_c1))
            return (None, None, *grads)
        x, h0, c0, w_ih, w_hh, b_ih, b_hh = saved
        N = x.shape[0]
        names = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
        # h1 is both output[0] and h_n[0]: its gradient goes in as d_output.
        dx, dh0, dc0, grads = _backward_new_gradients(
            ctx.backend, ctx.cache, d_h1.detach().contiguous().numpy().reshape(1, N, -1), None,
            None if c0 is None else d_c1.detach().contiguous().numpy().reshape(1, N, -1))
        g = [None if w is None else torch.from_numpy(grads[name])
             for name, w in zip(names, (w_ih, w_hh, b_ih, b_hh))]
        return (None, None, torch.from_numpy(dx[0]), torch.from_numpy(dh0[0]),
                None if c0 is None else torch.from_numpy(dc0[0]), *g)


class _FastCellMixin:
    """The forward shared by the three cell classes; the rest is torch's nn.RNNCellBase.

    Well-formed calls go to the kernels; anything else goes to torch's forward, which
    computes or raises exactly what torch does.
    """

    _lstmfast_backend = "fused"
    zoneout = (0.0, 0.0)  # set by the constructors (docs/cells.md, Recurrent dropout and zoneout)
    recurrent_dropout = 0.0
    _recurrent_dropout_mask = None  # kept for the steps of a sequence (Keras's convention)

    def __init__(self, *args, zoneout=0.0, recurrent_dropout=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.zoneout = _check_zoneout(zoneout, "LSTM" if isinstance(self, nn.LSTMCell) else "GRU")
        self.recurrent_dropout = _check_probability("recurrent_dropout", recurrent_dropout,
                                                    upper_open=True)

    def reset_recurrent_dropout_mask(self):
        """Start a new sequence: the next training step draws a new recurrent dropout mask
        (from torch's generator), which the steps after it keep, as Keras's cells do."""
        self._recurrent_dropout_mask = None

    def forward(self, input, hx=None, *, zoneout_mask=None,  # noqa: A002  (torch's name)
                recurrent_dropout_mask=None):
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


@torch.compiler.disable  # as _fused_layer_forward
def _fused_cell_forward(self, input, hx):
    # Decoders call this once per step: every check here is paid per step, so the
    # path is kept short (about 2x the kernel's own time at H = 32).
    mode = self._lstmfast_mode
    is_lstm = mode == "LSTM"
    weights = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
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
        result = _CellFunction.apply(backend, mode, x, h0, c0, *weights)
    else:  # nothing to differentiate: the kernels alone, no autograd node
        h1, c1, _ = _cell_step(backend, mode, False, x, h0, c0, weights)
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


# ---------------------------------------------------------------------------
# accelerate / restore
# ---------------------------------------------------------------------------

_SWAPS = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN,
          nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell, nn.RNNCell: RNNCell,
          nnqd.LSTM: QuantizedLSTM, nnqd.GRU: QuantizedGRU}
_RESTORES = {fast: plain for plain, fast in _SWAPS.items()}
_twins = {}  # (parametrized class, new base) -> its twin over that base
_twin_origins = {}  # twin -> the parametrized class it was made from


def _swapped_class(cls, table):
    """The class ``table`` maps ``cls`` to; a parametrized module's class (torch makes
    a subclass per module, holding the parametrized attributes) gets a twin over the
    new base, and a twin goes back to the class it came from. None when ``cls`` is
    not one to swap."""
    if cls in table:
        return table[cls]
    if cls.__module__ != parametrize.__name__:  # where torch makes its Parametrized<Base>
        return None
    base = cls.__bases__[0]
    if base not in table:
        return None
    origin = _twin_origins.get(cls)
    if origin is not None and origin.__bases__[0] is table[base]:
        return origin
    key = (cls, table[base])
    if key not in _twins:
        attrs = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        twin = type(cls.__name__, (table[base],), attrs)
        _twins[key] = twin
        _twin_origins[twin] = cls
    return _twins[key]


def _as_class(module, cls):
    """A shallow twin of ``module`` of class ``cls``: the same parameter objects, its own
    registries (so registering on one does not change the other)."""
    twin = copy.copy(module)
    for registry in ("_parameters", "_buffers", "_modules"):
        setattr(twin, registry, dict(getattr(module, registry)))
    twin.__class__ = cls
    return twin


def _swap_all(model, table, what):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        cls = _swapped_class(type(module), table)
        if cls is not None:
            module.__class__ = cls
    return model


def accelerate(model):
    """Make every ``nn.LSTM``/``GRU``/``RNN`` and ``nn.LSTMCell``/``GRUCell``/``RNNCell``
    in ``model`` (itself included) an lstmfast one, and every dynamically quantized
    ``torch.ao.nn.quantized.dynamic.LSTM``/``GRU`` a ``QuantizedLSTM``/``QuantizedGRU``.

    The swap changes each module's class in place: parameters, buffers, hooks,
    parametrizations and the training flag stay exactly as they were. Subclasses of
    the torch modules are left alone, since they may override ``forward``.
    ``restore(model)`` undoes it. Returns ``model``.

    torchaudio's RNN-T ``_CustomLSTM`` modules (the Emformer RNN-T predictor's
    layer-normalized LSTMs) run on lstmfast's LayerNormLSTM kernels too.
    """
    return _swap_all(model, {**_SWAPS, **_torchaudio_swaps()}, "accelerate")


def restore(model):
    """Undo ``accelerate``: every lstmfast module in ``model`` becomes the torch class it
    came from, with its parameters, hooks and state as they are. Returns ``model``."""
    back = {twin: custom for custom, twin in _torchaudio_swaps().items()}
    return _swap_all(model, {**_RESTORES, **back}, "restore")


def quantize_dynamic(model, qconfig_spec=None, dtype=torch.qint8, inplace=False):
    """``torch.ao.quantization.quantize_dynamic`` followed by ``accelerate``: the
    model's LSTM and GRU layers get torch's int8 weights and run on lstmfast's int8
    kernels (the other modules are quantized exactly as torch's function does).
    Arguments are torch's; ``dtype`` must be ``torch.qint8`` (torch.float16 layers
    would run torch's kernels: use torch's function for them). Layers already
    accelerated are quantized too. Returns the quantized model.
    """
    if dtype != torch.qint8:
        raise ValueError(
            f"quantize_dynamic: dtype must be torch.qint8 (lstmfast's int8 kernels), got {dtype}")
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"quantize_dynamic: model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    restore(model)  # torch's function matches modules by their exact class
    model = torch.ao.quantization.quantize_dynamic(model, qconfig_spec, dtype=dtype,
                                                   inplace=True)
    return accelerate(model)
