"""The autograd Functions: ``_RecurrentFunction`` (forward and BPTT of a whole stack)
and ``_CellFunction`` (one step of one cell) on an lstmfast backend.

``_stack_step`` and ``_cell_step`` are their calls of the backend, which the layers
and cells also make directly when nothing needs a gradient (no autograd node). A
backward that needs a graph differentiates the torch-op loops of loops.py instead of
running the fused BPTT (``_differentiate_torch_graph``).
"""

import collections
import sys
import threading
import weakref

import numpy as np
import torch

from .._cells import CELL_STATE_MODES
from ._backend import _as_numpy, _backward_through_torch_ops, _fused_backend_or_none
from .loops import _torch_cell, _torch_stack


_CELL_STATE_MODES = CELL_STATE_MODES  # the backends' modes whose state is (h, c)


class _GradientArrays:
    """Arrays for the parameter gradients that backward hands to autograd, each made
    again once autograd has let go of it.

    A backward pass hands autograd a set of weight gradients per pass and module
    (_WeightGradientSums), or per call where that does not serve, and autograd frees
    them after adding them up. New arrays each time meant new memory from the system
    each time (glibc gives freed blocks of this size back to it at once), and the page
    faults cost more than the backward: a 100-step LSTMCell(256) loop at N=1, a set
    per step, took 298 ms a training step against torch's 99 ms, and 68 ms with malloc
    told to keep its memory. An array is free again when nothing but this pool refers
    to it (the tensor that torch.from_numpy made of it holds a reference until it is
    freed).
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


def _backward_new_gradients(backend, cache, d_output, d_h_n, d_c_n, input_grad):
    """backend.backward into gradient arrays of its own (the fused backend's come from
    _gradient_arrays, filled without being cleared first). Without ``input_grad`` the
    input's gradient is None, and the fused backend does not compute it, as torch's
    autograd skips what no input needs."""
    if backend is _fused_backend_or_none():
        return backend.fresh_gradients_backward(cache, d_output, d_h_n, d_c_n,
                                                empty=_gradient_arrays.empty,
                                                input_grad=input_grad)
    dx, dh0, dc0, grads = backend.backward(cache, d_output, d_h_n, d_c_n)
    return (dx if input_grad else None), dh0, dc0, grads


def _backward_gradients(backend, cache, sums, x, d_output, d_h_n, d_c_n, input_grad):
    """The backward of one call (a cell's step, a layer's call on ``x``, a tensor):
    dx, dh0, dc0 and its parameter gradients by name, or None for them where the
    module's _WeightGradientSums takes them (``sums``, when this pass will run its
    anchor): the call hands it its gate gradients (_PassGradients.steps), or, where
    the kernels cannot hand them back, adds its gradients into the pass's arrays.
    Otherwise as _backward_new_gradients: a cache of the reference (a dict: ONNX's
    activations the kernels lack) makes gradients of its own."""
    if (sums is not None and not isinstance(cache, dict)
            and torch._C._will_engine_execute_node(sums.node)):
        this_pass = sums.for_this_pass()
        if this_pass.takes_gate_gradients(cache, d_output):
            dx, dh0, dc0, gates = backend.gate_gradients_backward(cache, d_output, d_h_n, d_c_n,
                                                                  input_grad)
            this_pass.add_step(x, gates)
            return dx, dh0, dc0, None
        grads, new = this_pass.arrays_for()
        dx, dh0, dc0 = backend.summing_backward(cache, d_output, d_h_n, d_c_n, grads, new,
                                                input_grad)
        return dx, dh0, dc0, None
    return _backward_new_gradients(backend, cache, d_output, d_h_n, d_c_n, input_grad=input_grad)


def _tensor_or_none(array):
    return None if array is None else torch.from_numpy(array)


def _differentiate_torch_graph(recompute, saved, needs_input_grad, grad_outputs):
    """Gradients of ``recompute(*saved)`` (torch's own ops) with a graph of their own
    (see _backward_through_torch_ops). They are this node's partial derivatives: the
    ops run on an alias of each input (a view, its own node), and the gradients are
    taken at the aliases. Taken at the inputs themselves, they would also follow
    every other path from the outputs to them: a cell's step t reads its weights
    directly and through h of step t - 1, so each step added the steps before it
    once more (a 2-step RNNCell loop's bias gradient was off by a third)."""
    with torch.enable_grad():
        saved = [t.view_as(t) if t is not None and t.requires_grad else t for t in saved]
        outputs = recompute(*saved)
        wanted = [t for t, need in zip(saved, needs_input_grad) if need and t is not None]
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                    create_graph=True, allow_unused=True, materialize_grads=True)
    grads = iter(grads)
    return [next(grads) if need and t is not None else None
            for t, need in zip(saved, needs_input_grad)]


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


def _array(value):
    """An array as it is, a tensor as a NumPy view."""
    return value if isinstance(value, np.ndarray) else _as_numpy(value)


def _stack_step(settings, x, h0, c0, masks, weights, weight_arrays=None):
    """The whole stack on the backend: output, h_n, c_n (an empty tensor but for
    LSTM) as tensors, and the cache (None unless settings["keep_for_backward"]).
    h0 and c0 may be arrays; weight_arrays: the weights' arrays already made
    (_backend._weight_arrays)."""
    is_lstm = settings["mode"] in _CELL_STATE_MODES
    if weight_arrays is None:
        weight_arrays = [_as_numpy(w) if isinstance(w, torch.Tensor) else w for w in weights]
    params = dict(zip(settings["names"], weight_arrays))
    hx = (_array(h0), _array(c0)) if is_lstm else _array(h0)
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
    non-LSTM), dropout masks (or an empty tensor), the token of the module's
    _WeightGradientSums (settings["weight_gradient_sums"]; or None), then the flat
    weights in the module's ``_flat_weights_names`` order. All are saved for backward, so changing
    one in place before backward raises torch's "modified by an inplace operation"
    error (the kernels' cache reads x and the weights where they are).
    """

    @staticmethod
    def forward(ctx, settings, x, h0, c0, masks, token, *weights):
        out, h_n, c_n, ctx.cache = _stack_step(settings, x, h0, c0, masks, weights,
                                               settings.get("weight_arrays"))
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
            needs = ctx.needs_input_grad
            grads = _differentiate_torch_graph(
                lambda *t: _torch_stack(settings, *t), saved, needs[1:5] + needs[6:],
                (d_output, d_h_n, d_c_n if is_lstm else None))
            return (None, *grads[:4], None, *grads[4:])
        if ctx.cache is None:
            raise RuntimeError("lstmfast: this forward kept nothing for backward")
        d_outputs = (_as_numpy(d_output.contiguous()), _as_numpy(d_h_n.contiguous()),
                     _as_numpy(d_c_n.contiguous()) if is_lstm else None)
        dx, dh0, dc0, grads = _backward_gradients(
            settings["backend"], ctx.cache, settings.get("weight_gradient_sums"), saved[0],
            *d_outputs, ctx.needs_input_grad[1])
        names = settings["names"]
        weight_grads = ((None,) * len(names) if grads is None  # the anchor returns them
                        else tuple(torch.from_numpy(grads[name]) for name in names))
        return (None, _tensor_or_none(dx), torch.from_numpy(dh0),
                torch.from_numpy(dc0) if is_lstm else None, None, None, *weight_grads)


def _cell_step(backend, mode, keep, x, h0, c0, weights, weight_arrays=None):
    """One step on the kernels: x (N, I), h0 and c0 (N, H) (c0 None but for LSTM),
    weights (weight_ih, weight_hh, bias_ih, bias_hh; biases may be None), or their
    arrays already made (weight_arrays: _backend._weight_arrays).
    Returns h1, c1 (None but for LSTM) as tensors, and the cache (None unless keep)."""
    N = x.shape[0]
    h0 = _as_numpy(h0).reshape(1, N, -1)
    hx = (h0, _as_numpy(c0).reshape(1, N, -1)) if c0 is not None else h0
    x = _as_numpy(x).reshape(1, N, -1)
    if weight_arrays is not None:
        weights = weight_arrays
    else:
        weights = [None if w is None else _as_numpy(w) for w in weights]
    if backend is _fused_backend_or_none():
        h1, c1, cache = backend.cell_forward(mode, x, hx, weights, keep)
    else:  # the reference has no one-step entry: the stack with T = 1
        names = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
        params = {name: w for name, w in zip(names, weights) if w is not None}
        _, h1, c1, cache = backend.forward(mode, x, hx, params, num_layers=1,
                                           bidirectional=False, training=keep)
    return torch.from_numpy(h1[0]), (None if c1 is None else torch.from_numpy(c1[0])), cache


_CELL_PARAMETER_NAMES = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
# The engine's pass in progress, and whether it will run a node: what torch's own
# multi-grad hooks ask (torch.autograd.graph); without them the steps' weight
# gradients go to autograd one set per step.
_ENGINE_TELLS_PASSES = (hasattr(torch._C, "_current_graph_task_id")
                        and hasattr(torch._C, "_will_engine_execute_node"))


class _PassGradients:
    """What the steps of one backward pass leave for their module's weight gradients:
    the gate gradients of each step (``steps``: the kernels' gate_gradients_backward,
    with the step's input), multiplied by the steps' inputs at once when the anchor
    runs, and arrays that steps the kernels cannot hand their gate gradients back for
    (a stack, a projection, peepholes, lengths) add their gradients into.

    The steps kept grow with the pass (1000 steps of an LSTMCell(1024) at N=64 hand
    back 1.3 GB), the arrays do not: once the steps kept hold more than a set of
    weight gradients, and more than _KEPT_BYTES, they are multiplied into the arrays
    and dropped. That bounds what a pass keeps beyond its arrays by about what the
    arrays take, and leaves each product many rows."""

    _KEPT_BYTES = 16 << 20

    # Where the steps' sums win: weight gradients of at most this many bytes (they stay
    # in a core's cache while each call adds into them) and calls of more than
    # _SUMMED_FROM_ROWS rows (T x N: each call's product is then a GEMM of its own).
    # A layer fed a frame per call, 64 frames, one thread, Zen 4, AVX-512, float32,
    # backward of the whole rollout, gate gradients against sums: GRU(64, 256) (1 MB
    # of weight gradients) N=4 6.1 against 6.0 ms, N=8 10.3 against 8.6, N=32 28.7
    # against 23.0; LSTM(64, 256) (1.3 MB) N=4 6.6 against 7.4, N=8 10.3 against 10.6,
    # N=32 33.0 against 32.0; LSTM(256, 512) N=32 128 against 168 ms, GRU 92 against
    # 89; GRU(512, 1024) N=32 385 against 466 ms.
    _SUMMED_MAX_BYTES = 1 << 20
    _SUMMED_FROM_ROWS = 8
    # Calls of more rows sum whatever their weights: a whole sequence's backward makes
    # its weight gradients in one GEMM over all its rows already, from scratch it
    # keeps (the gate gradients handed back are new arrays each call: LSTM T=100 N=32
    # I=H=256 trained on two threads ran 0.94x torch that way, 1.01x before).
    _GATES_MAX_ROWS = 64

    __slots__ = ("arrays", "steps", "shapes", "dtype", "weight_bytes", "kept_bytes")

    def __init__(self):
        self.arrays = None  # name -> array, once steps summed or were multiplied into them
        self.steps = []  # (dG_x, dG_h or None, h_prev, x) per step, each (rows, ...)
        self.shapes = self.dtype = self.weight_bytes = None  # the module's, from its first call
        self.kept_bytes = 0

    def takes_gate_gradients(self, cache, d_output):
        """Whether a call (its cache, and the gradient of its output, (T, N, ...))
        hands this pass its gate gradients rather than summing its weight gradients.
        Every call of the pass asks first: the first one's cache gives the module's
        parameter shapes and dtype, which all its calls share."""
        if self.shapes is None:
            self.shapes, self.dtype = cache.shapes, cache.dtype
            self.weight_bytes = (sum(int(np.prod(shape)) for shape in self.shapes.values())
                                 * np.dtype(self.dtype).itemsize)
        if not cache.hands_back_gate_grads:
            return False
        rows = d_output.shape[0] * d_output.shape[1]
        return rows < self._SUMMED_FROM_ROWS or (
            rows <= self._GATES_MAX_ROWS and self.weight_bytes > self._SUMMED_MAX_BYTES)

    def add_step(self, x, gates):
        """Keeps a call's gate gradients (gate_gradients_backward's) and its input
        ``x`` (a tensor)."""
        dG_x, dG_h, h_prev = gates
        rows = dG_x.shape[0] * dG_x.shape[1]
        self.steps.append((dG_x.reshape(rows, -1), None if dG_h is None else dG_h.reshape(rows, -1),
                           h_prev.reshape(rows, -1), _as_numpy(x).reshape(rows, -1)))
        self.kept_bytes += dG_x.nbytes + h_prev.nbytes + (0 if dG_h is None else dG_h.nbytes)
        if self.kept_bytes > max(self._KEPT_BYTES, self.weight_bytes):
            self._multiply_steps(self.shapes.keys())

    def arrays_for(self):
        """The arrays a step adds into, and whether they are new (the step then writes
        them instead of adding)."""
        if self.arrays is not None:
            return self.arrays, False
        self.arrays = {name: _gradient_arrays.empty(shape, self.dtype)
                       for name, shape in self.shapes.items()}
        return self.arrays, True

    def gradients(self, wanted):
        """The weight gradients by name (those ``wanted`` at least): the arrays, with
        the steps kept multiplied into them."""
        if self.steps:
            self._multiply_steps(wanted)
        return self.arrays or {}

    def _multiply_steps(self, wanted):
        """Adds the kept steps' weight gradients of the weights ``wanted`` (by name) into
        the arrays (made, and written, where there are none yet), and drops the steps."""
        steps, self.steps, self.kept_bytes = self.steps, [], 0
        if self.arrays is None:
            self.arrays = {}

        def stacked(i):
            return steps[0][i] if len(steps) == 1 else np.concatenate([step[i] for step in steps])

        dG_x = stacked(0)
        split = steps[0][1] is not None  # the GRU's recurrent gate gradients differ
        sides = (("weight_ih_l0", "bias_ih_l0", lambda: dG_x, lambda: stacked(3)),
                 ("weight_hh_l0", "bias_hh_l0", lambda: stacked(1) if split else dG_x,
                  lambda: stacked(2)))
        for weight, bias, dG, inputs in sides:
            has_bias = bias in self.shapes
            if weight not in wanted and not (has_bias and bias in wanted):
                continue
            dW = self.arrays.get(weight)
            new = dW is None  # then its bias's array is new too: the arrays come in sets
            if new:
                dW = self.arrays[weight] = _gradient_arrays.empty(self.shapes[weight], self.dtype)
                if has_bias:
                    self.arrays[bias] = _gradient_arrays.empty(self.shapes[bias], self.dtype)
            _fused_backend_or_none().gate_weight_gradients(
                dW, self.arrays.get(bias), dG(), inputs(), new)


class _WeightGradientSums:
    """A stepped cell's weight gradients, computed once per backward pass over all its
    steps and handed to autograd once.

    Each step's backward returned a full set of weight gradients (4H x (I + H) values)
    for autograd to add up: for a 100-step LSTMCell(256) loop at N=1 those additions
    took longer than the kernels' own backward. Here every step node takes one more
    input, ``token``, the output of an anchor node (_WeightGradientAnchor) whose
    inputs are the weights. The engine runs the anchor after every step node of the
    pass that feeds it. Each step hands the pass (_PassGradients) its gate gradients,
    and the anchor multiplies those of all steps by the steps' inputs (one product
    per weight over all rows of all steps) and returns the weights' gradients. Where
    the kernels cannot hand back gate gradients (a stack, a projection), each step
    adds its weight gradients into the pass's arrays instead (the kernels'
    accumulating backward, the first step writing them): summed step by step, each
    step reading and writing all of them. That was the way of every step before, and
    a Tacotron decoder's two LSTMCells of 1024 units (N=4) moved 71 MB a step so: its
    training step took 1.35 s, and 1.02 s with the gate gradients (float32, two
    threads, AVX-512).

    The passes are told apart by the engine's graph task id, so two passes over one
    graph (retain_graph) and passes that do not reach the weights
    (``torch.autograd.grad`` of the input only: the anchor does not run, and the
    steps then return their gradients as before) never mix. One anchor serves the
    module's steps until its weights (the objects, or which of them require a
    gradient) change."""

    # Passes kept at once: a pass and the passes nested in it (reentrant checkpointing);
    # one that ended before its anchor ran (an error in backward) drops out, and with it
    # what its steps left (32 MB of sums for an LSTM of I = H = 1024).
    _PASSES = 4

    def __init__(self, weights, names):
        self.weights, self.names = weights, names
        self.requires = tuple(w is not None and w.requires_grad for w in weights)
        self.passes = collections.OrderedDict()  # graph task id -> _PassGradients
        self.lock = threading.Lock()
        self.token = _WeightGradientAnchor.apply(self.passes, self.lock, names, *weights)
        self.node = self.token.grad_fn

    def serves(self, weights, names):
        return (len(weights) == len(self.weights) and names == self.names
                and all(a is b for a, b in zip(self.weights, weights))
                and self.requires == tuple(w is not None and w.requires_grad for w in weights))

    def for_this_pass(self):
        """The running pass's _PassGradients (made at its first step)."""
        task = torch._C._current_graph_task_id()
        with self.lock:
            this_pass = self.passes.get(task)
            if this_pass is None:
                while len(self.passes) >= self._PASSES:
                    self.passes.popitem(last=False)
                this_pass = self.passes[task] = _PassGradients()
            return this_pass


