"""What every layer and cell shares (``_Module``), and the multi-layer layers' base
(``_RNNBase``).

``_Module`` holds the parameters (as attributes, in ``state_dict``, in pickles), the
gradients, train/eval, and the calls of the backend: the pending forward of each
thread that backward consumes, and one backward at a time adding into ``grad``.
``_RNNBase`` is LSTM's, GRU's and RNN's (and their variants'): the constructor's
checks and parameters, and forward and backward as steps, each done elsewhere: the
call's arrays by inputs.py, the training masks by masks.py, the math by the backend.
"""

import importlib
import threading
import warnings

import numpy as np

from .._cells import modes_with
from .inputs import (_from_time_major, _prepare_grads, _prepare_hx, _prepare_input,
                     _prepare_lengths, _shape_str, _to_numpy)
from .masks import _dropout_masks, _regularizer_args
from .options import (_CELL_STATE_MODES, _PACKAGE, _GateOptions, _check_backend, _check_dropout,
                      _check_flag, _check_probability, _check_seed, _check_size, _check_sizes,
                      _check_zoneout, _load_backend, _resolve_dtype)
from .precision import _backend_weights, _checked_reduced_state, _packed_float_weights, _read_only


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
    frozen = False  # True for a layer made by freeze() or quantize(): inference only,
    #                 its parameters read-only and its weights packed once
    _packed = None  # frozen layers: the backend's form of _params, made on first use

    @property
    def _trains(self):
        """Whether a forward keeps what backward needs (frozen layers never do)."""
        return self.training and not self.frozen

    def _forward_params(self):
        """The parameters as the backend takes them: the arrays themselves, or for a
        frozen layer its weights packed once (see freeze and quantize)."""
        if not self.frozen:
            return self._params
        if self._packed is None:
            if self.precision != "float32":
                self._packed = _backend_weights(self._params, self.precision, self._backend)
            else:
                self._packed = _packed_float_weights(self)
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
            if self.frozen:
                raise AttributeError(
                    f"{name}: the parameters of a frozen layer are read-only; freeze the "
                    f"original layer again, or use load_state_dict")
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
        if self.precision != "float32":  # pickled before frozen was kept
            self.frozen = True
        if self.frozen and "_params" in state:  # arrays come back from a pickle writeable
            self._params = {name: _read_only(value) for name, value in self._params.items()}
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
        if str(getattr(value, "dtype", "")) == "torch.bfloat16":
            value = value.float()  # NumPy has no bfloat16: a bf16 checkpoint is cast as any other
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
            self._params = _checked_reduced_state(self, state_dict)
            self._packed = None
            return
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
        if self.frozen:  # new read-only arrays, packed again on first use
            self._params = {name: _read_only(values[name]) for name in self._params}
            self._packed = None
            return
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

    # the backend's calls -----------------------------------------------------------

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
        self._keep_pending(cache, training, layout)
        return output, h_n, c_n

    def _keep_pending(self, cache, training, layout):
        """Remember this thread's forward: its cache (training) and the caller's layout."""
        calls = self._calls
        calls.pending = cache if training else None
        calls.last_forward = "train" if training else "eval"
        calls.layout = layout

    def _check_backward_allowed(self):
        if self.precision != "float32":
            raise RuntimeError(
                f"{type(self).__name__}.backward: this is a {self.precision} layer made by "
                f"lstmfast.quantize, for inference only; train the float32 layer and quantize "
                f"it again")
        if self.frozen:
            raise RuntimeError(
                f"{type(self).__name__}.backward: this layer was made by lstmfast.freeze, for "
                f"inference only; train the original layer and freeze it again")
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
        elif self.frozen:
            s += ", frozen=True"
        return s


