"""ONNX's recurrent nodes as lstmfast layers and back: ``from_onnx`` finds every
``LSTM``, ``GRU`` and ``RNN`` node of a model and gives each as a layer that computes
what the node computes; ``run_onnx_node`` calls such a layer with the node's inputs
and returns its outputs as ONNX lays them out; ``to_onnx`` (``layer.to_onnx``) writes
a layer as a model of standard nodes. Needs the ``onnx`` package, imported when
called, not by ``import lstmfast``.

What a node's attributes become (docs/guide.md, "ONNX models"):
- the gate blocks are reordered from ONNX's (LSTM i, o, f, c; GRU z, r, h) to
  torch's (LSTM i, f, g, o; GRU r, z, n); ``B``'s halves become ``bias_ih`` and
  ``bias_hh``, ``P`` the peephole LSTM's ``weight_c{i,f,o}``;
- ``direction``: ``forward``, ``reverse`` (``reverse=True``) or ``bidirectional``;
  ``layout=1``: ``batch_first``;
- ``linear_before_reset``: 1 is torch's GRU, 0 (ONNX's default) ``GRU(...,
  linear_before_reset=False)``;
- ``activations`` with ``activation_alpha`` / ``activation_beta`` (consumed in order
  by the activations that read them, ONNX Runtime's defaults where the lists run
  out), ``clip`` and ``input_forget``: the layers' options of the same names
  (docs/onnx.md says which run in the kernels).
ValueError names the node and the attribute for the rest: activation names ONNX
Runtime does not know, directions of a bidirectional node with different
activations, and weights that are not initializers.
"""

import numpy as np

from . import reference
from .modules import GRU, LSTM, RNN

__all__ = ["from_onnx", "layer_from_onnx_node", "run_onnx_node", "to_onnx"]

# Block j of ours is ONNX's block _ORDER[op][j].
_ORDER = {"LSTM": (0, 2, 3, 1), "GRU": (1, 0, 2), "RNN": (0,)}
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_PEEPHOLES = {"i": 0, "o": 1, "f": 2}  # ONNX's P: i, o, f
_DEFAULT_ACTIVATIONS = {"LSTM": ("sigmoid", "tanh", "tanh"), "GRU": ("sigmoid", "tanh"),
                        "RNN": ("tanh",)}
_STATE_INPUTS = {"LSTM": 3, "GRU": 2, "RNN": 1}  # outputs: Y, Y_h (, Y_c)
_ONNX_NAMES = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu", "affine": "Affine",
               "leakyrelu": "LeakyRelu", "thresholdedrelu": "ThresholdedRelu",
               "scaledtanh": "ScaledTanh", "hardsigmoid": "HardSigmoid", "elu": "Elu",
               "softsign": "Softsign", "softplus": "Softplus"}


def _node_label(node, index):
    return node.name or f"{node.op_type}_{index}"


def _attributes(node):
    import onnx

    values = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, list):
            v = [x.decode() if isinstance(x, bytes) else x for x in v]
        values[a.name] = v
    return values


