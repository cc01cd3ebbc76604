"""lstmfast.from_onnx and run_onnx_node: every LSTM, GRU and RNN node of a model as a
layer, against ONNX Runtime running the same node (the oracle), on random attribute
combinations; and the attributes lstmfast refuses, each by name."""

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import lstmfast

from helpers import assert_close, random_weights, recurrent_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import helper, numpy_helper  # noqa: E402

def onnxruntime_run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


# ONNX Runtime's activations: name, and whether it reads alpha, beta. Exporters emit
# the first rows; every one is drawn.
ACTIVATIONS = [("Sigmoid", False, False), ("Tanh", False, False), ("Relu", False, False),
               ("HardSigmoid", True, True), ("Affine", True, True), ("LeakyRelu", True, False),
               ("ThresholdedRelu", True, False), ("ScaledTanh", True, True),
               ("Elu", True, False), ("Softsign", False, False), ("Softplus", False, False)]
ROLES = {"LSTM": 3, "GRU": 2, "RNN": 1}


@st.composite
def activation_attributes(draw, op, D):
    """activations for each direction (the same set: a layer has one), and alpha and
    beta lists that may run out before the activations that read them do."""
    chosen = [draw(st.sampled_from(ACTIVATIONS)) for _ in range(ROLES[op])] * D
    attributes = {"activations": [name for name, _, _ in chosen]}
    number = st.floats(0.05, 1.5, allow_nan=False).map(lambda v: round(v, 3))
    for key, index in (("activation_alpha", 1), ("activation_beta", 2)):
        readers = sum(entry[index] for entry in chosen[:ROLES[op]])  # in one direction
        # One direction's list may stop short (ONNX Runtime's defaults take over); a
        # bidirectional node's gives every value twice, as a short one would make the
        # directions differ (refused: test_directions_with_different_activations_are_refused).
        size = st.integers(0, readers) if D == 1 else st.sampled_from([0, readers])
        count = draw(size)
        values = draw(st.lists(number, min_size=count, max_size=count))
        if values:
            attributes[key] = values * D
    return attributes


@st.composite
def node_cases(draw):
    op = draw(st.sampled_from(["LSTM", "GRU", "RNN"]))
    attributes = {}
    if op == "GRU":
        attributes["linear_before_reset"] = draw(st.sampled_from([0, 1]))
    direction = draw(st.sampled_from(["forward", "reverse", "bidirectional"]))
    D = 2 if direction == "bidirectional" else 1
    kind = draw(st.sampled_from(["default", "relu", "exported", "any"]))
    if kind == "relu" and op == "RNN":
        attributes["activations"] = ["Relu"] * D
    elif kind == "exported" and op == "LSTM":  # older Keras through tf2onnx
        attributes["activations"] = ["HardSigmoid", "Tanh", "Tanh"] * D
    elif kind == "any":
        attributes.update(draw(activation_attributes(op, D)))
    if draw(st.booleans()):
        attributes["clip"] = draw(st.floats(0.1, 3.0).map(lambda v: round(v, 3)))
    if op == "LSTM" and draw(st.booleans()):
        attributes["input_forget"] = 1
    return dict(op=op, direction=direction, layout=draw(st.sampled_from([0, 1])),
                attributes=attributes, T=draw(st.integers(1, 6)), N=draw(st.integers(1, 4)),
                I=draw(st.integers(1, 5)), H=draw(st.integers(1, 9)),
                lengths=draw(st.booleans()), states=draw(st.booleans()),
                peepholes=op == "LSTM" and draw(st.booleans()), bias=draw(st.booleans()),
                seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=node_cases())