class _WeightGradientAnchor(torch.autograd.Function):
    """The node between a cell's steps and its weights (_WeightGradientSums): its output
    is a token every step node takes; its backward returns the weight gradients of the
    running pass's steps."""

    @staticmethod
    def forward(ctx, passes, lock, names, *weights):
        ctx.passes, ctx.lock, ctx.names = passes, lock, names
        ctx.set_materialize_grads(False)  # the steps return no gradient for the token
        return torch.zeros(())

    @staticmethod
    def backward(ctx, _):
        with ctx.lock:
            this_pass = ctx.passes.pop(torch._C._current_graph_task_id(), None)
        if this_pass is None:  # no step left anything here (a graph of torch ops: double backward)
            return (None, None, None) + (None,) * len(ctx.names)
        wanted = {name for name, need in zip(ctx.names, ctx.needs_input_grad[3:]) if need}
        grads = this_pass.gradients(wanted)
        return (None, None, None, *(_tensor_or_none(grads.get(name)) if name in wanted else None
                                    for name in ctx.names))


_weight_gradient_sums = weakref.WeakKeyDictionary()  # module -> its _WeightGradientSums


def _weight_gradient_sums_for(module, backend, weights, names=_CELL_PARAMETER_NAMES):
    """The module's _WeightGradientSums for these weights (``names``: the kernels' names
    of them), made under grad mode, as the anchor must be a node of the graph; or None
    where they are not used: a backend other than the fused kernels (whose gate
    gradients and accumulating backward the steps need), no weight requires a gradient, a weight is computed at
    every call (a parametrization's: a new tensor, which an anchor could serve for one
    call only), or the engine does not tell its passes."""
    if (not _ENGINE_TELLS_PASSES or backend is not _fused_backend_or_none()
            or not any(w is not None and w.requires_grad for w in weights)
            or not all(w is None or w.is_leaf for w in weights)):
        return None
    names = tuple(names)
    sums = _weight_gradient_sums.get(module)
    if sums is None or not sums.serves(weights, names):
        sums = _weight_gradient_sums[module] = _WeightGradientSums(weights, names)
    return sums


