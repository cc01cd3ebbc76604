"""The constructors' arguments, checked, and what each backend mode is.

Each check names the argument in its message and returns the value as the layer
keeps it. The torch adapter imports the checks of the options torch lacks
(recurrent dropout, zoneout, a CTRNN's, a layer-normalized LSTM's) and ONNX's gate
options (``_GateOptions``), so both APIs take and refuse the same values. ``_check_sizes`` refuses at construction what the layer
could never hold or compute; ``_load_backend`` resolves ``backend=``.
"""

import importlib
import numbers
import os

import numpy as np

from .._cells import CELL_STATE_MODES, GATES

_PACKAGE = __package__.rpartition(".")[0]  # "lstmfast": the backends are its modules
_BACKENDS = ("fused", "numpy")
_NONLINEARITIES = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}
_CTRNN_MODES = {"tanh": "CTRNN_TANH", "relu": "CTRNN_RELU"}
_LEAKS = ("outside", "inside")
_GATES = GATES  # the cell table's (_cells.py)
_CELL_STATE_MODES = CELL_STATE_MODES  # the state is a pair (h, c)
_BLAS_MAX = 2**31 - 1  # the fused kernels' BLAS takes 32-bit dimensions
_BYTES_PER_ARRAY = 1024  # rough cost of one parameter and its gradient as Python objects


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


def _check_activations(mode, activations, activation_alpha, activation_beta):
    """ONNX's activations of an LSTM (f, g, h), GRU (f, g) or RNN (f), with their
    alpha and beta, one entry each (None: ONNX Runtime's default), checked: the
    (name, alpha, beta) triples, or None for the cell's own (torch's)."""
    reference = importlib.import_module(_PACKAGE + ".reference")
    default = reference.DEFAULT_ACTIVATIONS.get(mode)
    if activations is None:
        if activation_alpha is not None or activation_beta is not None:
            raise ValueError("activation_alpha, activation_beta: given without activations")
        return None
    if default is None:
        raise ValueError(f"activations: only LSTM, GRU and RNN take them, not {mode}")
    if isinstance(activations, str) or not all(isinstance(a, str) for a in activations):
        raise TypeError(f"activations should be a sequence of names such as {default}, "
                        f"got {activations!r}")
    activations = tuple(activations)
    n = len(activations)
    extras = []
    for name, values in (("activation_alpha", activation_alpha),
                         ("activation_beta", activation_beta)):
        values = (None,) * n if values is None else tuple(values)
        if len(values) != n:
            raise ValueError(f"{name}: expected one entry (or None) per activation, {n}, "
                             f"got {len(values)}")
        for v in values:
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
                raise TypeError(f"{name} should hold numbers or None, got {v!r}")
        extras.append(values)
    triples = reference.resolve_activations(mode, zip(activations, *extras))
    for (act, alpha, beta), given_alpha, given_beta in zip(triples, *extras):
        reads = reference.ACTIVATION_PARAMETERS.get(act, (False, False))
        for name, given, read in (("activation_alpha", given_alpha, reads[0]),
                                  ("activation_beta", given_beta, reads[1])):
            if given is not None and not read:
                raise ValueError(f"{name}: {act} takes none, got {given!r}")
    return triples


def _check_clip(clip):
    """ONNX's cell clip: None, or a number > 0 bounding every gate pre-activation."""
    if clip is None:
        return None
    if isinstance(clip, bool) or not isinstance(clip, numbers.Real) or not clip > 0:
        raise ValueError(f"clip must be None or a number > 0, got {clip!r}")
    return float(clip)