def test_nodes_compute_what_onnxruntime_computes(c):
    rng = np.random.default_rng(c["seed"])
    T, N, I, H = c["T"], c["N"], c["I"], c["H"]
    D = 2 if c["direction"] == "bidirectional" else 1
    arrays = random_weights(c["op"], I, H, D, rng, c["peepholes"], c["bias"])
    model = recurrent_model(c["op"], I, H, direction=c["direction"], layout=c["layout"],
                            arrays=arrays, **c["attributes"])
    X = rng.standard_normal((N, T, I) if c["layout"] else (T, N, I)).astype(np.float32)
    lengths = rng.integers(1, T + 1, N).astype(np.int32) if c["lengths"] else np.full(N, T, np.int32)
    state_shape = (N, D, H) if c["layout"] else (D, N, H)
    initial = {k: (rng.standard_normal(state_shape) if c["states"] else np.zeros(state_shape))
               .astype(np.float32) for k in ("initial_h", "initial_c")}
    if c["layout"]:
        # ONNX Runtime refuses layout=1, which only moves the batch axis first: the
        # same node with layout=0 on the transposed inputs, its outputs transposed back.
        time_major = recurrent_model(c["op"], I, H, direction=c["direction"], layout=0,
                                     arrays=arrays, **c["attributes"])
        states = {k: v.transpose(1, 0, 2) for k, v in initial.items()}
        Y, *Y_states = onnxruntime_run(time_major, {"X": X.transpose(1, 0, 2),
                                                    "sequence_lens": lengths, **states})
        theirs = [Y.transpose(2, 0, 1, 3)] + [s.transpose(1, 0, 2) for s in Y_states]
    else:
        theirs = onnxruntime_run(model, {"X": X, "sequence_lens": lengths, **initial})
    # Unbounded activations in a gate (a GRU's z = Softplus(..) > 1) can make the state
    # grow without bound: float32's rounding then grows with it, in any two
    # implementations, past 1e-5 of the largest value. Such runs are not compared.
    assume(all(np.all(np.abs(a) < 100) for a in theirs))
    for backend in ("fused", "numpy"):
        (name, layer), = lstmfast.from_onnx(model, backend=backend).items()
        assert name == "rnn" and layer.batch_first == bool(c["layout"])
        ours = lstmfast.run_onnx_node(layer, X, lengths if c["lengths"] else None,
                                      initial["initial_h"] if c["states"] else None,
                                      initial["initial_c"] if c["states"] else None)
        assert len(ours) == len(theirs)
        for label, a, b in zip(("Y", "Y_h", "Y_c"), ours, theirs):
            assert_close(a, b, tol=1e-5, name=f"{backend} {label} ({c})")


def test_every_recurrent_node_of_a_model_and_their_names(tmp_path):
    rng = np.random.default_rng(0)
    lstm = recurrent_model("LSTM", 3, 4, rng=rng, name="")
    gru = recurrent_model("GRU", 3, 5, rng=rng, name="encoder_gru")
    graph = lstm.graph
    node = gru.graph.node[0]
    renamed = {n: "gru_" + n for n in ("W", "R", "B")}
    for t in gru.graph.initializer:
        t.name = renamed[t.name]
        graph.initializer.append(t)
    node.input[1:4] = [renamed["W"], renamed["R"], renamed["B"]]
    node.output[:] = ["Y2", "Y2_h"]
    graph.node.append(node)
    path = tmp_path / "two.onnx"
    onnx.save(lstm, str(path))
    layers = lstmfast.from_onnx(str(path))
    assert list(layers) == ["LSTM_0", "encoder_gru"]
    assert isinstance(layers["LSTM_0"], lstmfast.LSTM) and not layers["LSTM_0"].training
    assert isinstance(layers["encoder_gru"], lstmfast.GRU)
    assert layers["encoder_gru"].linear_before_reset is False  # ONNX's default linear_before_reset=0


@pytest.mark.parametrize("op, attributes, message", [
    ("GRU", dict(direction="sideways"),
     "direction='sideways': expected 'forward', 'reverse' or 'bidirectional'"),
    ("GRU", dict(activations=["HardSigmoid", "Gelu"]), "activations: 'Gelu' is not one of ONNX's"),
    ("RNN", dict(activations=["Sigmoid", "Tanh"]),
     "activations=\\['Sigmoid', 'Tanh'\\]: a RNN of 1 direction\\(s\\) takes 1"),
    ("LSTM", dict(direction="bidirectional",
                  activations=["Sigmoid", "Tanh", "Tanh", "HardSigmoid", "Tanh", "Tanh"]),
     ".*the two directions differ"),
    ("LSTM", dict(direction="bidirectional", activations=["HardSigmoid", "Tanh", "Tanh"] * 2,
                  activation_alpha=[0.1, 0.3]),
     ".*the two directions differ"),
    ("LSTM", dict(clip=-1.0), "clip=-1.0: expected a number > 0"),
    ("LSTM", dict(input_forget=2), "input_forget=2: expected 0 or 1"),
    ("GRU", dict(layout=2), "layout=2: expected 0 or 1"),
])
def test_what_cannot_be_honoured_is_refused_by_name(op, attributes, message):
    rng = np.random.default_rng(1)
    direction = attributes.pop("direction", "forward")
    model = recurrent_model(op, 2, 3, rng=rng, direction=direction, name="node7", **attributes)
    with pytest.raises(ValueError, match=f"from_onnx: node 'node7': {message}"):
        lstmfast.from_onnx(model)


