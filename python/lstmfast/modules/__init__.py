"""The layers and cells: ``LSTM``, ``GRU``, ``RNN``, ``LSTMCell``, ``GRUCell``, ``RNNCell``.

These classes mirror ``torch.nn``'s: same constructor arguments, parameter names and
shapes, call signature, output shapes and ``state_dict`` keys. They check arguments,
hold the parameters as NumPy arrays and delegate all math to a backend module:
``backend="numpy"`` uses :mod:`lstmfast.reference` (the readable specification) and
``backend="fused"`` uses the C++ kernels through ``lstmfast._fused``. Both expose

    forward(mode, x, hx, params, *, num_layers, bidirectional, proj_size=0,
            lengths=None, dropout_masks=None, training=False)
        -> (output, h_n, c_n or None, cache or None)
    backward(cache, d_output, d_h_n=None, d_c_n=None, grads=None)
        -> (dx, dh0, dc0 or None, grads)        # adds into grads

always in the time-major batched layout ``x (T, N, I)``; this module converts from and
to the caller's layout (batch_first, unbatched) and fills in defaults (zero h0/c0).

Decisions worth knowing (beyond what torch documents):

* dtypes are strict: ``x``, ``hx`` and the upstream gradients must already have the
  layer's dtype (float32 or float64), otherwise TypeError. Nothing is cast silently.
  Parameters given to ``load_state_dict`` or assigned as attributes ARE cast to the
  layer's dtype (an explicit load, like torch's ``copy_``).
* Parameter attributes (``lstm.weight_ih_l0``) are the live arrays the layer computes
  with: editing one in place changes the layer. Assigning ``lstm.weight_ih_l0 = w``
  copies ``w`` into the existing array after checking its shape. ``state_dict()``
  returns copies, in torch's order.
* ``load_state_dict`` raises KeyError for missing or unexpected names, ValueError for a
  wrong shape, TypeError for values that are not real numbers; every problem is listed
  in one message and on failure no parameter is changed.
* Randomness: ``seed`` feeds ``np.random.SeedSequence(seed).spawn(2)``; the first child
  initialises the parameters (through ``reference.init_params``, for both backends, so
  one seed gives the same weights whatever the backend), the second is the dropout
  stream. Dropout masks are made here, not in the backend: per call, one float64
  uniform array of shape (T, N, D*H_out) for each gap between layers, in layer order,
  keeping an element where ``u >= p`` and scaling it by ``1/(1-p)`` (``p == 1`` gives
  all zeros). Masks are therefore identical for both backends and both dtypes.
* Like torch, dropout > 0 with num_layers == 1 emits a UserWarning, and a new layer
  is in training mode. In training mode each call keeps what backward needs (one
  pending forward per layer and thread; a new forward replaces it). ``backward``
  consumes it: a second backward, a backward after an eval-mode forward or before any
  forward raises RuntimeError. Parameter gradients are ADDED into ``layer.grad``;
  ``zero_grad()`` clears them in place.
* Threads: one layer may be called from several threads at once, in eval and in
  training mode. The pending forward is per thread (``threading.local``): a thread's
  ``backward`` pairs with that thread's last training forward, never another's.
  Forwards run concurrently (the kernels release the GIL); backwards of one layer
  run one at a time under a lock, since they add into the same ``layer.grad``, so
  the gradients of concurrent steps are summed (in whatever order the threads reach
  the lock). Changing parameters while calls run is the caller's race.
* Do not modify inputs, returned arrays or parameters (in place, by assignment or by
  ``load_state_dict``) between a forward and its backward: the backend keeps
  references to them (torch would raise; we cannot detect it).
* A zero-length sequence raises ValueError (torch raises too). An empty batch (batch
  size 0) returns empty outputs as torch does, without calling the backend; its
  backward returns empty input gradients and adds nothing to ``layer.grad``.
* Sizes are checked at construction: with ``backend="fused"`` every dimension the
  32-bit BLAS sees (input_size, G*hidden_size, D*hidden_size) must fit in it, else
  ValueError; parameters plus gradients that would need more than the machine's
  physical memory raise MemoryError before anything is allocated. The compiled
  module checks each call's sizes the same way, in overflow-checked 64-bit
  arithmetic, and a workspace that cannot be allocated raises MemoryError.
* ``lengths`` (one int per batch element, each in 1..L, any order) gives the
  semantics of a PackedSequence: outputs past a sequence's end are 0 (and their
  upstream gradients are ignored), h_n/c_n hold each sequence's state at its own end.
  Unbatched input takes a one-element ``lengths``.
* Cells are called as ``cell(x, hx=None)`` (torch's argument name) and run the backend
  with T = 1 and one layer; ``cell.backward(grad_h1)`` for GRU/RNN cells and
  ``lstm_cell.backward(grad_h1, grad_c1=None)`` give the gradients of that one step.
* ``repr`` is torch's, plus ``nonlinearity``, ``dtype`` and ``backend`` when they are
  not the defaults.
"""

import importlib
import numbers
import os
import threading
import warnings

import numpy as np

__all__ = ["LSTM", "GRU", "RNN", "CTRNN", "LayerNormLSTM", "LSTMCell", "GRUCell", "RNNCell",
           "quantize"]

_PACKAGE = __name__.rpartition(".")[0]
_BACKENDS = ("fused", "numpy")
_NONLINEARITIES = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}
_CTRNN_MODES = {"tanh": "CTRNN_TANH", "relu": "CTRNN_RELU"}
_LEAKS = ("outside", "inside")
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1, "CTRNN_TANH": 1, "CTRNN_RELU": 1,
          "LN_LSTM": 4}
_CELL_STATE_MODES = ("LSTM", "LN_LSTM")  # the state is a pair (h, c)
_BLAS_MAX = 2**31 - 1  # the fused kernels' BLAS takes 32-bit dimensions
_BYTES_PER_ARRAY = 1024  # rough cost of one parameter and its gradient as Python objects


# ----------------------------------------------------------------------------------
# argument checks


def _check_size(name, value, minimum=1):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")
    return bool(value)


def _check_dropout(value):
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)
            or not 0 <= value <= 1):
        raise ValueError(
            f"dropout should be a number in range [0, 1] (the probability of an element "
            f"being zeroed), got {value!r}")
    return float(value)


def _check_probability(name, value, upper_open=False):
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)
            or not (0 <= value < 1 if upper_open else 0 <= value <= 1)):
        bounds = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{name} must be a probability in {bounds}, got {value!r}")
    return float(value)