class _GateOptions:
    """ONNX's activations (with their alpha and beta), clip and input_forget, and its
    direction="reverse", on a layer of lstmfast's or lstmfast.torch's (docs/onnx.md):
    checked once, kept, and read back. The class gives its backend mode as
    ``_gate_options_mode``."""

    # the (name, alpha, beta) triples when they are not the cell's own, else None
    _activations = None
    clip = None
    input_forget = False
    reverse = False  # one direction, each sequence from its own end to its start

    def _set_onnx_options(self, activations, activation_alpha, activation_beta, clip,
                          input_forget, reverse, bidirectional):
        self._set_gate_options(activations, activation_alpha, activation_beta, clip,
                               input_forget)
        self.reverse = _check_flag("reverse", reverse)
        if self.reverse and bidirectional:
            raise ValueError("reverse: a bidirectional layer already runs both ways; "
                             "reverse=True is for a layer of one direction")

    def _set_gate_options(self, activations, activation_alpha, activation_beta, clip,
                          input_forget):
        reference = importlib.import_module(_PACKAGE + ".reference")
        mode, owner = self._gate_options_mode, type(self).__name__
        triples = _check_activations(mode, activations, activation_alpha, activation_beta)
        if triples is not None and triples != reference.resolve_activations(mode):
            self._activations = triples
        self.clip = _check_clip(clip)
        if self.clip is not None and mode not in reference.DEFAULT_ACTIVATIONS:
            raise ValueError(f"clip: only LSTM, GRU and RNN take it, not {owner}")
        self.input_forget = _check_flag("input_forget", input_forget)
        if self.input_forget and mode != "LSTM":
            raise ValueError(f"input_forget: only an LSTM couples its gates, not {owner}")

    def _activation_triples(self):
        reference = importlib.import_module(_PACKAGE + ".reference")
        return self._activations or reference.resolve_activations(self._gate_options_mode)

    @property
    def activations(self):
        """The activations (f, g, h as the cell has them: ONNX's names), torch's by default."""
        return tuple(name for name, _, _ in self._activation_triples())

    def _activation_parameter(self, index):
        reference = importlib.import_module(_PACKAGE + ".reference")
        return tuple(triple[1 + index]
                     if reference.ACTIVATION_PARAMETERS.get(triple[0], (False, False))[index]
                     else None for triple in self._activation_triples())

    @property
    def activation_alpha(self):
        """Each activation's alpha (None for those that read none)."""
        return self._activation_parameter(0)

    @property
    def activation_beta(self):
        """Each activation's beta (None for those that read none)."""
        return self._activation_parameter(1)

    def _gate_options(self):
        """The backends' keyword arguments for the options that are set."""
        options = {}
        if self._activations is not None:
            options["activations"] = self._activations
        if self.clip is not None:
            options["clip"] = self.clip
        if self.input_forget:
            options["input_forget"] = True
        return options

    def _onnx_options(self):
        """The backends' keyword arguments for ONNX's options that are set, reverse
        included."""
        options = self._gate_options()
        if self.reverse:
            options["reverse"] = True
        return options

    def _gate_options_repr(self):
        """The options that are set, as extra_repr shows them."""
        s = ""
        if self._activations is not None:
            s += f", activations={self.activations}"
            for name in ("activation_alpha", "activation_beta"):
                if any(v is not None for v in getattr(self, name)):
                    s += f", {name}={getattr(self, name)}"
        if self.clip is not None:
            s += f", clip={self.clip}"
        if self.input_forget:
            s += ", input_forget=True"
        if self.reverse:
            s += ", reverse=True"
        return s


def _rnn_nonlinearity(layer, nonlinearity):
    """An Elman RNN's nonlinearity once its ONNX options are set (_GateOptions, with
    the mode of ``nonlinearity``), in both APIs: ONNX's ``Relu`` alone is
    ``nonlinearity="relu"`` (torch's own relu RNN, whose kernels run) and clears the
    activations; another activation replaces the nonlinearity, which must then be
    "tanh". ValueError when they disagree."""
    if layer._activations is None:
        return nonlinearity
    if nonlinearity != "tanh":
        raise ValueError(f"activations={layer.activations} and nonlinearity="
                         f"{nonlinearity!r} disagree: give one of them")
    if layer._activations == (("relu", 0.0, 0.0),):
        layer._activations = None
        return "relu"
    return nonlinearity


def _resolve_dtype(dtype):
    # np.dtype(None) is float64 and dtype == None compares as float64: exclude None first.
    try:
        resolved = None if dtype is None else np.dtype(dtype)
    except (TypeError, ValueError):
        resolved = None
    if resolved is None or resolved.type not in (np.float32, np.float64):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    if not resolved.isnative:  # '>f4': the kernels and the arrays they return are native
        raise ValueError(f"dtype must be 'float32' or 'float64' in the machine's byte order, got {dtype!r}")
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