def test_weights_that_are_not_initializers_are_refused():
    node = helper.make_node("GRU", ["X", "W", "R"], ["Y"], hidden_size=2, name="g")
    graph = helper.make_graph([node], "g", [], [])
    with pytest.raises(ValueError, match=r"node 'g': W \('W'\) must be an initializer"):
        lstmfast.from_onnx(graph)
    with pytest.raises(TypeError, match="from_onnx: expected an onnx ModelProto"):
        lstmfast.from_onnx(42)


# ------------------------------------------------------------------------------------------
# export: layer.to_onnx, run by ONNX Runtime, and read back by from_onnx


@pytest.mark.parametrize("kind, options", [
    ("LSTM", dict()),
    ("LSTM", dict(num_layers=2, bidirectional=True, peephole=True)),
    ("GRU", dict(num_layers=3, batch_first=True)),
    ("GRU", dict(linear_before_reset=False, bidirectional=True, bias=False)),
    ("RNN", dict(nonlinearity="relu", num_layers=2, batch_first=True, bidirectional=True)),
    ("RNN", dict(dtype="float64")),
    ("LSTM", dict(dtype="float64", bidirectional=True)),
    # ONNX's options (the reference computes all but reverse; onnx.reference ignores
    # them, so float32 only)
    ("LSTM", dict(activations=["HardSigmoid", "Tanh", "Softsign"], activation_alpha=[0.3, None, None],
                  clip=0.9, input_forget=True, reverse=True, peephole=True)),
    ("GRU", dict(activations=["Sigmoid", ("Elu")], activation_alpha=[None, 0.7], clip=1.5,
                 bidirectional=True)),
    ("GRU", dict(reverse=True, num_layers=2, linear_before_reset=False)),
    ("RNN", dict(activations=["LeakyRelu"], activation_alpha=[0.2], reverse=True)),
])
def test_to_onnx_round_trips_through_onnxruntime(kind, options, tmp_path):
    layer = getattr(lstmfast, kind)(4, 5, seed=2, **options).eval()
    path = tmp_path / "layer.onnx"
    model = layer.to_onnx(path)
    rng = np.random.default_rng(3)
    N, T = 3, 6
    dtype = layer.dtype
    x = rng.standard_normal((N, T, 4) if layer.batch_first else (T, N, 4)).astype(dtype)
    D = 2 if layer.bidirectional else 1
    h0 = rng.standard_normal((layer.num_layers * D, N, 5)).astype(dtype)
    c0 = rng.standard_normal(h0.shape).astype(dtype)
    # ONNX Runtime's recurrent nodes are float32: float64 runs on onnx.reference, which
    # ignores sequence_lens (full lengths then).
    lengths = np.array([6, 2, 4]) if dtype == np.float32 else np.full(N, T)
    hx = (h0, c0) if kind == "LSTM" else h0
    output, state = layer(x, hx, lengths=lengths)
    feeds = {"input": x, "lengths": lengths.astype(np.int32), "h0": h0, "c0": c0}
    if dtype == np.float32:
        theirs = onnxruntime_run(onnx.load(str(path)), feeds)
    else:
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(onnx.load(str(path)))
        theirs = evaluator.run(None, {k: v for k, v in feeds.items() if k in evaluator.input_names})
    tol = 1e-5 if dtype == np.float32 else 1e-10
    ours = [output] + (list(state) if kind == "LSTM" else [state])
    for label, a, b in zip(("output", "h_n", "c_n"), ours, theirs):
        assert_close(a, b, tol=tol, name=f"onnxruntime {label}")
    if layer.num_layers == 1:  # one node: from_onnx gives the layer back
        (back,) = lstmfast.from_onnx(model, dtype=layer.dtype.name).values()
        for name, value in layer.state_dict().items():
            assert_close(back.state_dict()[name], value, tol=tol, name=name)
        for option in ("activations", "input_forget", "reverse", "bidirectional"):
            assert getattr(back, option) == getattr(layer, option), option
        # ONNX keeps the float attributes in float32
        as_float32 = np.vectorize(lambda v: np.nan if v is None else np.float32(v))
        for option in ("activation_alpha", "activation_beta", "clip"):
            np.testing.assert_array_equal(as_float32(getattr(back, option)),
                                          as_float32(getattr(layer, option)), err_msg=option)


