"""``accelerate``, ``restore`` and ``quantize_dynamic``: the class of every torch RNN
module inside a model swapped for lstmfast.torch's, in place, and back.

Named swap, not accelerate: a submodule named as the function ``lstmfast.torch
.accelerate`` would be hidden by it (``import lstmfast.torch.accelerate as m`` gives
the function).
"""

import copy
import sys

import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as nnqd
from torch.nn.utils import parametrize

from .cells import GRUCell, LSTMCell, RNNCell
from .layers import GRU, LSTM, RNN
from .quantized import QuantizedGRU, QuantizedLSTM
from .variants import _TorchaudioLSTMForward


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


_torchaudio_twins = {}  # torchaudio's _CustomLSTM class -> its accelerated twin


def _torchaudio_swaps():
    """{torchaudio's _CustomLSTM: its twin on lstmfast's kernels} when the program has
    imported torchaudio's RNN-T models (a model holding one has), else {}."""
    custom = getattr(sys.modules.get("torchaudio.models.rnnt"), "_CustomLSTM", None)
    if not isinstance(custom, type):
        return {}
    if custom not in _torchaudio_twins:  # named lstmfast.torch's, as the public classes are
        _torchaudio_twins[custom] = type(custom.__name__, (_TorchaudioLSTMForward, custom),
                                         {"__module__": __package__})
    return {custom: _torchaudio_twins[custom]}


def _swap_all(model, table, what):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        cls = _swapped_class(type(module), table)
        if cls is not None and not (what == "restore"
                                    and getattr(module, "_lstmfast_beyond_torch", False)):
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
    came from, with its parameters, hooks and state as they are. A layer that no torch
    class computes (``GRU(linear_before_reset=False)``, ONNX's activations, clip,
    input_forget or reverse) stays as it is. Returns ``model``."""
    back = {twin: custom for custom, twin in _torchaudio_swaps().items()}
    return _swap_all(model, {**_RESTORES, **back}, "restore")


def quantize_dynamic(model, qconfig_spec=None, dtype=torch.qint8, inplace=False):
    """``torch.ao.quantization.quantize_dynamic`` followed by ``accelerate``: the
    model's LSTM and GRU layers get torch's int8 weights and run on lstmfast's int8
    kernels (the other modules are quantized exactly as torch's function does).
    Arguments are torch's; ``dtype`` must be ``torch.qint8`` (torch.float16 layers
    would run torch's kernels: use torch's function for them). Layers already
    accelerated are quantized too, but for those no torch class computes
    (``GRU(linear_before_reset=False)``, ONNX's options), which stay float. Returns the
    quantized model.
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