def _check_zoneout(value, mode):
    """zoneout: a probability (h and, with a cell state, c) or a pair (p_h, p_c)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"zoneout: expected a probability or a pair (p_h, p_c), got {value!r}")
        p_h, p_c = (_check_probability(f"zoneout[{i}]", v) for i, v in enumerate(value))
    else:
        p_h = _check_probability("zoneout", value)
        p_c = p_h if mode in _CELL_STATE_MODES else 0.0
    if p_c and mode not in _CELL_STATE_MODES:
        raise ValueError(f"zoneout: p_c must be 0 for a cell without a cell state, got {p_c}")
    return p_h, p_c


def _check_ctrnn_options(alpha, leak, noise_std):
    """A CTRNN's alpha, leak and noise_std, checked (both APIs): (float, str, float)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha <= 1:
        raise ValueError(f"alpha (dt / tau) must be a number in (0, 1], got {alpha!r}")
    if leak not in _LEAKS:
        raise ValueError(f"leak must be 'outside' or 'inside', got {leak!r}")
    if (isinstance(noise_std, bool) or not isinstance(noise_std, numbers.Real)
            or not 0 <= noise_std < float("inf")):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
    return float(alpha), leak, float(noise_std)


def _check_layer_norm_eps(eps):
    """A layer-normalized LSTM's layer_norm_eps, checked (both APIs), as a float."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < float("inf"):
        raise ValueError(f"layer_norm_eps must be a finite number > 0, got {eps!r}")
    return float(eps)


def _resolve_dtype(dtype):
    # np.dtype(None) is float64 and dtype == None compares as float64: exclude None first.
    try:
        resolved = None if dtype is None else np.dtype(dtype)
    except (TypeError, ValueError):
        resolved = None
    if resolved is None or resolved.type not in (np.float32, np.float64):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return resolved


def _check_backend(backend):
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    return backend


def _check_seed(seed):
    if seed is None:
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed should be None or an int, got: {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return int(seed)


def _load_backend(backend):
    """The module computing for ``backend``; NotImplementedError if it is not built."""
    if backend == "numpy":
        return importlib.import_module(_PACKAGE + ".reference")
    name = _PACKAGE + "._fused"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        module = None
    if module is None or not getattr(module, "available", False):
        raise NotImplementedError(
            "backend='fused': the fused C++ kernels are not built yet; use backend='numpy'")
    return module


def _physical_memory():
    """Bytes of physical memory, or None where the platform does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _check_sizes(kind, mode, input_size, hidden_size, num_layers, bidirectional, proj_size,
                 dtype, backend):
    """Refuse sizes the layer could never hold or compute, before allocating anything.

    ValueError for a dimension beyond the fused kernels' 32-bit BLAS; MemoryError when
    the parameters and their gradients alone would need more than this machine's
    physical memory (sums in Python ints: nothing overflows).
    """
    G, H, P = _GATES[mode], hidden_size, proj_size
    H_out = P or H
    D = 2 if bidirectional else 1
    if backend == "fused":
        for name, what, value in (
                ("input_size", "input_size", input_size),
                ("hidden_size", f"{G} gates * hidden_size", G * H),
                ("hidden_size", f"{D} directions * hidden_size", D * H)):
            if value > _BLAS_MAX:
                raise ValueError(
                    f"{name}: {what} = {value} exceeds the 32-bit BLAS interface of "
                    f"backend='fused' (at most {_BLAS_MAX})")
        if num_layers > _BLAS_MAX:
            raise ValueError(
                f"num_layers = {num_layers} exceeds what backend='fused' takes (at most "
                f"{_BLAS_MAX})")
    per_direction = G * H * (H_out + 2) + P * H  # weight_hh, both biases, weight_hr
    elements = D * (G * H * input_size + per_direction)
    elements += (num_layers - 1) * D * (G * H * D * H_out + per_direction)
    arrays = num_layers * D * 5
    needed = 2 * elements * dtype.itemsize + arrays * _BYTES_PER_ARRAY
    available = _physical_memory()
    if available is not None and needed > available:
        raise MemoryError(
            f"{kind}: the parameters and their gradients would need {needed} bytes "
            f"({needed / 2**30:.3g} GiB), more than this machine's {available / 2**30:.3g} GiB "
            f"of memory (input_size={input_size}, hidden_size={hidden_size}, "
            f"num_layers={num_layers}, proj_size={proj_size}, dtype={dtype})")


def _to_numpy(value):
    """np.asarray, also for torch tensors (without importing torch)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
    return np.asarray(value)


def _shape_str(shape):
    return str(tuple(int(s) for s in shape))


# ----------------------------------------------------------------------------------
# what every layer and cell shares


class _CallState(threading.local):
    """One thread's view of a layer's calls: backward pairs with the same thread's forward."""

    pending = None  # what backward needs from this thread's last training forward
    last_forward = None  # None (never), "train", "eval" or "consumed"
    layout = None  # the caller's layout of that forward, for backward's shapes


class _EmptyBatch:
    """The 'cache' of a training forward on a batch of size 0 (no backend call)."""

    __slots__ = ("T", "I", "LD", "H_out", "H")

    def __init__(self, T, I, LD, H_out, H):  # noqa: E741
        self.T, self.I, self.LD, self.H_out, self.H = T, I, LD, H_out, H