def test_to_onnx_refuses_what_the_nodes_do_not_compute():
    with pytest.raises(ValueError, match="to_onnx: ONNX's LSTM has no projection"):
        lstmfast.LSTM(4, 5, proj_size=2).to_onnx()
    with pytest.raises(ValueError, match="to_onnx: ONNX's nodes have no zoneout"):
        lstmfast.GRU(4, 5, zoneout=0.1).to_onnx()
    with pytest.raises(ValueError, match="to_onnx: CTRNN has no standard ONNX node"):
        lstmfast.CTRNN(4, 5).to_onnx()
    with pytest.raises(ValueError, match="to_onnx: int8 GRU has no ONNX node"):
        lstmfast.quantize(lstmfast.GRU(4, 5), "int8").to_onnx()
    with pytest.raises(ValueError, match="to_onnx: bfloat16 LSTM has no ONNX node"):
        lstmfast.quantize(lstmfast.LSTM(4, 5), "bfloat16").to_onnx()


# ------------------------------------------------------------------------------------------
# int8: ONNX Runtime's DynamicQuantizeLSTM both ways


def quantize_dynamic(model, tmp_path):
    """ONNX Runtime's quantize_dynamic of ``model`` (7-bit weights, as it advises on
    CPUs without VNNI), loaded back."""
    import logging

    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    onnx.save(model, str(tmp_path / "float.onnx"))
    logging.disable(logging.WARNING)  # its advice to pre-process the model
    try:
        ort_quantize_dynamic(str(tmp_path / "float.onnx"), str(tmp_path / "int8.onnx"),
                             reduce_range=True)
    finally:
        logging.disable(logging.NOTSET)
    return onnx.load(str(tmp_path / "int8.onnx"))


def int8_weights(model):
    """Each DynamicQuantizeLSTM's W and R as dequantized (D, 4H, K) float arrays."""
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = []
    for node in model.graph.node:
        if node.op_type == "DynamicQuantizeLSTM":
            inputs = list(node.input)
            for q, scale, zero in ((1, 8, 9), (2, 10, 11)):
                D, _, GH = arrays[inputs[q]].shape
                scale_ = np.broadcast_to(arrays[inputs[scale]].reshape(D, -1), (D, GH))
                zero_ = np.broadcast_to(arrays[inputs[zero]].reshape(D, -1), (D, GH))
                weights.append((arrays[inputs[q]].astype(np.float64) - zero_[:, None, :])
                               * scale_[:, None, :])
    return [w.transpose(0, 2, 1) for w in weights]


