"""Layers and weights from other formats: ``from_onnx_lstm`` (one ONNX LSTM node,
through onnx_nodes.py; needs the ``onnx`` package, imported when called, not by
``import lstmfast``), and the key map between
torchaudio's layer-normalized LSTM and ``LayerNormLSTM`` (``from_torchaudio_lstm``,
``to_torchaudio_lstm``).
"""

import numpy as np

from .onnx_nodes import layer_from_onnx_node

__all__ = ["from_onnx_lstm", "from_torchaudio_lstm", "to_torchaudio_lstm"]

# torchaudio.models.rnnt._CustomLSTM(layer_norm=True), one module per layer, in the
# order of its state_dict -> LayerNormLSTM's names for layer k (suffix _l{k}).
TORCHAUDIO_LSTM_KEYS = {
    "x2g.weight": "weight_ih",
    "p2g.weight": "weight_hh",
    "c_norm.weight": "ln_cell_weight",
    "c_norm.bias": "ln_cell_bias",
    "g_norm.weight": "ln_gates_weight",
    "g_norm.bias": "ln_gates_bias",
}
_LN_LSTM_ORDER = ("weight_ih", "weight_hh", "ln_gates_weight", "ln_gates_bias", "ln_cell_weight",
                  "ln_cell_bias")


def _as_array(value):
    """A numpy array of a numpy array or a (CPU) torch tensor, without importing torch."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def from_torchaudio_lstm(state_dicts):
    """``LayerNormLSTM`` parameters (a dict, our order) from the state_dicts of
    torchaudio's ``_CustomLSTM(layer_norm=True)`` modules, one per layer (an RNN-T
    predictor's ``lstm_layers``), by TORCHAUDIO_LSTM_KEYS. Values may be arrays or
    tensors. ValueError names a missing or unexpected key (a ``_CustomLSTM`` without
    layer_norm has biases and no norms, which LayerNormLSTM does not compute)."""
    params = {}
    for k, state in enumerate(state_dicts):
        keys = set(state)
        missing = [key for key in TORCHAUDIO_LSTM_KEYS if key not in keys]
        unexpected = sorted(keys - set(TORCHAUDIO_LSTM_KEYS))
        if missing or unexpected:
            raise ValueError(
                f"from_torchaudio_lstm: layer {k}: expected the keys of _CustomLSTM(layer_norm=True) "
                f"{list(TORCHAUDIO_LSTM_KEYS)}; missing {missing}, unexpected {unexpected}")
        ours = {TORCHAUDIO_LSTM_KEYS[key]: _as_array(value) for key, value in state.items()}
        for name in _LN_LSTM_ORDER:
            params[f"{name}_l{k}"] = ours[name]
    return params


def to_torchaudio_lstm(params, num_layers):
    """The inverse of from_torchaudio_lstm: one state_dict (of numpy arrays, in
    _CustomLSTM's key order) per layer of a unidirectional LayerNormLSTM's parameters."""
    return [{key: np.asarray(params[f"{name}_l{k}"]) for key, name in TORCHAUDIO_LSTM_KEYS.items()}
            for k in range(num_layers)]


def _lstm_node(graph, name):
    nodes = [n for n in graph.node if n.op_type == "LSTM" and (name is None or n.name == name)]
    if len(nodes) != 1:
        found = [n.name or "(unnamed)" for n in graph.node if n.op_type == "LSTM"]
        raise ValueError(
            f"from_onnx_lstm: expected exactly one LSTM node{f' named {name!r}' if name else ''}, "
            f"found {len(nodes)} (LSTM nodes in the graph: {found}); pass name=")
    return nodes[0]


def from_onnx_lstm(node_or_model, initializers=None, *, name=None, dtype="float32",
                   backend="fused"):
    """An ``lstmfast.LSTM`` computing what an ONNX ``LSTM`` node computes.

    ``node_or_model``: an ``onnx.ModelProto`` or ``GraphProto`` holding the node (its
    weights as initializers; ``name`` picks one of several LSTM nodes), or a
    ``NodeProto`` with ``initializers``, a mapping from input names to arrays.
    Peepholes (input ``P``) give ``LSTM(..., peephole=True)``; gate blocks are reordered
    from ONNX's i, o, f, c to i, f, g, o, and ``B``'s halves become ``bias_ih`` and
    ``bias_hh``. ``layout=1`` gives ``batch_first=True``. The ONNX attributes lstmfast
    cannot honour (``direction="reverse"``, ``clip``, ``input_forget``, activations
    other than sigmoid, tanh, tanh) raise ValueError, as does a weight that is not
    an initializer; the initial states and lengths are inputs of the call, not of
    the layer. The layer is in eval mode. ``lstmfast.from_onnx`` takes every
    recurrent node of a model (onnx_nodes.py).
    """
    import onnx
    from onnx import numpy_helper

    if isinstance(node_or_model, onnx.ModelProto):
        node_or_model = node_or_model.graph
    if isinstance(node_or_model, onnx.GraphProto):
        graph = node_or_model
        node = _lstm_node(graph, name)
        arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    elif isinstance(node_or_model, onnx.NodeProto):
        node = node_or_model
        if node.op_type != "LSTM":
            raise ValueError(f"from_onnx_lstm: expected an LSTM node, got {node.op_type}")
        arrays = {k: np.asarray(v) for k, v in (initializers or {}).items()}
    else:
        raise TypeError(
            "from_onnx_lstm: expected an onnx ModelProto, GraphProto or NodeProto, got "
            f"{type(node_or_model).__name__}")

    return layer_from_onnx_node(node, arrays, dtype=dtype, backend=backend,
                                caller="from_onnx_lstm")
