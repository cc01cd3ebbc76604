"""``from_onnx``: the recurrent nodes of an ONNX model as lstmfast.torch layers, to run
or train inside a torch model. ``lstmfast.from_onnx`` reads the nodes (docs/onnx.md);
each of its layers becomes the torch layer of the same cell, options and weights.
"""

import torch

from .. import onnx_nodes
from .layers import GRU, LSTM, RNN
from .variants import PeepholeLSTM


def from_onnx(model_or_path, *, dtype=torch.float32):
    """Every ``LSTM``, ``GRU`` and ``RNN`` node of an ONNX model as an ``lstmfast.torch``
    layer (``LSTM``, ``PeepholeLSTM`` for a node with ``P``, ``GRU``, ``RNN``), in eval
    mode: a dict from node name to layer, as ``lstmfast.from_onnx`` gives NumPy layers.

    The layer computes what the node computes, with torch's calling convention
    (``layout=1`` is ``batch_first``; ``sequence_lens`` is a ``PackedSequence``), and
    trains like any torch module; ``direction="reverse"`` is the layer's ``reverse=True``.
    ``dtype``: torch.float32 or torch.float64. ValueError names the node for what a
    torch layer cannot hold: ``DynamicQuantizeLSTM`` (int8 weights, which
    ``lstmfast.from_onnx`` gives as an int8 layer); and what ``lstmfast.from_onnx``
    refuses.
    """
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"from_onnx: dtype must be torch.float32 or torch.float64, got {dtype}")
    layers = onnx_nodes.from_onnx(model_or_path,
                                  dtype="float64" if dtype == torch.float64 else "float32")
    return {name: _torch_layer(name, layer, dtype) for name, layer in layers.items()}


def _torch_layer(name, layer, dtype):
    """The lstmfast.torch layer of the same cell, options and weights as ``layer``."""
    def refuse(what):
        raise ValueError(f"lstmfast.torch.from_onnx: node {name!r}: {what}")

    if layer.precision != "float32":
        refuse("a DynamicQuantizeLSTM holds int8 weights, which a torch layer does not: "
               "lstmfast.from_onnx gives it as an int8 layer")
    options = dict(batch_first=layer.batch_first, bidirectional=layer.bidirectional,
                   reverse=layer.reverse, dtype=dtype,
                   activations=list(layer.activations),
                   activation_alpha=list(layer.activation_alpha),
                   activation_beta=list(layer.activation_beta), clip=layer.clip)
    if layer._mode == "LSTM":
        cls = PeepholeLSTM if layer.peephole else LSTM
        options["input_forget"] = layer.input_forget
    elif layer._mode in ("GRU", "GRU_RESET_BEFORE"):
        cls = GRU
        options["linear_before_reset"] = layer.linear_before_reset
    else:
        cls = RNN
        options["nonlinearity"] = layer.nonlinearity
    module = cls(layer.input_size, layer.hidden_size, **options)
    module.load_state_dict({key: torch.from_numpy(value) for key, value in
                            layer.state_dict().items()})
    return module.eval()