@pytest.mark.parametrize("direction, attributes, peepholes", [
    ("forward", {}, False),
    ("bidirectional", {}, False),
    ("reverse", {}, True),
    ("forward", {"activations": ["HardSigmoid", "Tanh", "Tanh"], "clip": 2.0,
                 "input_forget": 1}, False),
])
def test_dynamic_quantize_lstm_nodes_are_int8_layers_of_their_integers(
        direction, attributes, peepholes, tmp_path):
    rng = np.random.default_rng(4)
    I, H, T, N = 7, 6, 5, 3
    model = recurrent_model("LSTM", I, H, rng=rng, direction=direction, peepholes=peepholes,
                            name="lstm", **attributes)
    int8_model = quantize_dynamic(model, tmp_path)
    assert [n.op_type for n in int8_model.graph.node] == ["DynamicQuantizeLSTM"]
    (name, layer), = lstmfast.from_onnx(int8_model).items()
    assert layer.precision == "int8" and layer._kernels_compute()
    # the node's own integers and scales: lstmfast's weights dequantize to ONNX Runtime's
    D = 2 if direction == "bidirectional" else 1
    state = layer.state_dict()
    theirs = int8_weights(int8_model)
    order = [0, 2, 3, 1]  # our block j is ONNX's block order[j]
    for name, W in zip(("weight_ih", "weight_hh"), theirs):
        for d in range(D):
            key = f"{name}_l0" + ("_reverse" if d else "")
            ours = state[key].astype(np.float64) * state[key + "_scale"][:, None]
            expected = np.concatenate([W[d][k * H:(k + 1) * H] for k in order])
            assert_close(ours, expected, tol=1e-6, name=key)
    X = rng.standard_normal((T, N, I)).astype(np.float32)
    lengths = np.array([5, 2, 4], np.int32)
    feeds = {"X": X, "sequence_lens": lengths,
             "initial_h": np.zeros((D, N, H), np.float32), "initial_c": np.zeros((D, N, H), np.float32)}
    theirs = onnxruntime_run(int8_model, feeds)
    ours = lstmfast.run_onnx_node(layer, X, lengths)
    # The kernels compute lstmfast's int8 contract exactly (its reference is the judge,
    # tests/kernels/test_quantize.py); ONNX Runtime quantizes the activations its own way
    # (per tensor, 8 bits), so the two int8 results differ by about one step of those.
    for label, a, b in zip(("Y", "Y_h", "Y_c"), ours, theirs):
        assert_close(a, b, tol=2e-2, name=f"{label} against ONNX Runtime's int8")
    float_ours = lstmfast.run_onnx_node(lstmfast.from_onnx(model)["lstm"], X, lengths)
    for label, a, b in zip(("Y", "Y_h", "Y_c"), ours, float_ours):
        assert_close(a, b, tol=2e-2, name=f"{label} against the float node")


@pytest.mark.parametrize("options", [dict(), dict(bidirectional=True, num_layers=2),
                                     dict(peephole=True, reverse=True, batch_first=True)])
def test_int8_layers_export_to_dynamic_quantize_lstm(options, tmp_path):
    float_layer = lstmfast.LSTM(5, 4, seed=6, **options).eval()
    layer = lstmfast.quantize(float_layer, "int8")
    path = tmp_path / "int8.onnx"
    model = layer.to_onnx(path)
    assert {n.op_type for n in model.graph.node} >= {"DynamicQuantizeLSTM"}
    rng = np.random.default_rng(7)
    N, T, L, D = 3, 6, layer.num_layers, 2 if layer.bidirectional else 1
    x = rng.standard_normal((N, T, 5) if layer.batch_first else (T, N, 5)).astype(np.float32)
    h0 = rng.standard_normal((L * D, N, 4)).astype(np.float32)
    c0 = rng.standard_normal((L * D, N, 4)).astype(np.float32)
    lengths = np.array([6, 2, 4])
    output, (h_n, c_n) = layer(x, (h0, c0), lengths=lengths)
    theirs = onnxruntime_run(onnx.load(str(path)), {"input": x, "lengths": lengths.astype(np.int32),
                                                    "h0": h0, "c0": c0})
    for label, a, b in zip(("output", "h_n", "c_n"), (output, h_n, c_n), theirs):
        assert_close(a, b, tol=2e-2, name=f"onnxruntime {label}")
    if L == 1:  # one node: from_onnx gives the same integers and scales back
        (back,) = lstmfast.from_onnx(model).values()
        assert back.precision == "int8"
        for name, value in layer.state_dict().items():
            np.testing.assert_array_equal(back.state_dict()[name], value, err_msg=name)


def test_dynamic_quantize_lstm_without_scales_is_refused():
    node = helper.make_node("DynamicQuantizeLSTM", ["X", "W", "R"], ["Y"], hidden_size=2,
                            name="q", domain="com.microsoft")
    graph = helper.make_graph([node], "g", [], [], [
        numpy_helper.from_array(np.zeros((1, 3, 8), np.int8), "W"),
        numpy_helper.from_array(np.zeros((1, 2, 8), np.int8), "R")])
    with pytest.raises(ValueError, match="node 'q': W and W_scale are needed"):
        lstmfast.from_onnx(graph)
    with pytest.raises(ValueError, match="node 'q': a DynamicQuantizeLSTM gives an int8 layer, "
                                         "whose dtype is float32, not float64"):
        lstmfast.from_onnx(graph, dtype="float64")