class _Module:
    """Parameters, gradients, train/eval, state_dict and the pending forward."""

    _mode = None  # a backend mode: "LSTM", "GRU", "RNN_TANH", "RNN_RELU", "CTRNN_*", "LN_LSTM"

    def _setup(self, dtype, backend, seed):
        self.dtype = _resolve_dtype(dtype)
        self.backend = _check_backend(backend)
        self.seed = _check_seed(seed)
        self._backend = _load_backend(self.backend)
        init_seq, dropout_seq, noise_seq = np.random.SeedSequence(self.seed).spawn(3)
        self._init_rng = np.random.default_rng(init_seq)
        self._dropout_rng = np.random.default_rng(dropout_seq)
        self._noise_rng = np.random.default_rng(noise_seq)  # CTRNN
        self.training = True
        self._calls = _CallState()  # per thread: the pending forward and its layout
        self._grad_lock = threading.Lock()  # backward adds into self.grad one call at a time

    precision = "float32"  # or "int8" / "bfloat16" for a layer made by quantize()
    _packed = None  # reduced layers: the backend's form of _params, made on first use

    @property
    def _trains(self):
        """Whether a forward keeps what backward needs (reduced layers never do)."""
        return self.training and self.precision == "float32"

    def _forward_params(self):
        """The parameters as the backend takes them: the arrays themselves, or for a
        reduced layer its weights packed once (see quantize)."""
        if self.precision == "float32":
            return self._params
        if self._packed is None:
            self._packed = _backend_weights(self._params, self.precision, self._backend)
        return self._packed

    def _set_params(self, params):
        """Keep ``params`` (name -> array) in the order of ``self._param_names()``."""
        names = self._param_names()
        if set(params) != set(names):
            raise RuntimeError(
                f"internal error: the backend made parameters {sorted(params)}, "
                f"expected {names}")
        self._params = {n: np.array(params[n], dtype=self.dtype, order="C") for n in names}
        self.grad = {n: np.zeros_like(p) for n, p in self._params.items()}

    # parameters as attributes ------------------------------------------------------

    def __getattr__(self, name):
        params = self.__dict__.get("_params")
        if params is not None and name in params:
            return params[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        params = self.__dict__.get("_params")
        if params is not None and name in params:
            if self.precision != "float32":
                raise AttributeError(
                    f"{name}: the parameters of a {self.precision} layer are read-only; "
                    f"quantize a float32 layer again, or use load_state_dict")
            params[name][...] = self._checked_param(name, value)
        else:
            object.__setattr__(self, name, value)

    def __dir__(self):
        return list(super().__dir__()) + list(self.__dict__.get("_params", ()))

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_backend", None)  # a module object; resolved again on unpickling
        state.pop("_calls", None)  # per-thread pending forwards are not kept
        state.pop("_grad_lock", None)
        state.pop("_packed", None)  # the compiled module's packed weights; made again on use
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._backend = _load_backend(self.backend)
        self._calls = _CallState()
        self._grad_lock = threading.Lock()

    # state_dict --------------------------------------------------------------------

    def state_dict(self):
        """A new dict name -> copy of the parameter, in torch's order."""
        return {name: value.copy() for name, value in self._params.items()}

    def _checked_param(self, name, value):
        """``value`` as an array of the layer dtype with the shape of parameter ``name``."""
        expected = self._params[name].shape
        try:
            array = _to_numpy(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"parameter {name!r}: cannot convert the value to an array ({exc})") from None
        if array.dtype.kind not in "fiu":
            raise TypeError(
                f"parameter {name!r}: expected real numbers, got an array of dtype {array.dtype}")
        if array.shape != expected:
            raise ValueError(
                f"parameter {name!r}: expected shape {_shape_str(expected)}, "
                f"got {_shape_str(array.shape)}")
        return array.astype(self.dtype, copy=False)

    def load_state_dict(self, state_dict):
        """Copy parameters from ``state_dict`` (ours or a torch module's), cast to our dtype.

        Every name and shape is checked before anything changes: on missing or unexpected
        names KeyError, on a wrong shape ValueError, on non-numeric values TypeError.
        A reduced layer (quantize) takes the state_dict of a reduced layer of its kind.
        """
        if self.precision != "float32":
            return self._load_reduced_state_dict(state_dict)
        if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
            raise TypeError(
                f"state_dict should be a mapping name -> array, got {type(state_dict).__name__}")
        given = list(state_dict.keys())
        missing = [n for n in self._params if n not in state_dict]
        unexpected = [n for n in given if n not in self._params]
        if missing or unexpected:
            problems = []
            if missing:
                problems.append(f"missing key(s): {missing}")
            if unexpected:
                problems.append(f"unexpected key(s): {unexpected}")
            raise KeyError(
                f"load_state_dict for {type(self).__name__}: " + "; ".join(problems)
                + f" (expected exactly {list(self._params)})")
        values, shape_errors = {}, []
        for name in self._params:
            try:
                values[name] = self._checked_param(name, state_dict[name])
            except ValueError as exc:
                shape_errors.append(str(exc))
        if shape_errors:
            raise ValueError(
                f"load_state_dict for {type(self).__name__}: " + "; ".join(shape_errors))
        for name, value in values.items():
            self._params[name][...] = value

    # training ----------------------------------------------------------------------

    def train(self, mode=True):
        """Training mode (dropout on, forward keeps what backward needs); returns self."""
        self.training = _check_flag("mode", mode)
        return self

    def eval(self):
        """Inference mode (no dropout, nothing kept); returns self."""
        return self.train(False)

    def zero_grad(self):
        """Set every gradient in ``self.grad`` to zero (in place)."""
        with self._grad_lock:
            for g in self.grad.values():
                g.fill(0)

    # input checks ------------------------------------------------------------------

    def _as_input(self, name, value):
        """``value`` as an array of exactly the layer dtype, else TypeError."""
        if type(value) is np.ndarray and value.dtype == self.dtype:
            return value
        try:
            array = _to_numpy(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name}: cannot convert to an array ({exc})") from None
        if array.dtype != self.dtype:
            raise TypeError(
                f"{name} must have dtype {self.dtype} (the layer's dtype), got {array.dtype}; "
                f"convert it explicitly, e.g. {name}.astype(np.{self.dtype})")
        return array

    def _check_shape(self, name, array, expected):
        if array.shape != tuple(expected):
            raise ValueError(
                f"{name}: expected shape {_shape_str(expected)}, got {_shape_str(array.shape)}")

    def _run_forward(self, x, hx, params, layout, **kwargs):
        """Call the backend forward; remember the cache (this thread's) in training mode.

        An empty batch (N = 0, x of shape (T, 0, I)) gives empty results as torch does,
        without calling the backend.
        """
        training = self._trains
        T, N, I = x.shape  # noqa: E741
        if N == 0:
            D = 2 if kwargs["bidirectional"] else 1
            LD, H = kwargs["num_layers"] * D, self.hidden_size
            H_out = kwargs.get("proj_size") or H
            output = np.zeros((T, 0, D * H_out), dtype=self.dtype)
            h_n = np.zeros((LD, 0, H_out), dtype=self.dtype)
            c_n = np.zeros((LD, 0, H), dtype=self.dtype) if self._mode in _CELL_STATE_MODES else None
            cache = _EmptyBatch(T, I, LD, H_out, H) if training else None
        else:
            output, h_n, c_n, cache = self._backend.forward(
                self._mode, x, hx, params, training=training, **kwargs)
        calls = self._calls
        calls.pending = cache if training else None
        calls.last_forward = "train" if training else "eval"
        calls.layout = layout
        return output, h_n, c_n

    def _check_backward_allowed(self):
        if self.precision != "float32":
            raise RuntimeError(
                f"{type(self).__name__}.backward: this is a {self.precision} layer made by "
                f"lstmfast.quantize, for inference only; train the float32 layer and quantize "
                f"it again")
        calls = self._calls
        if calls.pending is not None:
            return calls.layout
        if calls.last_forward is None:
            why = "no forward pass has run yet (in this thread: backward pairs with the " \
                  "last training-mode forward of the calling thread)"
        elif calls.last_forward == "eval":
            why = ("the last forward ran in eval mode, which keeps nothing for backward; "
                   "call .train() and run the forward again")
        else:
            why = ("backward was already called for the last forward pass (its saved state "
                   "is freed after one backward); run the forward again")
        raise RuntimeError(f"{type(self).__name__}.backward: {why}")

    def _load_reduced_state_dict(self, state_dict):
        if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
            raise TypeError(
                f"state_dict should be a mapping name -> array, got {type(state_dict).__name__}")
        missing = [n for n in self._params if n not in state_dict]
        unexpected = [n for n in state_dict.keys() if n not in self._params]
        if missing or unexpected:
            raise KeyError(
                f"load_state_dict for a {self.precision} {type(self).__name__}: missing key(s): "
                f"{missing}; unexpected key(s): {unexpected} (expected exactly {list(self._params)})")
        values = {}
        for name, current in self._params.items():
            value = _to_numpy(state_dict[name])
            if value.dtype != current.dtype:
                raise TypeError(
                    f"parameter {name!r}: a {self.precision} layer holds it as {current.dtype}, "
                    f"got {value.dtype}")
            if value.shape != current.shape:
                raise ValueError(
                    f"parameter {name!r}: expected shape {_shape_str(current.shape)}, "
                    f"got {_shape_str(value.shape)}")
            if name.endswith("_scale") and not (np.isfinite(value).all() and (value > 0).all()):
                raise ValueError(f"parameter {name!r}: scales must be positive and finite")
            values[name] = _read_only(value)
        self._params = values
        self._packed = None

    def _run_backward(self, d_output, d_h_n, d_c_n, grads):
        """Call the backend backward, consuming this thread's cache; adds into ``grads``.

        Backward calls of one layer run one at a time (they add into the same arrays).
        """
        calls = self._calls
        cache, calls.pending = calls.pending, None
        calls.last_forward = "consumed"
        if isinstance(cache, _EmptyBatch):
            c = cache
            return (np.zeros((c.T, 0, c.I), dtype=self.dtype),
                    np.zeros((c.LD, 0, c.H_out), dtype=self.dtype),
                    np.zeros((c.LD, 0, c.H), dtype=self.dtype) if self._mode in _CELL_STATE_MODES else None)
        with self._grad_lock:
            dx, dh0, dc0, returned = self._backend.backward(  # the cache is ours alone
                cache, d_output, d_h_n, d_c_n, grads=dict(grads), consume=True)
            for name, target in grads.items():  # in case the backend rebound a key
                if returned[name] is not target:
                    target[...] = returned[name]
        return dx, dh0, dc0

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"

    def _extra_repr_tail(self):
        s = ""
        if self._mode == "RNN_RELU":
            s += ", nonlinearity=relu"
        if self.dtype != np.float32:
            s += f", dtype={self.dtype}"
        if self.backend != "fused":
            s += f", backend={self.backend}"
        if self.precision != "float32":
            s += f", precision={self.precision}"
        return s


# ----------------------------------------------------------------------------------
# multi-layer, multi-step layers


class _RNNBase(_Module):
    """Shared by LSTM, GRU and RNN: checks, layouts, hx defaults, dropout masks."""

    peephole = False  # LSTM(peephole=True) sets it
    recurrent_dropout = 0.0
    zoneout = (0.0, 0.0)
    _zoneout_modes = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")  # where zoneout may be set

    def __init__(self, mode, input_size, hidden_size, num_layers=1, bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, proj_size=0,
                 dtype="float32", backend="fused", seed=None, peephole=False,
                 recurrent_dropout=0.0, zoneout=0.0):
        self._mode = mode
        self.peephole = _check_flag("peephole", peephole)
        self.recurrent_dropout = _check_probability("recurrent_dropout", recurrent_dropout,
                                                    upper_open=True)
        self.zoneout = _check_zoneout(zoneout, mode)
        if any(self.zoneout) and mode not in self._zoneout_modes:
            raise ValueError(f"zoneout is for LSTM, GRU and RNN, not {type(self).__name__}")
        self.input_size = _check_size("input_size", input_size)
        self.hidden_size = _check_size("hidden_size", hidden_size)
        self.num_layers = _check_size("num_layers", num_layers)
        self.bias = _check_flag("bias", bias)
        self.batch_first = _check_flag("batch_first", batch_first)
        self.dropout = _check_dropout(dropout)
        self.bidirectional = _check_flag("bidirectional", bidirectional)
        self.proj_size = _check_size("proj_size", proj_size, minimum=0)
        if self.proj_size and mode != "LSTM":
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if self.proj_size >= self.hidden_size:
            raise ValueError(
                f"proj_size has to be smaller than hidden_size, got proj_size={self.proj_size}"
                f" and hidden_size={self.hidden_size}")
        if self.dropout > 0 and self.num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero "
                f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
                f"num_layers={num_layers}", UserWarning, stacklevel=3)
        self._setup(dtype, backend, seed)
        _check_sizes(type(self).__name__, mode, self.input_size, self.hidden_size,
                     self.num_layers, self.bidirectional, self.proj_size, self.dtype, self.backend)
        reference = importlib.import_module(_PACKAGE + ".reference")
        self._set_params(reference.init_params(
            mode, self.input_size, self.hidden_size, self.num_layers, self.bias,
            self.bidirectional, self.proj_size, self.dtype, self._init_rng,
            peephole=self.peephole))
        shapes = reference.param_shapes(
            mode, self.input_size, self.hidden_size, self.num_layers, self.bias,
            self.bidirectional, self.proj_size, peephole=self.peephole)
        for name, p in self._params.items():
            if p.shape != tuple(shapes[name]):
                raise RuntimeError(f"internal error: {name} has shape {p.shape}, expected {shapes[name]}")

    @property
    def _num_directions(self):
        return 2 if self.bidirectional else 1

    @property
    def _out_size(self):
        return self.proj_size or self.hidden_size

    def _param_names(self):
        """torch's ``_flat_weights_names``: per layer, per direction, ih hh [biases] [hr]."""
        names = []
        for k in range(self.num_layers):
            for suffix in ("", "_reverse")[: self._num_directions]:
                names += [f"weight_ih_l{k}{suffix}", f"weight_hh_l{k}{suffix}"]
                if self.bias:
                    names += [f"bias_ih_l{k}{suffix}", f"bias_hh_l{k}{suffix}"]
                if self.proj_size:
                    names.append(f"weight_hr_l{k}{suffix}")
                if self.peephole:
                    names += [f"weight_ci_l{k}{suffix}", f"weight_cf_l{k}{suffix}",
                              f"weight_co_l{k}{suffix}"]
        return names

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size != 0:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True and self._mode != "LN_LSTM":
            s += f", bias={self.bias}"
        if self.batch_first is not False:
            s += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += f", bidirectional={self.bidirectional}"
        if self.peephole:
            s += ", peephole=True"
        if self.recurrent_dropout:
            s += f", recurrent_dropout={self.recurrent_dropout}"
        if any(self.zoneout):
            s += f", zoneout={self.zoneout}"
        return s + self._options_repr() + self._extra_repr_tail()

    def _options_repr(self):
        """The constructor options of a variant beyond torch's, for extra_repr."""
        return ""

    # forward -------------------------------------------------------------------------

    def forward(self, x, hx=None, lengths=None, *, recurrent_dropout_mask=None, zoneout_mask=None):
        """``output, h_n = layer(x, hx, lengths)`` (LSTM: ``output, (h_n, c_n)``), as torch.

        In training mode, with ``recurrent_dropout`` or ``zoneout``, the masks are drawn
        from the layer's seed, or given: ``recurrent_dropout_mask`` ``(D*num_layers, N,
        H_out)`` (``(D*num_layers, H_out)`` unbatched), values 0 or 1/(1-p), one per
        sequence for every step and gate; ``zoneout_mask`` a pair ``(m_h, m_c)`` (m_c None
        without a cell state), each with the shape of one direction's output in the
        caller's layout, H_out wide for h and H for c, optionally with a leading
        ``D*num_layers``; 1 keeps the old value (docs/cells.md, Recurrent dropout and zoneout).
        """
        return self._forward(x, hx, lengths, None, recurrent_dropout_mask, zoneout_mask)

    def _cell_options(self, T, N, batched, given):
        """Keyword arguments of the backend forward beyond torch's (a CTRNN's); ``given``
        is what the caller passed for them."""
        return {}

    def _regularizer_args(self, T, N, batched, rec_mask, zone_mask):
        """The backend's recurrent_dropout_masks and zoneout_masks for this call: given
        (training only), drawn from the dropout stream (training), zoneout's
        probabilities (eval), or nothing."""
        args = {}
        LD, H_out, H = self.num_layers * self._num_directions, self._out_size, self.hidden_size
        training = self._trains
        for name, given in (("recurrent_dropout_mask", rec_mask), ("zoneout_mask", zone_mask)):
            if given is not None and not training:
                raise ValueError(f"{name}: given in eval mode, where there is no mask "
                                 f"(call train() first)")
        if rec_mask is not None:
            mask = self._as_input("recurrent_dropout_mask", rec_mask)
            self._check_shape("recurrent_dropout_mask", mask, (LD, N, H_out) if batched else (LD, H_out))
            args["recurrent_dropout_masks"] = np.ascontiguousarray(
                mask if batched else mask[:, None, :])
        elif training and self.recurrent_dropout > 0:
            p = self.recurrent_dropout
            keep = self._dropout_rng.random((LD, N, H_out)) >= p
            args["recurrent_dropout_masks"] = (keep / (1.0 - p)).astype(self.dtype)
        if zone_mask is not None:
            if not isinstance(zone_mask, (tuple, list)) or len(zone_mask) != 2:
                raise ValueError("zoneout_mask: expected a pair (m_h, m_c)")
            if zone_mask[1] is not None and self._mode not in _CELL_STATE_MODES:
                raise ValueError("zoneout_mask: m_c must be None for a cell without a cell state")
            lead = ((N, T) if self.batch_first else (T, N)) if batched else (T,)
            masks = []
            for name, m, width in (("zoneout_mask[0]", zone_mask[0], H_out),
                                   ("zoneout_mask[1]", zone_mask[1], H)):
                if m is None:
                    masks.append(None)
                    continue
                m = self._as_input(name, m)
                if m.shape == lead + (width,):
                    m = np.broadcast_to(m, (LD,) + m.shape)
                self._check_shape(name, m, (LD,) + lead + (width,))
                if not batched:
                    m = m[:, :, None, :]
                elif self.batch_first:
                    m = m.transpose(0, 2, 1, 3)
                masks.append(np.ascontiguousarray(m))
            args["zoneout_masks"] = tuple(masks)
        elif any(self.zoneout):
            # training: masks drawn inside the backend from a seed of the dropout stream
            # (reference.zoneout_masks_from_seed), nothing stored; eval: the expectation
            args["zoneout_masks"] = tuple(p or None for p in self.zoneout)
            if training:
                args["zoneout_seed"] = int(self._dropout_rng.integers(2**63))
        return args

    def _forward(self, x, hx, lengths, given=None, rec_mask=None, zone_mask=None):
        x = self._as_input("x", x)
        if x.ndim not in (2, 3):
            raise ValueError(
                f"x: expected a 3-D (batched) or 2-D (unbatched) array, got {x.ndim}-D "
                f"with shape {_shape_str(x.shape)}")
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"x: expected input_size={self.input_size} features in the last dimension, "
                f"got {x.shape[-1]} (shape {_shape_str(x.shape)})")
        batched = x.ndim == 3
        if not batched:
            x_tm = x[:, None, :]
        elif self.batch_first:
            x_tm = x.transpose(1, 0, 2)
        else:
            x_tm = x
        T, N = x_tm.shape[:2]
        if T == 0:
            raise ValueError(
                f"x: empty sequence (sequence length 0, shape {_shape_str(x.shape)}); "
                f"it must be >= 1 (an empty batch is fine)")
        x_tm = np.ascontiguousarray(x_tm)
        h0, c0 = self._prepare_hx(hx, N, batched)
        lengths = self._prepare_lengths(lengths, T, N)
        masks = None
        if self._trains and self.dropout > 0 and self.num_layers > 1:
            masks = self._make_dropout_masks(T, N)
        output, h_n, c_n = self._run_forward(
            x_tm, (h0, c0) if self._mode in _CELL_STATE_MODES else h0, self._forward_params(),
            num_layers=self.num_layers, bidirectional=self.bidirectional,
            proj_size=self.proj_size, lengths=lengths, dropout_masks=masks,
            layout=(batched, T, N), **self._cell_options(T, N, batched, given),
            **self._regularizer_args(T, N, batched, rec_mask, zone_mask))
        output = self._from_time_major(output, batched)
        if not batched:
            h_n = h_n[:, 0]
            c_n = None if c_n is None else c_n[:, 0]
        if self._mode in _CELL_STATE_MODES:
            return output, (h_n, c_n)
        return output, h_n

    def _from_time_major(self, a, batched):
        if not batched:
            return a[:, 0]
        if self.batch_first:
            return np.ascontiguousarray(a.transpose(1, 0, 2))
        return a

    def _to_time_major(self, a, batched):
        if not batched:
            return np.ascontiguousarray(a[:, None, :])
        if self.batch_first:
            return np.ascontiguousarray(a.transpose(1, 0, 2))
        return np.ascontiguousarray(a)

    def _state_shapes(self, N, batched):
        """Expected (h, c) shapes in the caller's layout."""
        LD = self.num_layers * self._num_directions
        lead = (LD, N) if batched else (LD,)
        return lead + (self._out_size,), lead + (self.hidden_size,)

    def _prepare_hx(self, hx, N, batched):
        """(h0, c0) time-major batched, zeros when hx is None; c0 is None unless LSTM."""
        LD = self.num_layers * self._num_directions
        h_shape, c_shape = self._state_shapes(N, batched)
        kind = "batched 3-D" if batched else "unbatched 2-D"
        if hx is None:
            h0 = np.zeros((LD, N, self._out_size), dtype=self.dtype)
            c0 = (np.zeros((LD, N, self.hidden_size), dtype=self.dtype)
                  if self._mode in _CELL_STATE_MODES else None)
            return h0, c0
        if self._mode in _CELL_STATE_MODES:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise ValueError(
                    f"hx: LSTM expects a pair (h0, c0), got {type(hx).__name__}"
                    + (f" of length {len(hx)}" if isinstance(hx, (tuple, list)) else ""))
            h0 = self._as_input("hx[0] (h0)", hx[0])
            c0 = self._as_input("hx[1] (c0)", hx[1])
            self._check_state("hx[0] (h0)", h0, h_shape, kind)
            self._check_state("hx[1] (c0)", c0, c_shape, kind)
        else:
            if isinstance(hx, tuple):
                raise ValueError(
                    f"hx: {type(self).__name__} expects a single array h0, got a tuple "
                    f"(a pair (h0, c0) is for LSTM)")
            h0 = self._as_input("hx", hx)
            self._check_state("hx", h0, h_shape, kind)
            c0 = None
        if not batched:
            h0 = h0[:, None, :]
            c0 = None if c0 is None else c0[:, None, :]
        return np.ascontiguousarray(h0), None if c0 is None else np.ascontiguousarray(c0)

    def _check_state(self, name, array, expected, kind):
        if array.shape != expected:
            raise ValueError(
                f"{name}: for {kind} input expected shape {_shape_str(expected)} "
                f"(num_layers*num_directions, {'batch, ' if len(expected) == 3 else ''}size), "
                f"got {_shape_str(array.shape)}")

    def _prepare_lengths(self, lengths, T, N):
        if lengths is None:
            return None
        try:
            array = _to_numpy(lengths)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"lengths: cannot convert to an array of ints ({exc})") from None
        if array.ndim != 1:
            raise ValueError(
                f"lengths: expected a 1-D sequence with one int per batch element, "
                f"got shape {_shape_str(array.shape)}")
        if array.dtype.kind not in "iu" and not (N == 0 and array.size == 0):
            raise ValueError(f"lengths: expected integers, got dtype {array.dtype}")
        if array.shape[0] != N:
            raise ValueError(
                f"lengths: expected one length per batch element ({N}), got {array.shape[0]}")
        bad = np.flatnonzero((array < 1) | (array > T))
        if bad.size:
            raise ValueError(
                f"lengths: each length must be in 1..{T} (the sequence length), got "
                f"lengths[{bad[0]}] = {array[bad[0]]}")
        return np.ascontiguousarray(array, dtype=np.int64)

    def _make_dropout_masks(self, T, N):
        """One mask per gap between layers, values 0 or 1/(1-p), from the dropout stream."""
        p = self.dropout
        shape = (T, N, self._num_directions * self._out_size)
        masks = []
        for _ in range(self.num_layers - 1):
            u = self._dropout_rng.random(shape)
            if p >= 1:
                masks.append(np.zeros(shape, dtype=self.dtype))
            else:
                masks.append(np.where(u >= p, 1.0 / (1.0 - p), 0.0).astype(self.dtype))
        return masks

    # backward ------------------------------------------------------------------------

    def backward(self, grad_output, grad_h_n=None):
        """Gradients of the last training-mode forward, given the upstream gradients.

        ``grad_output`` has the shape of ``output``; ``grad_h_n`` that of ``h_n`` (LSTM:
        a pair ``(grad_h_n, grad_c_n)``, either may be None) or None for zeros. Returns
        ``(grad_x, grad_hx)`` in the caller's layout (LSTM: ``grad_hx = (grad_h0,
        grad_c0)``) and ADDS the parameter gradients into ``self.grad``.
        """
        batched, T, N = self._check_backward_allowed()
        D = self._num_directions
        out_shape = ((N, T) if self.batch_first else (T, N)) if batched else (T,)
        out_shape += (D * self._out_size,)
        d_output = self._as_input("grad_output", grad_output)
        self._check_shape("grad_output", d_output, out_shape)
        h_shape, c_shape = self._state_shapes(N, batched)
        d_h = d_c = None
        if self._mode in _CELL_STATE_MODES:
            if grad_h_n is not None:
                if not isinstance(grad_h_n, (tuple, list)) or len(grad_h_n) != 2:
                    raise ValueError(
                        "grad_h_n: LSTM expects None or a pair (grad_h_n, grad_c_n), "
                        f"got {type(grad_h_n).__name__}")
                d_h, d_c = grad_h_n
        else:
            if isinstance(grad_h_n, tuple):
                raise ValueError(
                    f"grad_h_n: {type(self).__name__} expects None or a single array, got a tuple")
            d_h = grad_h_n
        if d_h is not None:
            name = "grad_h_n[0]" if self._mode in _CELL_STATE_MODES else "grad_h_n"
            d_h = self._as_input(name, d_h)
            self._check_shape(name, d_h, h_shape)
            d_h = self._to_time_major_state(d_h, batched)
        if d_c is not None:
            d_c = self._as_input("grad_h_n[1]", d_c)
            self._check_shape("grad_h_n[1]", d_c, c_shape)
            d_c = self._to_time_major_state(d_c, batched)
        d_output = self._to_time_major(d_output, batched)
        dx, dh0, dc0 = self._run_backward(d_output, d_h, d_c, self.grad)
        dx = self._from_time_major(dx, batched)
        if not batched:
            dh0 = dh0[:, 0]
            dc0 = None if dc0 is None else dc0[:, 0]
        if self._mode in _CELL_STATE_MODES:
            return dx, (dh0, dc0)
        return dx, dh0

    @staticmethod
    def _to_time_major_state(a, batched):
        return np.ascontiguousarray(a if batched else a[:, None, :])


