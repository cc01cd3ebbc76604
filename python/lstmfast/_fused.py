"""The fused C++ kernels behind the two functions of :mod:`lstmfast.reference`.

``forward`` and ``backward`` take and return exactly what ``reference.forward`` and
``reference.backward`` do (see their docstrings: they are the specification); only
the cache differs: here it wraps what the C++ forward saved for BPTT (gate
activations, cell states, h per step) in one block of memory.

This module passes the parameters to the compiled module by name, as the layers
hold them; shapes, dtypes and lengths are checked there, and its errors name the
offending argument.

ONNX's options (docs/onnx.md): the kernels of the cells with the ``onnx_gates``
feature compute hard sigmoid gates, input_forget and the clip, forward and backward;
the other activations run in the reference.
"""

import numpy as np

from . import _cells, reference
from ._config import get_num_threads
from ._native import _core

#: True when the compiled module carries the recurrent kernels.
available = hasattr(_core, "rnn_forward") and hasattr(_core, "rnn_backward")

get_num_threads()  # settles the thread count (LSTMFAST_NUM_THREADS) in BLAS and the kernels

MODES = _cells.MODES
_CELL_STATE_MODES = _cells.CELL_STATE_MODES
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_CELL_NAMES = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")  # cell_forward's
# The modes whose parameters are those four alone: a one-step call of one layer of
# them runs through _core.cell_step (see forward).
_ONE_STEP_MODES = frozenset(("LSTM", "GRU", "GRU_RESET_BEFORE", "RNN_TANH", "RNN_RELU"))
_ONE_STEP_NAMES = frozenset(_CELL_NAMES)


class _Cache:
    """What a training forward keeps for backward: the C++ cache and the parameter layout."""

    __slots__ = ("core", "mode", "num_layers", "D", "dtype", "_shapes", "_cell_weights")

    def __init__(self, core, mode, num_layers, D, dtype, shapes, cell_weights=None):
        self.core = core
        self.mode = mode
        self.num_layers = num_layers
        self.D = D
        self.dtype = dtype
        self._shapes = shapes
        self._cell_weights = cell_weights  # a cell step's, until its shapes are asked for

    @property
    def shapes(self):
        """Name -> shape, for every parameter given to forward. A cell step's are
        worked out when first asked for: most steps of a loop never are (their weight
        gradients go to the pass's anchor), and the dict cost a step 1-2 us."""
        if self._shapes is None:
            self._shapes = {name: np.shape(w) for name, w in zip(_CELL_NAMES, self._cell_weights)
                            if w is not None}
            self._cell_weights = None
        return self._shapes

    @property
    def nbytes(self):
        return self.core.nbytes

    @property
    def hands_back_gate_grads(self):
        """Whether gate_gradients_backward serves this cache."""
        return self.core.hands_back_gate_grads


def kernel_gate_options(mode, activations=None, clip=None, input_forget=False):
    """The kernels' cell_options for ONNX's options: {} for none, a dict of clip,
    input_forget and hard_sigmoid (alpha, beta) where the kernels compute them, or
    None where the reference must."""
    if activations is None and clip is None and not input_forget:
        return {}  # torch's cell: every forward call, so nothing is resolved
    own = reference.resolve_activations(mode)
    triples = own if activations is None else reference.resolve_activations(mode, activations)
    if triples == own and clip is None and not input_forget:
        return {}
    if not _cells.supports(mode, "onnx_gates") or triples[1:] != own[1:]:
        return None
    gate, alpha, beta = triples[0]
    if gate != own[0][0] and not (gate == "hardsigmoid" and own[0][0] == "sigmoid"):
        return None
    return {"clip": clip, "input_forget": bool(input_forget),
            "hard_sigmoid": (alpha, beta) if gate == "hardsigmoid" else None}


def fused(mode, activations=None, clip=None, input_forget=False):
    """Whether the kernels compute ``mode`` with these ONNX options (else the reference does)."""
    return kernel_gate_options(mode, activations, clip, input_forget) is not None


