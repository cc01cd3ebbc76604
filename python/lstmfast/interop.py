"""Layers and weights from other formats: ``from_onnx_lstm`` (needs the ``onnx``
package, imported when called, not by ``import lstmfast``), and the key map between
torchaudio's layer-normalized LSTM and ``LayerNormLSTM`` (``from_torchaudio_lstm``,
``to_torchaudio_lstm``).
"""

import numpy as np

from .modules import LSTM

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

# ONNX orders an LSTM's gate blocks i, o, f, c and its peepholes i, o, f; lstmfast
# (as torch) orders gates i, f, g (= c), o. Block j of ours is ONNX's block _GATES[j].
_GATES = (0, 2, 3, 1)
_PEEPHOLES = {"i": 0, "o": 1, "f": 2}
_DEFAULT_ACTIVATIONS = ("sigmoid", "tanh", "tanh")


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
    the layer.
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

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    direction = attrs.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    if direction not in ("forward", "bidirectional"):
        raise ValueError(f"from_onnx_lstm: direction={direction!r} has no lstmfast layer "
                         "(forward and bidirectional do)")
    activations = tuple(a.decode().lower() if isinstance(a, bytes) else a.lower()
                        for a in attrs.get("activations", ()))
    if activations and activations[:3] != _DEFAULT_ACTIVATIONS or activations[3:] not in (
            (), _DEFAULT_ACTIVATIONS):
        raise ValueError(f"from_onnx_lstm: activations {activations} are not the LSTM's "
                         f"{_DEFAULT_ACTIVATIONS}")
    for unsupported in ("clip", "input_forget", "activation_alpha", "activation_beta"):
        if attrs.get(unsupported):
            raise ValueError(f"from_onnx_lstm: attribute {unsupported}={attrs[unsupported]!r} "
                             "is not supported")

    inputs = list(node.input) + [""] * (8 - len(node.input))

    def initializer(index, what):
        if not inputs[index]:
            return None
        if inputs[index] not in arrays:
            raise ValueError(f"from_onnx_lstm: {what} ({inputs[index]!r}) must be an initializer")
        return np.asarray(arrays[inputs[index]], dtype=np.float64)

    W, R, B, P = (initializer(1, "W"), initializer(2, "R"), initializer(3, "B"),
                  initializer(7, "P"))
    if W is None or R is None:
        raise ValueError("from_onnx_lstm: the node has no W or R")
    D, GH, I = W.shape
    H = int(attrs.get("hidden_size", GH // 4))
    if GH != 4 * H or R.shape != (D, 4 * H, H) or D != (2 if direction == "bidirectional" else 1):
        raise ValueError(f"from_onnx_lstm: W {W.shape} and R {R.shape} do not fit hidden_size={H} "
                         f"and direction={direction!r}")

    def blocks(a):  # ONNX's gate blocks along axis 0 in our order
        return np.concatenate([a[k * H:(k + 1) * H] for k in _GATES])

    layer = LSTM(I, H, bidirectional=D == 2, batch_first=attrs.get("layout", 0) == 1,
                 dtype=dtype, backend=backend, peephole=P is not None)
    state = {}
    for d in range(D):
        suffix = "_l0" + ("_reverse" if d else "")
        state["weight_ih" + suffix] = blocks(W[d])
        state["weight_hh" + suffix] = blocks(R[d])
        bias = np.zeros(8 * H) if B is None else B[d]
        state["bias_ih" + suffix] = blocks(bias[:4 * H])
        state["bias_hh" + suffix] = blocks(bias[4 * H:])
        if P is not None:
            for gate, k in _PEEPHOLES.items():
                state[f"weight_c{gate}" + suffix] = P[d, k * H:(k + 1) * H]
    layer.load_state_dict(state)
    return layer