class LSTM(_RNNBase):
    """Multi-layer LSTM, as ``torch.nn.LSTM`` (gates i, f, g, o; optional projection).

    ``peephole=True`` adds the peephole connections of the ONNX / TensorFlow form
    (docs/cells.md, Peephole LSTM): i and f also see the previous cell state, o the new one,
    through per-unit vectors ``weight_ci_l{k}``, ``weight_cf_l{k}``, ``weight_co_l{k}``
    (``(H,)`` each, plus ``_reverse``), drawn like the other parameters.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, dtype="float32",
                 backend="fused", seed=None, *, peephole=False, recurrent_dropout=0.0,
                 zoneout=0.0):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, proj_size, dtype, backend, seed, peephole,
                         recurrent_dropout, zoneout)


class GRU(_RNNBase):
    """Multi-layer GRU, as ``torch.nn.GRU`` (gates r, z, n; reset applied after W_hn h)."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, dtype="float32", backend="fused",
                 seed=None, *, proj_size=0, recurrent_dropout=0.0, zoneout=0.0):
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, proj_size, dtype, backend, seed,
                         recurrent_dropout=recurrent_dropout, zoneout=zoneout)


class RNN(_RNNBase):
    """Multi-layer Elman RNN with tanh or ReLU, as ``torch.nn.RNN``."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, dtype="float32",
                 backend="fused", seed=None, *, proj_size=0, recurrent_dropout=0.0,
                 zoneout=0.0):
        if nonlinearity not in _NONLINEARITIES:
            raise ValueError(
                f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(_NONLINEARITIES[nonlinearity], input_size, hidden_size, num_layers,
                         bias, batch_first, dropout, bidirectional, proj_size, dtype, backend,
                         seed, recurrent_dropout=recurrent_dropout, zoneout=zoneout)


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
            noise = self._as_input("noise", given)
            lead = ((N, T) if self.batch_first else (T, N)) if batched else (T,)
            self._check_shape("noise", noise, (LD,) + lead + (H,))
            if not batched:
                noise = noise[:, :, None, :]
            elif self.batch_first:
                noise = noise.transpose(0, 2, 1, 3)
            noise = np.ascontiguousarray(noise)
        elif self.noise_std > 0 and N > 0:
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


# ----------------------------------------------------------------------------------
# one-step cells


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

    def _cell_recurrent_dropout(self, N, batched, given):
        """The backend's recurrent_dropout_masks for one step: given (training only), the
        kept mask of the sequence (drawn at its first step), or None."""
        if given is None and not (self.recurrent_dropout and self._trains):
            return None
        if not self._trains:
            raise ValueError("recurrent_dropout_mask: given in eval mode, where there is no mask")
        if given is not None:
            mask = self._as_input("recurrent_dropout_mask", given)
            self._check_shape("recurrent_dropout_mask", mask,
                              (N, self.hidden_size) if batched else (self.hidden_size,))
            return np.ascontiguousarray(mask.reshape(1, N, self.hidden_size))
        kept = self._recurrent_dropout_mask
        if kept is None or kept.shape != (1, N, self.hidden_size):
            p = self.recurrent_dropout
            keep = self._dropout_rng.random((1, N, self.hidden_size)) >= p
            kept = self._recurrent_dropout_mask = (keep / (1.0 - p)).astype(self.dtype)
        return kept

    def _cell_zoneout(self, N, batched, given):
        """The backend's zoneout_masks for one step: given ``(m_h, m_c)`` of the state's
        shape (training only), drawn per call (training), the probabilities (eval), or None."""
        if given is None and not any(self.zoneout):
            return None
        training = self._trains
        if given is not None:
            if not training:
                raise ValueError("zoneout_mask: given in eval mode, where there is no mask")
            if not isinstance(given, (tuple, list)) or len(given) != 2:
                raise ValueError("zoneout_mask: expected a pair (m_h, m_c), m_c None without c")
            if given[1] is not None and self._mode != "LSTM":
                raise ValueError("zoneout_mask: m_c must be None for a cell without a cell state")
            shape = (N, self.hidden_size) if batched else (self.hidden_size,)
            masks = []
            for name, m in (("zoneout_mask[0]", given[0]), ("zoneout_mask[1]", given[1])):
                if m is None:
                    masks.append(None)
                    continue
                m = self._as_input(name, m)
                self._check_shape(name, m, shape)
                masks.append(np.ascontiguousarray(m.reshape(1, 1, N, self.hidden_size)))
            return tuple(masks)
        if training:
            return tuple(None if not p else (self._dropout_rng.random((1, 1, N, self.hidden_size))
                                             < p).astype(self.dtype) for p in self.zoneout)
        return tuple(p or None for p in self.zoneout)

    def forward(self, x, hx=None, *, zoneout_mask=None, recurrent_dropout_mask=None):
        """``h1 = cell(x, h0)``; LSTMCell: ``h1, c1 = cell(x, (h0, c0))``, as torch.
        With ``zoneout`` (ESPnet's ZoneOutCell, docs/cells.md, Recurrent dropout and zoneout) each unit keeps its old
        value where the mask (drawn per call in training, or ``zoneout_mask=(m_h, m_c)``
        of the state's shape) is 1; eval takes the expectation. With
        ``recurrent_dropout`` h is multiplied, where it enters the recurrent product, by a
        mask drawn at a sequence's first training step and kept until
        ``reset_recurrent_dropout_mask()`` (or given: ``recurrent_dropout_mask``, the
        state's shape)."""
        x = self._as_input("x", x)
        if x.ndim not in (1, 2):
            raise ValueError(
                f"x: expected a 2-D (batched) or 1-D (unbatched) array, got {x.ndim}-D "
                f"with shape {_shape_str(x.shape)}")
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"x: expected input_size={self.input_size} features in the last dimension, "
                f"got {x.shape[-1]} (shape {_shape_str(x.shape)})")
        batched = x.ndim == 2
        N = x.shape[0] if batched else 1
        x_b = np.ascontiguousarray(x[None] if batched else x[None, None])
        state_shape = (N, self.hidden_size) if batched else (self.hidden_size,)
        states = []
        if hx is None:
            n_states = 2 if self._mode == "LSTM" else 1
            states = [np.zeros((1, N, self.hidden_size), dtype=self.dtype)
                      for _ in range(n_states)]
        else:
            if self._mode == "LSTM":
                if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                    raise ValueError(
                        f"hx: LSTMCell expects a pair (h0, c0), got {type(hx).__name__}"
                        + (f" of length {len(hx)}" if isinstance(hx, (tuple, list)) else ""))
                named = [("hx[0] (h0)", hx[0]), ("hx[1] (c0)", hx[1])]
            else:
                if isinstance(hx, tuple):
                    raise ValueError(
                        f"hx: {type(self).__name__} expects a single array h0, got a tuple "
                        f"(a pair (h0, c0) is for LSTMCell)")
                named = [("hx", hx)]
            for name, value in named:
                a = self._as_input(name, value)
                if a.shape != state_shape:
                    kind = "batched 2-D" if batched else "unbatched 1-D"
                    raise ValueError(
                        f"{name}: for {kind} input expected shape {_shape_str(state_shape)}, "
                        f"got {_shape_str(a.shape)}")
                states.append(np.ascontiguousarray(a[None] if batched else a[None, None]))
        hx_b = tuple(states) if self._mode == "LSTM" else states[0]
        zoneout = self._cell_zoneout(N, batched, zoneout_mask) if N > 0 else None
        rec_mask = self._cell_recurrent_dropout(N, batched, recurrent_dropout_mask) if N > 0 else None
        cell_forward = getattr(self._backend, "cell_forward", None)
        if cell_forward is not None and N > 0 and zoneout is None and rec_mask is None:
            # the lean path of the fused backend
            p = self._params
            training = self.training
            h_n, c_n, cache = cell_forward(
                self._mode, x_b, hx_b,
                [p["weight_ih"], p["weight_hh"], p.get("bias_ih"), p.get("bias_hh")], training)
            calls = self._calls
            calls.pending = cache if training else None
            calls.last_forward = "train" if training else "eval"
            calls.layout = (batched, N)
        else:
            extra = {} if zoneout is None else {"zoneout_masks": zoneout}
            if rec_mask is not None:
                extra["recurrent_dropout_masks"] = rec_mask
            _, h_n, c_n = self._run_forward(
                x_b, hx_b, self._backend_params(self._params), num_layers=1,
                bidirectional=False, proj_size=0, lengths=None, dropout_masks=None,
                layout=(batched, N), **extra)
        h1 = h_n[0] if batched else h_n[0, 0]
        if self._mode == "LSTM":
            return h1, (c_n[0] if batched else c_n[0, 0])
        return h1

    def _cell_backward(self, grad_h1, grad_c1):
        batched, N = self._check_backward_allowed()
        shape = (N, self.hidden_size) if batched else (self.hidden_size,)
        d_h1 = self._as_input("grad_h1", grad_h1)
        self._check_shape("grad_h1", d_h1, shape)
        d_c1 = None
        if grad_c1 is not None:
            d_c1 = self._as_input("grad_c1", grad_c1)
            self._check_shape("grad_c1", d_c1, shape)

        def to_backend(a):
            return np.ascontiguousarray((a if batched else a[None])[None])

        # h1 is both output[0] and h_n[0]; its gradient goes in as d_output.
        dx, dh0, dc0 = self._run_backward(
            to_backend(d_h1), None, None if d_c1 is None else to_backend(d_c1),
            self._backend_params(self.grad))

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


# ----------------------------------------------------------------------------------
# reduced precision


_PRECISIONS = ("int8", "bfloat16")
_WEIGHT_PREFIXES = ("weight_ih", "weight_hh", "weight_hr")


def _read_only(array):
    array = np.array(array, order="C")
    array.flags.writeable = False
    return array


def quantize(layer, precision):
    """An inference-only copy of ``layer`` with its weights in ``precision``.

    ``layer``: an ``LSTM``, ``GRU``, ``RNN``, ``CTRNN`` or ``LayerNormLSTM`` of dtype
    float32 (any options but zoneout). The layer norms' parameters stay float32.
    ``precision``: ``"int8"``, weights per output row in symmetric int8 and the left
    operand of every product quantized per row and per call (the contract is in
    :mod:`lstmfast.reference`, "Reduced precision"), or ``"bfloat16"``, weights
    rounded to bfloat16. State, gate math, inputs and outputs stay float32.

    The result is a layer of the same class and options, in eval mode: forward takes
    and returns what the float layer's does; ``backward`` raises RuntimeError. Its
    ``state_dict`` holds each weight as ``weight_*`` int8 plus ``weight_*_scale``
    float32 (int8), or as ``weight_*`` uint16 bfloat16 bit patterns (bfloat16), and
    the biases as float32; ``load_state_dict`` takes such a dict back.
    """
    if not isinstance(layer, _RNNBase):
        raise TypeError(
            f"quantize: expected an lstmfast LSTM, GRU, RNN, CTRNN or LayerNormLSTM layer, "
            f"got {type(layer).__name__}")
    if precision not in _PRECISIONS:
        raise ValueError(f"quantize: precision must be one of {_PRECISIONS}, got {precision!r}")
    if layer.precision != "float32":
        raise ValueError(
            f"quantize: the layer is already {layer.precision}; quantize its float32 original")
    if layer.dtype != np.float32:
        raise TypeError(
            f"quantize: reduced precision is for float32 layers, got a layer of dtype {layer.dtype}")
    if any(layer.zoneout):
        raise ValueError(f"quantize: zoneout={layer.zoneout} has no reduced-precision kernels; "
                         f"quantize a layer without it")
    reference = importlib.import_module(_PACKAGE + ".reference")
    state = {}
    for name, value in layer._params.items():
        if not name.startswith(_WEIGHT_PREFIXES):
            state[name] = value
        elif precision == "int8":
            state[name], state[name + "_scale"] = reference.quantize_int8(value)
        else:
            state[name] = reference.to_bfloat16_bits(value)
    return _reduced_like(layer, precision, state)


def _reduced_like(layer, precision, state):
    """A reduced layer with ``layer``'s class and options holding ``state`` (checked as
    load_state_dict checks a dict)."""
    reduced = object.__new__(type(layer))
    reduced.__setstate__({k: v for k, v in layer.__getstate__().items()
                          if k not in ("_params", "grad")})
    reduced.precision = precision
    reduced.training = False
    reduced.grad = {}
    names = []
    for name in layer._param_names():
        names.append(name)
        if precision == "int8" and name.startswith(_WEIGHT_PREFIXES):
            names.append(name + "_scale")
    reduced._params = {name: _read_only(state[name]) for name in names}
    reduced.load_state_dict(state)
    return reduced


def _backend_weight(backend, weight):
    """A reference.Int8Weight / BFloat16Weight as ``backend.forward`` takes it: packed
    by the backend when it packs (the fused one), else as it is."""
    pack = getattr(backend, "pack_weight", None)
    return weight if pack is None else pack(weight)


def _backend_weights(params, precision, backend):
    """Parameters of a reduced layer as ``backend.forward`` takes them: each weight a
    reference.Int8Weight / BFloat16Weight, packed by the backend when it packs."""
    reference = importlib.import_module(_PACKAGE + ".reference")
    out = {}
    for name, value in params.items():
        if name.endswith("_scale"):
            continue
        if name.startswith(_WEIGHT_PREFIXES):
            value = _backend_weight(backend, reference.Int8Weight(value, params[name + "_scale"])
                                    if precision == "int8" else reference.BFloat16Weight(value))
        out[name] = value
    return out
