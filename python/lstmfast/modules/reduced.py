"""``quantize`` and ``freeze``: inference-only copies of a layer whose weights are
packed once, in int8 or bfloat16 (quantize) or in the layer's own float dtype (freeze).

Each copy is an instance of the layer's own class, so it is called, pickled and
printed as the layer is; ``frozen`` and ``precision`` tell it apart, and ``_Module``
(base.py) then keeps its read-only weights as precision.py describes. This module is
above base.py, not in precision.py, because both name the layer classes
(``_RNNBase``, ``_Module``), which precision.py, imported by base.py, cannot name
without an import cycle.
"""

import copy
import importlib

import numpy as np

from .._cells import modes_with, supports
from .base import _Module, _RNNBase
from .options import _PACKAGE
from .precision import _PRECISIONS, _WEIGHT_PREFIXES, _read_only


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
    if not supports(layer._mode, precision):
        raise ValueError(f"quantize: {precision} kernels are for the cells "
                         f"{', '.join(modes_with(precision))}, not {layer._mode}")
    if any(layer.zoneout):
        raise ValueError(f"quantize: zoneout={layer.zoneout} has no reduced-precision kernels; "
                         f"quantize a layer without it")
    options = sorted(set(layer._onnx_options()) - {"reverse"})
    if options and layer.backend == "fused" and not layer._kernels_compute():
        raise ValueError(f"quantize: with these {', '.join(options)} the layer runs in the "
                         f"reference, which has no reduced-precision kernels (docs/onnx.md)")
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


def freeze(layer):
    """An inference-only copy of ``layer`` whose weights are packed once.

    At the start of every call the fused kernels lay ``weight_ih`` and ``weight_hh``
    out in the panels they read, and a call of a few steps reads the weights in place
    instead (docs/guide.md, "Frozen layers"): for a stream fed a frame or a chunk at
    a time, the better part of the call. A frozen copy is given them laid out once.

    ``layer``: any lstmfast layer or cell (``LSTM``, ``GRU``, ``RNN``, ``CTRNN``,
    ``LayerNormLSTM``, ``LSTMCell``, ``GRUCell``, ``RNNCell``), float32 or float64, with
    any options; not one made by ``quantize`` (its weights are packed already).

    The result is of the same class and options, in eval mode, with ``frozen`` True:
    forward takes and returns what the layer's does and computes the same function
    (the kernels' packed path; for a call of a few steps the sums run in another
    order than the unfrozen layer's, within the float32 tolerance of the tests).
    ``backward`` raises RuntimeError. Its parameters are read-only copies of the
    layer's: ``load_state_dict`` replaces them (and packs again); ``state_dict``,
    pickling and ``to_onnx`` work as for the layer. The panels are those of the
    instruction set in use when it is frozen (or first called after unpickling);
    after ``set_simd_target`` chose another, calls read the weights as stored.

    Nothing is packed for an LSTM with ``proj_size`` (its calls lay out ``W_hh`` and
    ``W_hr`` together, at every call), nor where no panels are read: ONNX options
    that the kernels lack, ``backend="numpy"``. The copy is then only read-only and
    inference-only.
    """
    if not isinstance(layer, _Module):
        raise TypeError(
            f"freeze: expected an lstmfast layer or cell (LSTM, GRU, RNN, CTRNN, LayerNormLSTM, "
            f"LSTMCell, GRUCell, RNNCell), got {type(layer).__name__}")
    if layer.precision != "float32":
        raise ValueError(
            f"freeze: the layer is {layer.precision}, made by quantize, whose weights are "
            f"packed already; freeze its float original, or use it as it is")
    frozen = object.__new__(type(layer))
    frozen.__setstate__(_options_of(layer))
    frozen.frozen = True
    frozen.training = False
    frozen.grad = {}
    frozen._params = {name: _read_only(value) for name, value in layer._params.items()}
    frozen._forward_params()  # packed now, not in the first call's time
    return frozen


def _options_of(layer):
    """``layer``'s state without its parameters and gradients, for a copy of another
    kind. Its random streams (a CTRNN's noise, the dropout masks) are copied: the copy
    draws its own from the layer's present state on, so that calling one never changes
    what the other draws. The rest is shared (the dtype must stay numpy's own object:
    the short path of a call compares it by identity)."""
    state = {k: v for k, v in layer.__getstate__().items() if k not in ("_params", "grad")}
    return {k: copy.deepcopy(v) if isinstance(v, np.random.Generator) else v for k, v in state.items()}


def _reduced_like(layer, precision, state):
    """A reduced layer with ``layer``'s class and options holding ``state`` (checked as
    load_state_dict checks a dict)."""
    reduced = object.__new__(type(layer))
    reduced.__setstate__(_options_of(layer))
    reduced.precision = precision
    reduced.frozen = True
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