class _RNNBase(_GateOptions, _Module):
    """Shared by LSTM, GRU and RNN (and CTRNN, LayerNormLSTM): the constructor's checks
    and parameters, forward and backward from the caller's layout to the backend's."""

    peephole = False  # LSTM(peephole=True) sets it
    recurrent_dropout = 0.0
    zoneout = (0.0, 0.0)
    _zoneout_modes = modes_with("zoneout")  # where zoneout may be set (the cell table)

    def __init__(self, mode, input_size, hidden_size, num_layers=1, bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, proj_size=0,
                 dtype="float32", backend="fused", seed=None, peephole=False,
                 recurrent_dropout=0.0, zoneout=0.0, activations=None, activation_alpha=None,
                 activation_beta=None, clip=None, input_forget=False, reverse=False):
        self._mode = mode
        self._set_onnx_options(activations, activation_alpha, activation_beta, clip,
                               input_forget, reverse, bidirectional)
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
            # stacklevel 3: the warning points at the user's LSTM(...), through the
            # subclass's __init__
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
    def _gate_options_mode(self):
        return self._mode

    def _kernels_compute(self):
        """Whether the fused kernels compute this layer: ONNX's options they lack send
        it to the reference (docs/onnx.md)."""
        options = {k: v for k, v in self._onnx_options().items() if k != "reverse"}
        return self.backend == "fused" and self._backend.fused(self._mode, **options)

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

    def to_onnx(self, path=None):
        """This layer as an ONNX model of standard LSTM / GRU / RNN nodes, written to
        ``path`` when given, and returned (``lstmfast.onnx_nodes.to_onnx``)."""
        from ..onnx_nodes import to_onnx

        return to_onnx(self, path)

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
        s += self._gate_options_repr()
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

    def _forward(self, x, hx, lengths, given=None, rec_mask=None, zone_mask=None):
        if (lengths is None and given is None and rec_mask is None and zone_mask is None
                and not self._trains):
            result = self._plain_inference_forward(x, hx)
            if result is not None:
                return result
        x_tm, batched = _prepare_input(x, self.input_size, self.batch_first, self.dtype)
        T, N = x_tm.shape[:2]
        h0, c0 = _prepare_hx(self, hx, N, batched)
        lengths = _prepare_lengths(lengths, T, N)
        masks = None
        if self._trains and self.dropout > 0 and self.num_layers > 1:
            masks = self._make_dropout_masks(T, N)
        output, h_n, c_n = self._run_forward(
            x_tm, (h0, c0) if self._mode in _CELL_STATE_MODES else h0, self._forward_params(),
            num_layers=self.num_layers, bidirectional=self.bidirectional,
            proj_size=self.proj_size, lengths=lengths, dropout_masks=masks,
            layout=(batched, T, N), **self._cell_options(T, N, batched, given),
            **_regularizer_args(self, T, N, batched, rec_mask, zone_mask), **self._onnx_options())
        output = _from_time_major(output, batched, self.batch_first)
        if not batched:
            h_n = h_n[:, 0]
            c_n = None if c_n is None else c_n[:, 0]
        if self._mode in _CELL_STATE_MODES:
            return output, (h_n, c_n)
        return output, h_n

    def _plain_inference_forward(self, x, hx):
        """The call a stream makes at every frame, and a batch at inference, in few
        steps: x a C-contiguous (T, N, I) array of the layer's dtype (time-major),
        states whole arrays of the right shape or None, no option beyond torch's, on
        the fused kernels. The full path's steps cost as much as the kernels at small
        sizes (GRU(64, 128), one frame at N=1: 16 us a call, the kernels 7). Returns
        None, for the full path to take the call (and raise its errors), unless every
        condition holds; the full path would then pass the backend the same arrays."""
        # Every check is a plain attribute or a cheap test, cheapest first: a frame of a
        # small layer costs a few microseconds in the kernels, and each property or
        # helper called here added a tenth of one (the dtypes are numpy's builtin ones,
        # one object each: another object of the same type takes the full path).
        dtype = self.dtype
        if (type(x) is not np.ndarray or x.ndim != 3 or x.dtype is not dtype or self.batch_first
                or self.backend != "fused" or not x.flags.c_contiguous
                or x.shape[2] != self.input_size or not x.shape[0] or not x.shape[1]
                or self.zoneout[0] or self.zoneout[1]
                or type(self)._cell_options is not _RNNBase._cell_options
                or self._activations is not None or self.clip is not None or self.input_forget
                or self.reverse):  # ONNX's options (_onnx_options), spelled out
            return None
        T, N = x.shape[0], x.shape[1]
        LD = self.num_layers * (2 if self.bidirectional else 1)
        is_lstm = self._mode in _CELL_STATE_MODES
        H_out = self.proj_size or self.hidden_size
        if hx is None:
            h0 = np.zeros((LD, N, H_out), dtype=dtype)
            states = (h0, np.zeros((LD, N, self.hidden_size), dtype=dtype)) if is_lstm else h0
        else:
            given = tuple(hx) if is_lstm and isinstance(hx, (tuple, list)) else (hx,)
            if len(given) != (2 if is_lstm else 1):
                return None
            for state, width in zip(given, (H_out, self.hidden_size)):
                if (type(state) is not np.ndarray or state.dtype is not dtype
                        or state.shape != (LD, N, width) or not state.flags.c_contiguous):
                    return None
            states = given if is_lstm else given[0]
        output, h_n, c_n = self._backend.plain_forward(
            self._mode, x, states, self._forward_params(), self.num_layers, self.bidirectional,
            self.proj_size)
        self._keep_pending(None, False, (True, T, N))
        return (output, (h_n, c_n)) if is_lstm else (output, h_n)

    def _make_dropout_masks(self, T, N):
        """One mask per gap between layers, values 0 or 1/(1-p), from the dropout stream.

        A method, not a call of masks.py from _forward, so that a test can give a layer
        masks of its own, and read the ones a seed draws."""
        return _dropout_masks(self._dropout_rng, self.dropout, self.num_layers,
                              (T, N, self._num_directions * self._out_size), self.dtype)

    # backward ------------------------------------------------------------------------

    def backward(self, grad_output, grad_h_n=None):
        """Gradients of the last training-mode forward, given the upstream gradients.

        ``grad_output`` has the shape of ``output``; ``grad_h_n`` that of ``h_n`` (LSTM:
        a pair ``(grad_h_n, grad_c_n)``, either may be None) or None for zeros. Returns
        ``(grad_x, grad_hx)`` in the caller's layout (LSTM: ``grad_hx = (grad_h0,
        grad_c0)``) and ADDS the parameter gradients into ``self.grad``.
        """
        batched, T, N = self._check_backward_allowed()
        d_output, d_h, d_c = _prepare_grads(self, grad_output, grad_h_n, batched, T, N)
        dx, dh0, dc0 = self._run_backward(d_output, d_h, d_c, self.grad)
        dx = _from_time_major(dx, batched, self.batch_first)
        if not batched:
            dh0 = dh0[:, 0]
            dc0 = None if dc0 is None else dc0[:, 0]
        if self._mode in _CELL_STATE_MODES:
            return dx, (dh0, dc0)
        return dx, dh0