class _CellFunction(torch.autograd.Function):
    """One step of one cell through the fused kernels, for autograd; the arguments
    after the backend and mode are those of ``_cell_step``: the weights' arrays made
    already (or None), the module's _WeightGradientSums and its token (or None twice),
    then x, h0, c0 and the weights spread out."""

    @staticmethod
    def forward(ctx, backend, mode, weight_arrays, sums, token, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        h1, c1, ctx.cache = _cell_step(backend, mode, True, x, h0, c0, (w_ih, w_hh, b_ih, b_hh),
                                       weight_arrays)
        ctx.mode = mode
        ctx.backend = backend
        ctx.sums = sums
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
        return h1 if c1 is None else (h1, c1)

    @staticmethod
    def backward(ctx, d_h1, d_c1=None):
        saved = ctx.saved_tensors  # raises if one was changed in place since forward
        if _backward_through_torch_ops((d_h1, d_c1)):
            grads = _differentiate_torch_graph(
                lambda *t: _torch_cell(ctx.mode, *t), saved, ctx.needs_input_grad[5:],
                (d_h1, d_c1))
            return (None, None, None, None, None, *grads)
        x, h0, c0, w_ih, w_hh, b_ih, b_hh = saved
        N = x.shape[0]
        # h1 is both output[0] and h_n[0]: its gradient goes in as d_output.
        d_output = d_h1.detach().contiguous().numpy().reshape(1, N, -1)
        d_c_n = None if c0 is None else d_c1.detach().contiguous().numpy().reshape(1, N, -1)
        dx, dh0, dc0, grads = _backward_gradients(ctx.backend, ctx.cache, ctx.sums, x, d_output,
                                                  None, d_c_n, ctx.needs_input_grad[5])
        g = [None if grads is None or w is None  # (None: the anchor returns them)
             else torch.from_numpy(grads[name])
             for name, w in zip(_CELL_PARAMETER_NAMES, (w_ih, w_hh, b_ih, b_hh))]
        return (None, None, None, None, None, None if dx is None else torch.from_numpy(dx[0]),
                torch.from_numpy(dh0[0]),
                None if c0 is None else torch.from_numpy(dc0[0]), *g)