def layer_from_onnx_node(node, arrays, *, label=None, dtype="float32", backend="fused",
                         caller="from_onnx"):
    """The lstmfast layer computing ONNX node ``node`` (LSTM, GRU or RNN), its weights
    from ``arrays`` (a mapping from input names to arrays: the graph's initializers).
    ValueError names the node (``label``) and what cannot be honoured."""
    label = label or node.name or node.op_type
    if node.op_type not in _GATES and node.op_type != "DynamicQuantizeLSTM":
        raise ValueError(f"{caller}: node {label!r}: {node.op_type} is not a recurrent node "
                         "lstmfast runs (LSTM, GRU, RNN, DynamicQuantizeLSTM)")
    quantized = node.op_type == "DynamicQuantizeLSTM"  # ONNX Runtime's int8 LSTM
    op = "LSTM" if quantized else node.op_type
    if quantized and np.dtype(dtype) != np.float32:
        raise ValueError(f"{caller}: node {label!r}: a DynamicQuantizeLSTM gives an int8 layer, "
                         f"whose dtype is float32, not {np.dtype(dtype)}")

    def refuse(what):
        raise ValueError(f"{caller}: node {label!r}: {what}")

    attrs = _attributes(node)
    direction = attrs.get("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        refuse(f"direction={direction!r}: expected 'forward', 'reverse' or 'bidirectional'")
    D = 2 if direction == "bidirectional" else 1
    activations = _node_activations(op, attrs, D, refuse)
    clip = attrs.get("clip")
    if clip is not None and not clip > 0:
        refuse(f"clip={clip!r}: expected a number > 0")
    input_forget = attrs.get("input_forget", 0)
    if input_forget not in (0, 1):
        refuse(f"input_forget={input_forget!r}: expected 0 or 1")
    layout = attrs.get("layout", 0)
    if layout not in (0, 1):
        refuse(f"layout={layout!r}: expected 0 or 1")

    inputs = list(node.input) + [""] * (12 - len(node.input))

    def initializer(index, what, kind=np.float64):
        if not inputs[index]:
            return None
        if inputs[index] not in arrays:
            refuse(f"{what} ({inputs[index]!r}) must be an initializer")
        return np.asarray(arrays[inputs[index]], dtype=kind)

    if quantized:  # W (D, I, 4H), R (D, H, 4H) integers with their scales and zero points
        integers = {name: _dequantizable(refuse, name, initializer(i, name, None),
                                         initializer(scale, name + "_scale"),
                                         initializer(scale + 1, name + "_zero_point", None))
                    for i, scale, name in ((1, 8, "W"), (2, 10, "R"))}
        W, R = (integers[name][2] for name in ("W", "R"))
    else:
        W, R = initializer(1, "W"), initializer(2, "R")
    B = initializer(3, "B")
    P = initializer(7, "P") if op == "LSTM" else None
    if W is None or R is None:
        refuse("the node has no W or R")
    G = _GATES[op]
    if W.ndim != 3 or W.shape[0] != D:
        refuse(f"W {W.shape} does not fit direction={direction!r}")
    _, GH, I = W.shape
    H = int(attrs.get("hidden_size", GH // G))
    if GH != G * H or R.shape != (D, G * H, H) or (B is not None and B.shape != (D, 2 * G * H)):
        refuse(f"W {W.shape}, R {R.shape}"
               + (f", B {B.shape}" if B is not None else "")
               + f" do not fit hidden_size={H} and direction={direction!r}")
    if P is not None and P.shape != (D, 3 * H):
        refuse(f"P {P.shape} does not fit hidden_size={H}")

    order = _ORDER[op]

    def blocks(a):  # ONNX's gate blocks along axis 0, in our order
        return np.concatenate([a[k * H:(k + 1) * H] for k in order])

    options = dict(bidirectional=D == 2, batch_first=layout == 1, dtype=dtype, backend=backend,
                   reverse=direction == "reverse", clip=clip, **activations)
    if op == "LSTM":
        layer = LSTM(I, H, peephole=P is not None, input_forget=bool(input_forget), **options)
    elif op == "GRU":
        layer = GRU(I, H, linear_before_reset=bool(attrs.get("linear_before_reset", 0)), **options)
    else:
        layer = RNN(I, H, **options)
    state = {}
    for d in range(D):
        suffix = "_l0" + ("_reverse" if d else "")
        state["weight_ih" + suffix] = blocks(W[d])
        state["weight_hh" + suffix] = blocks(R[d])
        bias = np.zeros(2 * G * H) if B is None else B[d]
        state["bias_ih" + suffix] = blocks(bias[:G * H])
        state["bias_hh" + suffix] = blocks(bias[G * H:])
        if P is not None:
            for gate, k in _PEEPHOLES.items():
                state[f"weight_c{gate}" + suffix] = P[d, k * H:(k + 1) * H]
    layer.load_state_dict(state)
    layer.eval()
    if quantized:
        layer = _int8_layer(layer, integers, blocks, D)
    return layer


def _dequantizable(refuse, name, q, scale, zero_point):
    """A DynamicQuantizeLSTM weight (D, K, 4H) as (q - zero_point (D, 4H, K) int32,
    scale (D, 4H), the float weight (D, 4H, K)): ONNX Runtime's scale and zero point
    are per direction or per direction and column."""
    if q is None or scale is None:
        refuse(f"{name} and {name}_scale are needed")
    if q.ndim != 3 or q.dtype not in (np.int8, np.uint8):
        refuse(f"{name}: expected int8 or uint8 of (D, K, 4H), got {q.dtype} {q.shape}")
    D, _, GH = q.shape
    zero_point = np.zeros(D) if zero_point is None else np.asarray(zero_point)
    if scale.shape not in ((D,), (D, GH)) or zero_point.shape != scale.shape:
        refuse(f"{name}_scale {scale.shape}, {name}_zero_point {zero_point.shape}: expected "
               f"({D},) or ({D}, {GH}) each")
    scale = np.broadcast_to(scale.reshape(D, -1), (D, GH))
    zero_point = np.broadcast_to(zero_point.reshape(D, -1), (D, GH))
    integers = q.astype(np.int32).transpose(0, 2, 1) - zero_point[:, :, None]
    return integers, scale, integers * scale[:, :, None]


def _int8_layer(layer, integers, blocks, D):
    """``layer`` quantized to int8 holding a DynamicQuantizeLSTM's own integers and
    scales where they fit lstmfast's contract (symmetric, |q| <= 127: what ONNX Runtime's
    quantize_dynamic writes), else quantized again from the dequantized weights."""
    from .modules.reduced import quantize

    quantized = quantize(layer, "int8")
    state = quantized.state_dict()
    for name, slot in (("W", "weight_ih"), ("R", "weight_hh")):
        q, scale, _ = integers[name]
        if np.abs(q).max() > 127 or not (scale > 0).all():
            return quantized
        for d in range(D):
            suffix = "_l0" + ("_reverse" if d else "")
            state[slot + suffix] = blocks(q[d]).astype(np.int8)
            state[slot + suffix + "_scale"] = blocks(scale[d]).astype(np.float32)
    quantized.load_state_dict(state)
    return quantized


def _node_activations(op, attrs, D, refuse):
    """The layer's activations, activation_alpha and activation_beta from a node's
    attributes, as ONNX Runtime reads them: one name per activation of each
    direction, and the alpha and beta lists consumed in order by the activations
    that read them (its defaults when a list runs out)."""
    names = attrs.get("activations")
    if not names:
        return {}
    default = _DEFAULT_ACTIVATIONS[op]
    if len(names) != D * len(default):
        refuse(f"activations={list(names)}: a {op} of {D} direction(s) takes {D * len(default)}")
    alphas, betas = list(attrs.get("activation_alpha", ())), list(attrs.get("activation_beta", ()))
    triples = []
    for name in names:
        if name.lower() not in reference.ACTIVATIONS:
            refuse(f"activations: {name!r} is not one of ONNX's (Affine, Elu, HardSigmoid, "
                   "LeakyRelu, Relu, ScaledTanh, Sigmoid, Softplus, Softsign, Tanh, "
                   "ThresholdedRelu)")
        reads = reference.ACTIVATION_PARAMETERS.get(name.lower(), (False, False))
        alpha = alphas.pop(0) if reads[0] and alphas else None
        beta = betas.pop(0) if reads[1] and betas else None
        triples.append(reference.resolve_activation((name, alpha, beta)))
    per_direction = [tuple(triples[k:k + len(default)]) for k in range(0, len(triples), len(default))]
    if any(t != per_direction[0] for t in per_direction):
        refuse(f"activations={list(names)}: the two directions differ (an lstmfast layer "
               "has one set)")
    chosen = per_direction[0]
    return {"activations": [n for n, _, _ in chosen],
            "activation_alpha": [a if reference.ACTIVATION_PARAMETERS.get(n, (0, 0))[0] else None
                                 for n, a, _ in chosen],
            "activation_beta": [b if reference.ACTIVATION_PARAMETERS.get(n, (0, 0))[1] else None
                                for n, _, b in chosen]}


def from_onnx(model_or_path, *, dtype="float32", backend="fused"):
    """Every ``LSTM``, ``GRU`` and ``RNN`` node of an ONNX model as an lstmfast layer,
    and every ``DynamicQuantizeLSTM`` (ONNX Runtime's int8 LSTM) as an int8 ``LSTM``
    (``lstmfast.quantize``'s) holding the node's own integers and scales.

    ``model_or_path``: an ``onnx.ModelProto``, a ``GraphProto``, or the path of a
    ``.onnx`` file. Returns a dict from node name (``{op_type}_{index}`` for an
    unnamed node) to a layer in eval mode that computes what the node computes, with
    torch's calling convention: ``layer(X)`` or ``layer(X, h0)`` (``(h0, c0)`` for an
    LSTM) returns ``output, h_n`` (``output, (h_n, c_n)``); ``output`` is (T, N, D*H),
    or (N, T, D*H) for ``layout=1`` (the layer is then batch_first), and ``h_n`` is
    (D, N, H). ``lengths=`` takes the node's ``sequence_lens``. ``run_onnx_node`` gives
    the node's own outputs (Y, Y_h, Y_c) from the node's inputs.
    """
    import onnx
    from onnx import numpy_helper

    if isinstance(model_or_path, (str, bytes)) or hasattr(model_or_path, "__fspath__"):
        model_or_path = onnx.load(model_or_path)
    if isinstance(model_or_path, onnx.ModelProto):
        model_or_path = model_or_path.graph
    if not isinstance(model_or_path, onnx.GraphProto):
        raise TypeError("from_onnx: expected an onnx ModelProto, GraphProto or a path, got "
                        f"{type(model_or_path).__name__}")
    graph = model_or_path
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    layers = {}
    for index, node in recurrent_nodes(graph):
        label = _node_label(node, index)
        layers[label] = layer_from_onnx_node(node, arrays, label=label, dtype=dtype,
                                             backend=backend)
    return layers


def recurrent_nodes(graph):
    """(index, node) of the nodes from_onnx takes, in the graph's order: LSTM, GRU and
    RNN of the standard domain, and ONNX Runtime's DynamicQuantizeLSTM."""
    return [(index, node) for index, node in enumerate(graph.node)
            if (node.op_type in _GATES and node.domain in ("", "ai.onnx"))
            or (node.op_type == "DynamicQuantizeLSTM" and node.domain == "com.microsoft")]


def run_onnx_node(layer, X, sequence_lens=None, initial_h=None, initial_c=None):
    """What the node ``layer`` came from outputs for these inputs, as ONNX lays them out:
    ``(Y, Y_h)`` for a GRU or RNN, ``(Y, Y_h, Y_c)`` for an LSTM. With the node's
    ``layout=0`` (the default) X is (T, N, I), Y (T, D, N, H), the states (D, N, H); with
    ``layout=1`` X is (N, T, I), Y (N, T, D, H), the states (N, D, H). Steps past a
    sequence's length are zeros in Y, as ONNX Runtime gives them."""
    batch_first = layer.batch_first
    X = np.asarray(X)
    N = X.shape[0] if batch_first else X.shape[1]
    D = 2 if layer.bidirectional else 1
    H = layer.hidden_size

    def state_in(s):  # ONNX's layout of a state -> the layer's (D, N, H)
        if s is None:
            return np.zeros((D, N, H), dtype=layer.dtype)
        s = np.asarray(s, dtype=layer.dtype)
        return np.ascontiguousarray(s.transpose(1, 0, 2)) if batch_first else s

    def state_out(s):
        return np.ascontiguousarray(s.transpose(1, 0, 2)) if batch_first else s

    cell_state = isinstance(layer, LSTM)
    hx = (state_in(initial_h), state_in(initial_c)) if cell_state else state_in(initial_h)
    lengths = None if sequence_lens is None else np.asarray(sequence_lens, dtype=np.int64)
    output, state = layer(X.astype(layer.dtype, copy=False), hx, lengths=lengths)
    # output (T, N, D*H) or (N, T, D*H) -> Y (T, D, N, H) or (N, T, D, H)
    if batch_first:
        Y = output.reshape(N, -1, D, H)
    else:
        Y = output.reshape(output.shape[0], N, D, H).transpose(0, 2, 1, 3)
    Y = np.ascontiguousarray(Y)
    if cell_state:
        return Y, state_out(state[0]), state_out(state[1])
    return Y, state_out(state)


# The node of each backend mode that has one.
NODE_OF_MODE = {"LSTM": "LSTM", "GRU": "GRU", "GRU_RESET_BEFORE": "GRU", "RNN_TANH": "RNN",
                "RNN_RELU": "RNN"}


def node_attributes(mode, hidden_size, bidirectional, options):
    """The attributes of the node of a layer of ``mode`` (NODE_OF_MODE) with ONNX's
    ``options`` as the layers' ``_onnx_options()`` gives them (activations where not the
    cell's own, clip, input_forget, reverse): the same for each of its layers. The
    activations and their alpha and beta lists (each direction's in turn) are left out
    where they are the node's defaults; to_onnx and lstmfast.torch's export share it."""
    D = 2 if bidirectional else 1
    attributes = {"hidden_size": hidden_size,
                  "direction": "bidirectional" if D == 2
                  else "reverse" if options.get("reverse") else "forward"}
    if NODE_OF_MODE[mode] == "GRU":
        attributes["linear_before_reset"] = 0 if mode == "GRU_RESET_BEFORE" else 1
    triples = options.get("activations")
    if triples is None and mode == "RNN_RELU":  # the RNN node's default is Tanh
        triples = reference.resolve_activations(mode)
    if triples is not None:
        triples = list(triples) * D
        attributes["activations"] = [_ONNX_NAMES[name] for name, _, _ in triples]
        for index, key in ((0, "activation_alpha"), (1, "activation_beta")):
            values = [float(triple[1 + index]) for triple in triples
                      if reference.ACTIVATION_PARAMETERS.get(triple[0], (False, False))[index]]
            if values:
                attributes[key] = values
    if options.get("clip") is not None:
        attributes["clip"] = float(options["clip"])
    if options.get("input_forget"):
        attributes["input_forget"] = 1
    return attributes


def to_onnx(layer, path=None, *, opset=14):
    """An ONNX model computing ``layer`` (an lstmfast ``LSTM``, ``GRU`` or ``RNN``, float32 or
    float64) with ONNX's standard ``LSTM`` / ``GRU`` / ``RNN`` node per layer; written to
    ``path`` when given, and returned.

    Inputs: ``input`` ((T, N, I), or (N, T, I) when batch_first), ``lengths`` (int32 (N,),
    each sequence's length), ``h0`` ((L*D, N, H)) and, for an LSTM, ``c0``; outputs:
    ``output`` (the layer's layout, (.., D*H)), ``h_n`` (and ``c_n``), as the layer
    returns them. A batch_first layer's input and output are transposed around the
    nodes (ONNX Runtime refuses the nodes' ``layout=1``); ``GRU(linear_before_reset=False)``
    gives ``linear_before_reset=0``; peepholes give the LSTM's ``P``; ``activations``,
    ``clip``, ``input_forget`` and ``reverse`` the attributes of the same names; an int8
    LSTM (``lstmfast.quantize``) gives ONNX Runtime's ``DynamicQuantizeLSTM`` nodes holding
    its integers, with its per-row scales as per-column ones. ValueError for what
    ONNX's nodes do not compute (a projection, bfloat16 weights and int8 GRU or RNN,
    zoneout, the other cells). Recurrent dropout is the identity at inference and is left out."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    mode = layer._mode
    if mode not in NODE_OF_MODE or type(layer) not in (LSTM, GRU, RNN):
        raise ValueError(f"to_onnx: {type(layer).__name__} has no standard ONNX node "
                         "(LSTM, GRU and RNN layers do)")
    if getattr(layer, "proj_size", 0):
        raise ValueError("to_onnx: ONNX's LSTM has no projection (proj_size)")
    # "float32" marks a float layer of either dtype; an int8 LSTM becomes ONNX
    # Runtime's DynamicQuantizeLSTM, which has no GRU or RNN kin.
    int8 = layer.precision == "int8"
    if layer.precision != "float32" and not (int8 and mode == "LSTM"):
        raise ValueError(f"to_onnx: {layer.precision} {type(layer).__name__} has no ONNX node "
                         "(an int8 LSTM has ONNX Runtime's DynamicQuantizeLSTM); export the "
                         "float layer")
    if any(layer.zoneout):
        raise ValueError("to_onnx: ONNX's nodes have no zoneout (its eval form blends h)")
    op = NODE_OF_MODE[mode]
    G, H, L = _GATES[op], layer.hidden_size, layer.num_layers
    D = 2 if layer.bidirectional else 1
    elem = TensorProto.DOUBLE if layer.dtype == np.float64 else TensorProto.FLOAT
    params = layer.state_dict()
    inverse = np.argsort(_ORDER[op])  # ONNX's block j is our block inverse[j]

    def onnx_blocks(a):
        return np.concatenate([a[k * H:(k + 1) * H] for k in inverse])

    attributes = node_attributes(mode, H, layer.bidirectional, layer._onnx_options())
    initializers, nodes = [], []

    def constant(name, value):
        initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    constant("split_states", np.full(L, D, dtype=np.int64))
    state_names = ["h0", "c0"] if op == "LSTM" else ["h0"]
    per_layer_states = {}
    for s in state_names:
        parts = [f"{s}_layer{k}" for k in range(L)]
        if L > 1:
            nodes.append(helper.make_node("Split", [s, "split_states"], parts, axis=0))
        else:
            nodes.append(helper.make_node("Identity", [s], parts))
        per_layer_states[s] = parts

    shape_out = constant("shape_out", np.array([0, 0, -1], dtype=np.int64))
    x = "input"
    if layer.batch_first:  # (N, T, I) -> (T, N, I)
        nodes.append(helper.make_node("Transpose", ["input"], ["input_t"], perm=[1, 0, 2]))
        x = "input_t"
    outputs_h, outputs_c = [], []
    for k in range(L):
        suffixes = ["_l%d" % k + ("_reverse" if d else "") for d in range(D)]
        if int8:  # DynamicQuantizeLSTM's W (D, I, 4H), R (D, H, 4H): our rows as columns
            W = np.stack([onnx_blocks(params["weight_ih" + s]).T for s in suffixes])
            R = np.stack([onnx_blocks(params["weight_hh" + s]).T for s in suffixes])
        else:
            W = np.stack([onnx_blocks(params["weight_ih" + s]) for s in suffixes])
            R = np.stack([onnx_blocks(params["weight_hh" + s]) for s in suffixes])
        inputs = [x, constant(f"W{k}", W), constant(f"R{k}", R)]
        if layer.bias:
            B = np.stack([np.concatenate([onnx_blocks(params["bias_ih" + s]),
                                          onnx_blocks(params["bias_hh" + s])]) for s in suffixes])
            inputs.append(constant(f"B{k}", B))
        else:
            inputs.append("")
        inputs += ["lengths", per_layer_states["h0"][k]]
        if op == "LSTM":
            inputs.append(per_layer_states["c0"][k])
            if layer.peephole:
                P = np.stack([np.concatenate([params[f"weight_c{g}" + s] for g in "iof"])
                              for s in suffixes])
                inputs.append(constant(f"P{k}", P))
            elif int8:
                inputs.append("")
        if int8:  # per column scales (our per row ones), zero points 0: symmetric
            for name, slot in (("W", "weight_ih"), ("R", "weight_hh")):
                scale = np.stack([onnx_blocks(params[slot + s + "_scale"]) for s in suffixes])
                inputs += [constant(f"{name}{k}_scale", scale.astype(np.float32)),
                           constant(f"{name}{k}_zero_point", np.zeros(scale.shape, np.int8))]
        outs = [f"Y{k}", f"Y{k}_h"] + ([f"Y{k}_c"] if op == "LSTM" else [])
        if int8:
            nodes.append(helper.make_node("DynamicQuantizeLSTM", inputs, outs,
                                          name=f"lstm_l{k}_quant", domain="com.microsoft",
                                          **attributes))
        else:
            nodes.append(helper.make_node(op, inputs, outs, name=f"{op.lower()}_l{k}",
                                          **attributes))
        # Y (T, D, N, H) -> (T, N, D, H) -> (T, N, D*H)
        nodes.append(helper.make_node("Transpose", [f"Y{k}"], [f"Y{k}_t"], perm=[0, 2, 1, 3]))
        last = k == L - 1
        x = "output" if last and not layer.batch_first else f"layer{k}_out"
        nodes.append(helper.make_node("Reshape", [f"Y{k}_t", shape_out], [x]))
        for name, store in zip(outs[1:], (outputs_h, outputs_c)):
            store.append(name)
    if layer.batch_first:
        nodes.append(helper.make_node("Transpose", [x], ["output"], perm=[1, 0, 2]))
    nodes.append(helper.make_node("Concat", outputs_h, ["h_n"], axis=0))
    if op == "LSTM":
        nodes.append(helper.make_node("Concat", outputs_c, ["c_n"], axis=0))

    I = layer.input_size
    time_major = ["N", "T"] if layer.batch_first else ["T", "N"]
    graph_inputs = [helper.make_tensor_value_info("input", elem, time_major + [I]),
                    helper.make_tensor_value_info("lengths", TensorProto.INT32, ["N"])]
    graph_outputs = [helper.make_tensor_value_info("output", elem, time_major + [D * H])]
    for s, out in zip(state_names, ("h_n", "c_n")):
        graph_inputs.append(helper.make_tensor_value_info(s, elem, [L * D, "N", H]))
        graph_outputs.append(helper.make_tensor_value_info(out, elem, [L * D, "N", H]))
    graph = helper.make_graph(nodes, f"lstmfast_{mode.lower()}", graph_inputs, graph_outputs,
                              initializers)
    opsets = [helper.make_opsetid("", opset)]
    if int8:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="lstmfast")
    model.ir_version = 8
    onnx.checker.check_model(model)
    if path is not None:
        onnx.save(model, str(path))
    return model
