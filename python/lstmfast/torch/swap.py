"""``accelerate``, ``restore`` and ``quantize_dynamic``: the class of every torch RNN
module inside a model swapped for lstmfast.torch's, in place, and back; ``freeze``:
an inference copy of a model with its recurrent weights packed once.

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

from ._backend import _unsupported_reason, _weight_arrays
from .cells import _CELL_WEIGHTS, GRUCell, LSTMCell, RNNCell, _cell_weights, _FastCellMixin
from .layers import GRU, LSTM, RNN, _FastRNNMixin
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


def freeze(model):
    """An inference copy of ``model`` whose recurrent layers and cells have their
    weights packed once, as ``lstmfast.freeze`` packs a layer of the NumPy API.

    Every call of a layer or cell otherwise lays ``weight_ih`` and ``weight_hh`` out
    for the kernels anew (or, for a call of a few steps, reads them in place, at about
    twice the cost per step), since torch's parameters may have changed since the last
    call: for a stream fed a frame or a chunk of frames per call, most of the call.

    ``model``: any ``torch.nn.Module``. The copy (``model`` is left as it is) is
    accelerated (``accelerate``) and in eval mode; in every lstmfast.torch layer and
    cell in it (not the int8 ones of ``quantize_dynamic``, packed already) the
    parameters no longer require gradients and the weights are packed now. Calls
    compute the same function, on the kernels' packed path. The packed weights are
    made again at the next call after a weight changes where torch counts the change
    (``load_state_dict``, ``copy_``, an optimizer's step; gradients flow to the input
    and, if asked for again, to the parameters); a write through ``.data`` is not
    counted and goes unseen: freeze again after one. Copies and pickles pack again at
    their first call.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"freeze: model must be a torch.nn.Module, got {type(model).__name__}")
    frozen = accelerate(copy.deepcopy(model)).eval()
    for module in frozen.modules():
        if not isinstance(module, (_FastRNNMixin, _FastCellMixin)) or getattr(
                module, "_lstmfast_quantized", False):
            continue
        module._lstmfast_frozen = True
        for p in module.parameters(recurse=False):
            p.requires_grad_(False)
        if isinstance(module, _FastCellMixin):
            weights, names = _cell_weights(module), _CELL_WEIGHTS
        else:
            weights, names, _ = module._lstmfast_weights()
        # weights the kernels take (as a call's own test decides), packed now, not in the
        # first call's time
        if _unsupported_reason(weights[0], weights) is None:
            _weight_arrays(module, weights, names)
    return frozen
