"""How a frozen layer (made by ``freeze`` or ``quantize``, in reduced.py) holds its
weights and hands them to a backend.

A layer made by ``freeze`` keeps its float parameters as read-only arrays; the
backends take weight_ih and weight_hh packed once (``_packed_float_weights``).

A reduced layer's ``_params`` hold read-only arrays: each weight ``weight_*`` as int8
with a float32 ``weight_*_scale`` per row, or as uint16 bfloat16 bit patterns; every
other parameter as float32. The backends take each weight as a
``reference.Int8Weight`` / ``BFloat16Weight``, which the fused backend packs once for
its kernels. The torch adapter packs its reduced weights with ``_backend_weight`` too.
"""

import importlib

import numpy as np

from .inputs import _shape_str, _to_numpy
from .options import _PACKAGE

_PRECISIONS = ("int8", "bfloat16")
_WEIGHT_PREFIXES = ("weight_ih", "weight_hh", "weight_hr")


def _read_only(array):
    # A view of a read-only copy: an array that owns its memory could be made writeable
    # again (flags.writeable = True), and a write would then reach the calls that read
    # the array but not those that read the weights packed from it.
    owner = np.array(array, order="C")
    owner.flags.writeable = False
    return owner.view()


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


def _packed_float_weights(layer):
    """Parameters of a frozen float layer (freeze) as ``backend.forward`` takes them:
    weight_ih and weight_hh packed once by the backend when it packs (the fused one,
    where its kernels compute the layer and the LSTM has no projection), else the
    arrays. A packed weight holds a read-only copy of its array, which the layer then
    keeps as the parameter: one copy of the weights beside the panels."""
    pack = getattr(layer._backend, "pack_gates", None)
    kernels_compute = getattr(layer, "_kernels_compute", None)
    out = dict(layer._params)
    if (pack is None or getattr(layer, "proj_size", 0)
            or (kernels_compute is not None and not kernels_compute())):
        return out
    for name, value in layer._params.items():
        if name.startswith(("weight_ih", "weight_hh")):
            out[name] = pack(layer._mode, value, recurrent=name.startswith("weight_hh"))
            layer._params[name] = out[name].weight.view()  # a view, as _read_only's
    return out


def _checked_reduced_state(layer, state_dict):
    """The parameters of reduced ``layer`` taken from ``state_dict``, read-only, after
    checking names, dtypes (exactly those the layer holds: nothing is cast), shapes and
    scales; KeyError, TypeError or ValueError, and nothing changes, otherwise."""
    params, precision = layer._params, layer.precision
    if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
        raise TypeError(
            f"state_dict should be a mapping name -> array, got {type(state_dict).__name__}")
    missing = [n for n in params if n not in state_dict]
    unexpected = [n for n in state_dict.keys() if n not in params]
    if missing or unexpected:
        raise KeyError(
            f"load_state_dict for a {precision} {type(layer).__name__}: missing key(s): "
            f"{missing}; unexpected key(s): {unexpected} (expected exactly {list(params)})")
    values = {}
    for name, current in params.items():
        value = _to_numpy(state_dict[name])
        if value.dtype != current.dtype:
            raise TypeError(
                f"parameter {name!r}: a {precision} layer holds it as {current.dtype}, "
                f"got {value.dtype}")
        if value.shape != current.shape:
            raise ValueError(
                f"parameter {name!r}: expected shape {_shape_str(current.shape)}, "
                f"got {_shape_str(value.shape)}")
        if name.endswith("_scale") and not (np.isfinite(value).all() and (value > 0).all()):
            raise ValueError(f"parameter {name!r}: scales must be positive and finite")
        values[name] = _read_only(value)
    return values