def forward(mode, x, hx, params, *, num_layers, bidirectional, proj_size=0,
            lengths=None, dropout_masks=None, training=False, alpha=1.0, leak="outside",
            noise=None, layer_norm_eps=1e-5, recurrent_dropout_masks=None, zoneout_masks=None,
            zoneout_seed=None, activations=None, clip=None, input_forget=False, reverse=False):
    """Forward pass of a stacked (bi)directional LSTM / GRU / RNN; as reference.forward."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    gate_options = kernel_gate_options(mode, activations, clip, input_forget)
    if gate_options is None:
        return reference.forward(
            mode, x, hx, params, num_layers=num_layers, bidirectional=bidirectional,
            proj_size=proj_size, lengths=lengths, dropout_masks=dropout_masks, training=training,
            alpha=alpha, leak=leak, noise=noise, layer_norm_eps=layer_norm_eps,
            recurrent_dropout_masks=recurrent_dropout_masks, zoneout_masks=zoneout_masks,
            zoneout_seed=zoneout_seed, activations=activations, clip=clip,
            input_forget=input_forget, reverse=reverse)
    x = np.asarray(x)
    if x.dtype not in _DTYPES:
        raise TypeError(f"x: expected dtype float32 or float64, got {x.dtype}")
    dtype = x.dtype
    D = 2 if bidirectional else 1
    if mode in _CELL_STATE_MODES:
        h0, c0 = hx
        c0 = np.asarray(c0, dtype=dtype)
    else:
        h0, c0 = hx, None
    h0 = np.asarray(h0, dtype=dtype)
    if (x.ndim == 3 and x.shape[0] == 1 and num_layers == 1 and not bidirectional
            and not reverse and not proj_size and lengths is None and dropout_masks is None
            and not training and not gate_options and mode in _ONE_STEP_MODES and noise is None
            and recurrent_dropout_masks is None and zoneout_masks is None
            and params.keys() <= _ONE_STEP_NAMES):
        # One step of one layer (a stream fed a frame at a time): the lean entry
        # cell_step, the same kernels without rnn_forward's keywords and option
        # dicts to parse (about 5 us of a call of 10 at H = 32).
        output, h_n, c_n, _ = _core.cell_step(
            mode, x, h0, c0, *[_weight(params.get(name)) for name in _CELL_NAMES], False)
        return output, h_n, c_n, None
    if lengths is not None:
        lengths = np.asarray(lengths)
    if dropout_masks is not None:
        dropout_masks = [np.asarray(m, dtype=dtype) for m in dropout_masks]
    if noise is not None:
        noise = np.asarray(noise, dtype=dtype)
    if recurrent_dropout_masks is not None:
        recurrent_dropout_masks = np.asarray(recurrent_dropout_masks, dtype=dtype)
    if zoneout_masks is not None:  # each None, a probability or masks
        zoneout_masks = [None if m is None else float(m) if np.ndim(m) == 0
                         else np.asarray(m, dtype=dtype) for m in zoneout_masks]
    output, h_n, c_n, core = _core.rnn_forward(
        mode, x, h0, c0, {name: _weight(value) for name, value in params.items()},
        num_layers=num_layers, bidirectional=bidirectional, reverse=bool(reverse),
        proj_size=proj_size, lengths=lengths, dropout_masks=dropout_masks,
        training=bool(training),
        cell_options={"alpha": float(alpha), "leak": leak, "noise": noise,
                      "layer_norm_eps": float(layer_norm_eps), **gate_options},
        regularizers={"recurrent_dropout_masks": recurrent_dropout_masks,
                      "zoneout_masks": zoneout_masks, "zoneout_seed": zoneout_seed})
    cache = None
    if core is not None:
        shapes = {name: np.shape(params[name]) for name in params}
        cache = _Cache(core, mode, num_layers, D, dtype, shapes)
    return output, h_n, c_n, cache


def plain_forward(mode, x, hx, params, num_layers, bidirectional, proj_size):
    """forward at inference with nothing but torch's arguments, for the layers' short
    paths (a stream's frames): x an array of float32 or float64 and hx arrays of its
    dtype (the compiled module checks their shapes); params the arrays or packed
    reduced weights (_core.ReducedWeight) by name, passed as they are. One step of one
    layer goes to the lean entry cell_step directly. Returns output, h_n, c_n (None
    but for LSTM)."""
    if mode in _CELL_STATE_MODES:
        h0, c0 = hx
    else:
        h0, c0 = hx, None
    if (x.shape[0] == 1 and num_layers == 1 and not bidirectional and not proj_size
            and mode in _ONE_STEP_MODES and params.keys() <= _ONE_STEP_NAMES):
        output, h_n, c_n, _ = _core.cell_step(
            mode, x, h0, c0, params["weight_ih_l0"], params["weight_hh_l0"],
            params.get("bias_ih_l0"), params.get("bias_hh_l0"), False)
        return output, h_n, c_n
    output, h_n, c_n, _ = _core.rnn_forward(
        mode, x, h0, c0, params, num_layers=num_layers, bidirectional=bidirectional,
        proj_size=proj_size)
    return output, h_n, c_n


def _weight(value):
    """A parameter for the compiled module: an array, a packed reduced weight
    (_core.ReducedWeight, from pack_weight), a packed float weight
    (_core.PackedWeight, from pack_gates), or None."""
    if value is None or isinstance(value, (_core.ReducedWeight, _core.PackedWeight)):
        return value
    return np.asarray(value)


def pack_gates(mode, weight, recurrent):
    """weight_ih (recurrent False) or weight_hh of a float layer of ``mode`` packed once
    for the kernels in use (a frozen layer's: lstmfast.freeze), given to forward in
    place of the weight; its ``weight`` is a read-only copy of the array."""
    return _core.pack_gates(mode, np.asarray(weight), bool(recurrent))


def pack_weight(weight):
    """The compiled module's packed form of a reference.Int8Weight or BFloat16Weight,
    made once per quantized layer and given to forward in place of the weight."""
    if hasattr(weight, "q"):
        return _core.pack_int8(weight.q, weight.scale)
    return _core.pack_bfloat16(weight.bits)


def fresh_gradients_backward(cache, d_output, d_h_n=None, d_c_n=None, consume=False, empty=np.empty,
                             input_grad=True):
    """``backward`` into new gradient arrays, which the kernels write without their
    being cleared first: clearing a cell's step's set cost as much as filling it
    (4H x (I + H) values each).
    ``empty`` makes the arrays (tests give one that fills them with NaN).
    ``input_grad=False``: dx is not computed, and None (see backward)."""
    if isinstance(cache, dict):  # a forward the reference computed (see fused)
        return backward(cache, d_output, d_h_n, d_c_n, consume=consume, input_grad=input_grad)
    _check_cache(cache)
    grads = {name: empty(shape, dtype=cache.dtype) for name, shape in cache.shapes.items()}
    return (*_backward_into(cache, d_output, d_h_n, d_c_n, grads, consume, True, input_grad),
            grads)


def summing_backward(cache, d_output, d_h_n, d_c_n, grads, assign, input_grad=True):
    """``backward`` adding the parameter gradients into ``grads`` (a dict of C-contiguous
    writeable arrays of the cache's shapes and dtype, as ``cache.shapes`` names them),
    or writing them there with ``assign`` (whatever the arrays held): a cell stepped in
    a loop sums its steps' weight gradients in one set of arrays, which autograd then
    takes once, instead of a set per step that autograd adds up."""
    _check_cache(cache)
    return _backward_into(cache, d_output, d_h_n, d_c_n, grads, False, assign, input_grad)


def gate_gradients_backward(cache, d_output, d_h_n, d_c_n, input_grad=True):
    """``backward`` without the parameter gradients, for a cache that
    ``hands_back_gate_grads`` (one layer and direction walked forward, of an LSTM
    without projection or peepholes, a GRU or an RNN, without lengths or
    regularizers). Returns dx, dh0, dc0 and the gate gradients (dG_x, dG_h, h_prev):
    the input side's (T, N, G*H), the recurrent side's where they differ (the GRU's;
    else None: dG_x serves) and the state each step read (T, N, H). Over all of a
    cell's steps the weight gradients are dG_x^T x and dG_h^T h_prev, the biases'
    the column sums of dG_x and dG_h (gate_weight_gradients): one product per
    backward pass where each step's backward read and wrote all of them."""
    _check_cache(cache)
    dx, dh0, dc0, dG_x, dG_h, h_prev = _core.rnn_backward(
        cache.core, *_output_grads(cache, d_output, d_h_n, d_c_n), None, False, False,
        input_grad, True)
    return dx, dh0, dc0, (dG_x, dG_h, h_prev)


def gate_weight_gradients(dW, db, dG, inputs, assign):
    """dW (+)= dG^T inputs and db (+)= the column sums of dG (db may be None), over
    every row: dG (rows, G*H) as gate_gradients_backward hands back (steps stacked),
    inputs (rows, I or H) their x or h_prev. ``assign`` writes dW and db over."""
    _core.gate_weight_gradients(dW, db, dG, inputs, bool(assign))


def _backward_into(cache, d_output, d_h_n, d_c_n, grads, consume, assign, input_grad):
    """The kernels' backward of a checked cache into ``grads`` (arrays they can write:
    added into, or written with ``assign``); returns dx, dh0, dc0."""
    return _core.rnn_backward(cache.core, *_output_grads(cache, d_output, d_h_n, d_c_n),
                              grads, consume, bool(assign), input_grad)


def _check_cache(cache):
    if cache is None:
        raise ValueError("backward needs the cache of a forward(..., training=True) call")
    if not isinstance(cache, _Cache):
        raise TypeError(f"cache: expected the cache of lstmfast._fused.forward, "
                        f"got {type(cache).__name__}")


def _output_grads(cache, d_output, d_h_n, d_c_n):
    """The gradients of the outputs in the cache's dtype (None stays None: zeros)."""
    def as_dtype(a):
        return None if a is None else np.asarray(a, dtype=cache.dtype)

    return (as_dtype(d_output), as_dtype(d_h_n),
            as_dtype(d_c_n) if cache.mode in _CELL_STATE_MODES else None)


def cell_forward(mode, x, hx, weights, training=False):
    """One step of one cell, as forward with num_layers=1, unidirectional, and the
    parameters already in the compiled module's order: ``weights`` is
    [weight_ih, weight_hh, bias_ih or None, bias_hh or None]. ``x``: (1, N, I) and
    the state(s) (1, N, H) must already be arrays of one float dtype (the compiled
    module checks shapes and dtypes). Returns h_n, c_n (None but for LSTM), cache."""
    h0, c0 = hx if mode == "LSTM" else (hx, None)
    _, h_n, c_n, core = _core.cell_step(mode, x, h0, c0, *weights, bool(training))
    cache = None
    if core is not None:
        cache = _Cache(core, mode, 1, 1, x.dtype, None, tuple(weights))
    return h_n, c_n, cache


def backward(cache, d_output, d_h_n=None, d_c_n=None, grads=None, consume=False,
             input_grad=True):
    """Backpropagation through time for a forward(..., training=True) call; as reference.backward.

    Parameter gradients are ADDED into ``grads`` in place; when None, new arrays are
    made and filled (see fresh_gradients_backward). With ``consume`` the gate
    gradients are written over the saved gates instead of into scratch of the same
    size, and a later backward with this cache raises ValueError. With
    ``input_grad=False`` dx is None: the input's gradient is not computed (a third of
    a layer's non-recurrent backward work, when its input is data).
    """
    if isinstance(cache, dict):  # a forward the reference computed (see fused)
        dx, dh0, dc0, grads = reference.backward(cache, d_output, d_h_n, d_c_n, grads=grads,
                                                 consume=consume)
        return (dx if input_grad else None), dh0, dc0, grads
    if grads is None:
        return fresh_gradients_backward(cache, d_output, d_h_n, d_c_n, consume=consume,
                                        input_grad=input_grad)
    _check_cache(cache)
    dtype = cache.dtype

    # The kernels add into C-contiguous writeable arrays of the right dtype; any
    # other gradient array gets a zeroed stand-in, added into it afterwards.
    targets, late = {}, []
    for name, shape in cache.shapes.items():
        g = grads[name]
        if (isinstance(g, np.ndarray) and g.dtype == dtype and g.flags.c_contiguous
                and g.flags.writeable and g.shape == shape):
            targets[name] = g
        else:
            stand_in = np.zeros(shape, dtype=dtype)
            late.append((name, stand_in))
            targets[name] = stand_in
    dx, dh0, dc0 = _backward_into(cache, d_output, d_h_n, d_c_n, targets, consume, False,
                                  input_grad)
    for name, stand_in in late:
        grads[name][...] += stand_in
    return dx, dh0, dc0, grads
