"""ONNX's options on lstmfast.torch's layers: ``activations`` (with ``activation_alpha`` and
``activation_beta``), ``clip``, ``input_forget`` and ``reverse``, as ``lstmfast.LSTM`` /
``GRU`` / ``RNN`` take them (docs/onnx.md). The fused call under autograd against the NumPy layer with the
same options (whose own oracle is ONNX Runtime: api/test_onnx_options.py), the loop of
torch ops that serves where the kernels cannot against the kernels, and the refusals."""

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import lstmfast  # noqa: E402
import lstmfast.torch as lt  # noqa: E402

from helpers import assert_close  # noqa: E402

# (class, constructor options): the sets the kernels compute (HardSigmoid gates, clip,
# input_forget) and some the reference computes (other activations).
CASES = [
    ("LSTM", dict(activations=["HardSigmoid", "Tanh", "Tanh"], clip=1.5)),
    ("LSTM", dict(input_forget=True, clip=2.0, num_layers=2, bidirectional=True)),
    ("LSTM", dict(activations=["Sigmoid", "Elu", "Softsign"], activation_alpha=[None, 0.7, None],
                  batch_first=True)),
    ("PeepholeLSTM", dict(activations=["HardSigmoid", "Tanh", "Tanh"],
                          activation_alpha=[0.25, None, None], activation_beta=[0.4, None, None],
                          input_forget=True)),
    ("GRU", dict(activations=["HardSigmoid", "Tanh"], clip=1.0, bidirectional=True)),
    ("GRU", dict(activations=["HardSigmoid", "Tanh"], linear_before_reset=False, num_layers=2)),
    ("GRU", dict(activations=["Sigmoid", "ScaledTanh"], activation_alpha=[None, 1.3],
                 activation_beta=[None, 0.6])),
    ("RNN", dict(activations=["LeakyRelu"], activation_alpha=[0.1], clip=3.0)),
    ("RNN", dict(nonlinearity="relu", clip=0.5, bidirectional=True)),
    ("RNN", dict(activations=["Softplus"])),
    ("RNN", dict(activations=["Affine"], activation_alpha=[0.5], activation_beta=[0.1])),
    ("GRU", dict(activations=["Sigmoid", "ThresholdedRelu"], activation_alpha=[None, 0.2])),
    # ONNX's direction="reverse": alone (torch's cells on the kernels), on a stack, with
    # the other options, on the reference's activations
    ("LSTM", dict(reverse=True)),
    ("GRU", dict(reverse=True, num_layers=2, batch_first=True)),
    ("RNN", dict(reverse=True, nonlinearity="relu", clip=2.0)),
    ("PeepholeLSTM", dict(reverse=True, activations=["HardSigmoid", "Tanh", "Tanh"])),
    ("GRU", dict(reverse=True, linear_before_reset=False, activations=["Sigmoid", "Softsign"])),
]
IDS = [f"{cls}-{'-'.join(sorted(o))}" for cls, o in CASES]

NUMPY_CLASS = {"LSTM": "LSTM", "PeepholeLSTM": "LSTM", "GRU": "GRU", "RNN": "RNN"}


def numpy_twin(module, cls, options, dtype):
    """lstmfast's NumPy layer of the same kind and options, the module's weights loaded."""
    kwargs = dict(num_layers=module.num_layers, bias=module.bias, batch_first=module.batch_first,
                  bidirectional=module.bidirectional, dtype=dtype)
    for name in ("activations", "activation_alpha", "activation_beta", "clip", "input_forget",
                 "reverse", "linear_before_reset", "nonlinearity"):
        if name in options:
            kwargs[name] = options[name]
    if cls == "PeepholeLSTM":
        kwargs["peephole"] = True
    layer = getattr(lstmfast, NUMPY_CLASS[cls])(module.input_size, module.hidden_size, **kwargs)
    layer.load_state_dict({k: v.detach().numpy() for k, v in module.state_dict().items()})
    return layer


def make(cls, options, dtype, seed=0):
    torch.manual_seed(seed)
    module_options = {k: v for k, v in options.items()}
    return getattr(lt, cls)(4, 6, **module_options).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls,options", CASES, ids=IDS)
def test_forward_and_gradients_match_the_numpy_layer(dtype, cls, options):
    module = make(cls, options, dtype)
    N, T = 3, 5
    D = 2 if module.bidirectional else 1
    x = torch.randn((N, T, 4) if module.batch_first else (T, N, 4), dtype=dtype,
                    requires_grad=True)
    h0 = torch.randn(module.num_layers * D, N, 6, dtype=dtype, requires_grad=True)
    lstm = module.mode == "LSTM"
    c0 = torch.randn(module.num_layers * D, N, 6, dtype=dtype, requires_grad=True)
    out, state = module(x, (h0, c0) if lstm else h0)
    h_n = state[0] if lstm else state
    grad_out, grad_h = torch.randn_like(out), torch.randn_like(h_n)
    loss = (out * grad_out).sum() + (h_n * grad_h).sum()
    grad_c = torch.randn_like(state[1]) if lstm else None
    if lstm:
        loss = loss + (state[1] * grad_c).sum()
    loss.backward()

    twin = numpy_twin(module, cls, options, "float32" if dtype == torch.float32 else "float64")
    twin.train()
    hx = (h0.detach().numpy(), c0.detach().numpy()) if lstm else h0.detach().numpy()
    expected, expected_state = twin(x.detach().numpy(), hx)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert_close(out.detach().numpy(), expected, tol=tol, name="output")
    if lstm:
        assert_close(state[0].detach().numpy(), expected_state[0], tol=tol, name="h_n")
        assert_close(state[1].detach().numpy(), expected_state[1], tol=tol, name="c_n")
        dx, (dh0, dc0) = twin.backward(grad_out.numpy(), (grad_h.numpy(), grad_c.numpy()))
        assert_close(c0.grad.numpy(), dc0, tol=tol, name="grad c0")
    else:
        assert_close(state.detach().numpy(), expected_state, tol=tol, name="h_n")
        dx, dh0 = twin.backward(grad_out.numpy(), grad_h.numpy())
    assert_close(x.grad.numpy(), dx, tol=tol, name="grad x")
    assert_close(h0.grad.numpy(), dh0, tol=tol, name="grad h0")
    for name, p in module.named_parameters():
        assert_close(p.grad.numpy(), twin.grad[name], tol=tol, name=f"grad {name}")


@pytest.mark.parametrize("cls,options", CASES, ids=IDS)
def test_inference_without_a_graph_matches_the_numpy_layer(cls, options):
    """The eval call with no gradient, which a plain layer sends down its short path."""
    module = make(cls, options, torch.float32, seed=1).eval()
    x = torch.randn((2, 7, 4) if module.batch_first else (7, 2, 4))
    with torch.no_grad():
        out, _ = module(x)
    twin = numpy_twin(module, cls, options, "float32").eval()
    expected, _ = twin(x.numpy())
    assert_close(out.numpy(), expected, name="output")


@pytest.mark.parametrize("cls,options", CASES, ids=IDS)
def test_the_torch_loop_computes_what_the_kernels_do(cls, options):
    """The loop of torch ops (CUDA, other dtypes, tracing, export, autocast, double
    backward) on the options, against the kernels, with lengths and an unbatched input."""
    module = make(cls, options, torch.float64, seed=2)
    x = torch.randn((3, 5, 4) if module.batch_first else (5, 3, 4), dtype=torch.float64)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 2, 4]),
                                                     batch_first=module.batch_first,
                                                     enforce_sorted=False)
    for given in (x, x[0] if module.batch_first else x[:, 0], packed):
        with torch.no_grad():
            fused = module(given)
            loop = module._torch_forward(given, None)
        a, b = ((fused[0].data, loop[0].data) if isinstance(given, type(packed))
                else (fused[0], loop[0]))
        assert_close(a.numpy(), b.numpy(), tol=1e-12, name="output")
        fused_h = fused[1][0] if module.mode == "LSTM" else fused[1]
        loop_h = loop[1][0] if module.mode == "LSTM" else loop[1]
        assert_close(fused_h.numpy(), loop_h.numpy(), tol=1e-12, name="h_n")


SOME = [0, 4, 7, 13]  # HardSigmoid LSTM with clip, GRU, LeakyRelu RNN, reverse GRU stack


@pytest.mark.parametrize("cls,options", [CASES[i] for i in SOME], ids=[IDS[i] for i in SOME])
def test_double_backward_differentiates_the_options(cls, options):
    """A second derivative goes through the loop of torch ops: its first derivative
    must be the kernels' (and so the NumPy layer's)."""
    module = make(cls, options, torch.float64, seed=3)
    x = torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=True)
    out, _ = module(x)
    (g,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    (g_kernels,) = torch.autograd.grad(module(x)[0].pow(2).sum(), x)
    assert_close(g.detach().numpy(), g_kernels.numpy(), tol=1e-10, name="first derivative")
    (gg,) = torch.autograd.grad(g.sum(), x)
    # the same second derivative from the loop alone, with torch's autograd throughout
    x2 = x.detach().requires_grad_(True)
    (g2,) = torch.autograd.grad(module._torch_forward(x2, None)[0].pow(2).sum(), x2,
                                create_graph=True)
    (gg2,) = torch.autograd.grad(g2.sum(), x2)
    assert_close(gg.numpy(), gg2.numpy(), tol=1e-10, name="second derivative")


def test_the_options_change_the_result():
    """Each option computes something else than torch's own layer on the same weights."""
    torch.manual_seed(4)
    x = torch.randn(6, 2, 4)
    for cls, options in CASES:
        module = make(cls, options, torch.float32, seed=5)
        plain = make(cls, {k: v for k, v in options.items()
                           if k in ("num_layers", "bidirectional", "batch_first",
                                    "linear_before_reset", "nonlinearity")}, torch.float32, seed=5)
        plain.load_state_dict(module.state_dict())
        with torch.no_grad():
            assert (module(x)[0] - plain(x)[0]).abs().max() > 1e-3, (cls, options)


def test_attributes_and_repr():
    module = lt.LSTM(3, 5, activations=["HardSigmoid", "Tanh", "Tanh"], clip=2, input_forget=True)
    assert module.activations == ("hardsigmoid", "tanh", "tanh")
    assert module.activation_alpha == (0.2, None, None)
    assert module.activation_beta == (0.5, None, None)
    assert module.clip == 2.0 and module.input_forget is True
    text = repr(module)
    assert "activations=('hardsigmoid', 'tanh', 'tanh')" in text
    assert "clip=2.0" in text and "input_forget=True" in text
    plain = lt.GRU(3, 5)
    assert plain.activations == ("sigmoid", "tanh") and plain.clip is None
    assert "activations" not in repr(plain)
    # torch's own activations given by name are no option at all
    assert lt.RNN(3, 5, activations=["Tanh"])._gate_options() == {}


@pytest.mark.parametrize("make_layer,message", [
    (lambda: lt.GRU(3, 4, input_forget=True), "input_forget: only an LSTM"),
    (lambda: lt.LSTM(3, 4, activations=["Sigmoid", "Tanh"]), "LSTM takes 3"),
    (lambda: lt.RNN(3, 4, activations=["Swish"]), "'Swish' is not one of"),
    (lambda: lt.LSTM(3, 4, clip=0), "clip must be None or a number > 0"),
    (lambda: lt.GRU(3, 4, activation_alpha=[0.1, None]), "given without activations"),
    (lambda: lt.RNN(3, 4, activations=["Tanh"], activation_alpha=[0.3]), "tanh takes none"),
    (lambda: lt.GRU(3, 4, activations=["HardSigmoid", "Tanh"], activation_beta=[0.1]),
     "activation_beta: expected one entry"),
    (lambda: lt.LSTM(3, 4, reverse=True, bidirectional=True), "reverse: a bidirectional layer"),
])
def test_bad_options_raise_value_errors_naming_them(make_layer, message):
    with pytest.raises(ValueError, match=message):
        make_layer()


def test_an_rnn_takes_relu_as_its_nonlinearity():
    """As lstmfast.RNN: activations=["Relu"] is nonlinearity="relu" (torch's own relu RNN,
    whose kernels then run); another activation must leave nonlinearity at "tanh"."""
    torch.manual_seed(10)
    module = lt.RNN(3, 4, activations=["Relu"])
    assert module.nonlinearity == "relu" and module.mode == "RNN_RELU"
    assert module._gate_options() == {} and module.activations == ("relu",)
    theirs = torch.nn.RNN(3, 4, nonlinearity="relu")
    theirs.load_state_dict(module.state_dict())
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        assert_close(module(x)[0].numpy(), theirs(x)[0].numpy(), name="output")
    for activations in (["Tanh"], ["LeakyRelu"]):
        with pytest.raises(ValueError, match="disagree"):
            lt.RNN(3, 4, nonlinearity="relu", activations=activations)


def test_the_variants_without_these_options_refuse_them():
    with pytest.raises(TypeError):
        lt.LayerNormLSTM(3, 4, clip=1.0)
    with pytest.raises(TypeError):
        lt.CTRNN(3, 4, activations=["Tanh"])
    with pytest.raises(ValueError, match="int8 layers take none"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's migration notes
        lt.QuantizedLSTM(3, 4, clip=1.0)
    with pytest.raises(ValueError, match="input_forget or reverse"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lt.QuantizedGRU(3, 4, reverse=True)
    with pytest.raises(TypeError, match="reverse should be of type bool"):
        lt.GRU(3, 4, reverse="yes")


def test_quantize_dynamic_leaves_such_a_layer_float():
    model = torch.nn.Sequential(lt.LSTM(3, 4, clip=1.0), lt.GRU(4, 4), lt.GRU(4, 4, reverse=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's migration notes
        quantized = lt.quantize_dynamic(model)
    assert type(quantized[0]) is lt.LSTM and quantized[0].clip == 1.0
    assert type(quantized[1]) is lt.QuantizedGRU
    assert type(quantized[2]) is lt.GRU and quantized[2].reverse


def test_scripting_refuses_and_restore_keeps_the_layer():
    module = lt.LSTM(3, 4, clip=1.0)
    with pytest.raises(TypeError, match="input_forget or reverse cannot be scripted"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script's own notice
        torch.jit.script(module)
    model = torch.nn.Sequential(module, lt.RNN(4, 4, reverse=True))
    lt.restore(model)
    assert type(model[0]) is lt.LSTM  # torch's LSTM would drop the clip
    assert type(model[1]) is lt.RNN  # and torch's RNN would run forwards
    plain = lt.GRU(3, 4)
    lt.restore(torch.nn.Sequential(plain))
    assert type(plain) is torch.nn.GRU


def test_trace_runs_the_loop():
    module = make("GRU", CASES[4][1], torch.float32, seed=6)
    x = torch.randn(5, 2, 4)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings on Python control flow
        traced = torch.jit.trace(module, (x,), check_trace=False)
        expected = module(x)[0]
        assert_close(traced(x)[0].numpy(), expected.numpy(), name="traced output")


@pytest.mark.parametrize("activations", [["HardSigmoid", "Tanh"], None])
def test_an_imported_onnx_layer_trains_in_torch(activations):
    """A node's options and weights carried from from_onnx's layer to a torch layer, as
    docs/torch.md shows it."""
    pytest.importorskip("onnx")
    source = lstmfast.GRU(4, 6, activations=activations,
                          activation_alpha=activations and [0.3, None], linear_before_reset=False,
                          clip=2.0, seed=7)
    (node,) = lstmfast.from_onnx(source.to_onnx()).values()
    gru = lt.GRU(node.input_size, node.hidden_size, activations=list(node.activations),
                 activation_alpha=list(node.activation_alpha),
                 activation_beta=list(node.activation_beta), clip=node.clip,
                 linear_before_reset=node.linear_before_reset)
    gru.load_state_dict({k: torch.from_numpy(v) for k, v in node.state_dict().items()})
    x = np.random.default_rng(8).standard_normal((5, 2, 4)).astype(np.float32)
    with torch.no_grad():
        out, _ = gru(torch.from_numpy(x))
    assert_close(out.numpy(), source(x)[0], name="output")


@pytest.mark.parametrize("dynamo", [False, True])
@pytest.mark.parametrize("cls,options", [CASES[i] for i in SOME], ids=[IDS[i] for i in SOME])
def test_export_runs_the_options_in_onnxruntime(cls, options, dynamo, tmp_path):
    """Both of torch's exporters write the loop's ops, which ONNX Runtime runs to the
    kernels' result."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    module = make(cls, options, torch.float32, seed=9).eval()
    x = torch.randn(6, 2, 4)
    path = tmp_path / "layer.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer warnings
        torch.onnx.export(module, (x,), str(path), dynamo=dynamo)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = module(x)[0]
    assert_close(got, expected.numpy(), name="onnxruntime on the exported layer")


NODE_OF = {"LSTM": "LSTM", "PeepholeLSTM": "LSTM", "GRU": "GRU", "RNN": "RNN"}


@pytest.mark.parametrize("dynamo", [False, True])
@pytest.mark.parametrize("cls,options", CASES, ids=IDS)
def test_export_writes_standard_nodes(cls, options, dynamo, tmp_path):
    """Both of torch's exporters write ONNX's node with the options as its attributes,
    one per layer, so that ONNX Runtime runs inputs of any length and batch (a loop of
    torch ops would be traced unrolled at the example's length)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    module = make(cls, options, torch.float32, seed=11).eval()
    lstm = module.mode == "LSTM"
    LD = module.num_layers * (2 if module.bidirectional else 1)

    def inputs(T, N, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((N, T, 4) if module.batch_first else (T, N, 4), generator=g)
        states = [torch.randn(LD, N, 6, generator=g) for _ in range(2 if lstm else 1)]
        return x, tuple(states) if lstm else states[0]

    state_names = ["h0", "c0"] if lstm else ["h0"]
    batch_axis, time_axis = (0, 1) if module.batch_first else (1, 0)
    axes = {"input": {time_axis: "T", batch_axis: "N"}, "output": {time_axis: "T", batch_axis: "N"}}
    axes.update({name: {1: "N"} for name in state_names + ["h_n", "c_n"][:len(state_names)]})
    path = tmp_path / "layer.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and batch-size warnings
        if dynamo:
            T, N = torch.export.Dim("T"), torch.export.Dim("N")
            states = ({1: N}, {1: N}) if lstm else {1: N}
            torch.onnx.export(module, inputs(5, 2, 0), str(path), dynamo=True,
                              dynamic_shapes=({time_axis: T, batch_axis: N}, states))
        else:
            torch.onnx.export(module, inputs(5, 2, 0), str(path), dynamo=False,
                              input_names=["input"] + state_names,
                              output_names=["output", "h_n", "c_n"][:1 + len(state_names)],
                              dynamic_axes=axes)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count(NODE_OF[cls]) == module.num_layers and "MatMul" not in ops, ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]  # input, then the states, in order
    for T, N, seed in ((5, 2, 1), (9, 3, 2), (1, 1, 3)):
        x, hx = inputs(T, N, seed)
        states = hx if lstm else (hx,)
        got = session.run(None, dict(zip(names, [x.numpy()] + [h.numpy() for h in states])))
        with torch.no_grad():
            out, state = module(x, hx)
        expected = [out] + (list(state) if lstm else [state])
        for name, a, b in zip(["output", "h_n", "c_n"], got, expected):
            assert_close(a, b.numpy(), name=f"{name} at T={T} N={N}")


@pytest.mark.parametrize("make_layer", [lambda: lt.CTRNN(4, 6, alpha=0.5),
                                        lambda: lt.LSTM(4, 6, zoneout=0.1, clip=1.0),
                                        lambda: lt.LSTM(4, 6, proj_size=3, reverse=True)],
                         ids=["CTRNN", "zoneout", "proj_size"])
def test_the_torchscript_exporter_warns_where_it_records_a_loop(make_layer, tmp_path):
    """What no standard node computes is recorded as the loop of torch ops, unrolled at
    the example's length: the exporter says so."""
    pytest.importorskip("onnx")
    module = make_layer().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(module, (torch.randn(5, 2, 4),), str(tmp_path / "layer.onnx"),
                          dynamo=False)
    assert any("unrolled at the example input's number of steps" in str(w.message)
               for w in caught), [str(w.message)[:80] for w in caught]


# --- lstmfast.torch.from_onnx -----------------------------------------------------------

EXPORTED_SETS = {"LSTM": [None, ["HardSigmoid", "Tanh", "Tanh"], ["Sigmoid", "Elu", "Tanh"]],
                 "GRU": [None, ["HardSigmoid", "Tanh"], ["Softsign", "Tanh"]],
                 "RNN": [None, ["Relu"], ["LeakyRelu"]]}


@st.composite
def onnx_node_cases(draw):
    op = draw(st.sampled_from(["LSTM", "GRU", "RNN"]))
    direction = draw(st.sampled_from(["forward", "reverse", "bidirectional"]))
    D = 2 if direction == "bidirectional" else 1
    attributes = {}
    activations = draw(st.sampled_from(EXPORTED_SETS[op]))
    if activations:
        attributes["activations"] = activations * D
    if op == "GRU":
        attributes["linear_before_reset"] = draw(st.sampled_from([0, 1]))
    if draw(st.booleans()):
        attributes["clip"] = draw(st.floats(0.2, 3.0).map(lambda v: round(v, 3)))
    if op == "LSTM" and draw(st.booleans()):
        attributes["input_forget"] = 1
    return dict(op=op, direction=direction, attributes=attributes,
                layout=draw(st.sampled_from([0, 1])), peepholes=op == "LSTM" and draw(st.booleans()),
                T=draw(st.integers(1, 5)), N=draw(st.integers(1, 3)), I=draw(st.integers(1, 4)),
                H=draw(st.integers(1, 6)), lengths=draw(st.booleans()), states=draw(st.booleans()),
                seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=onnx_node_cases())
def test_from_onnx_layers_compute_what_onnxruntime_computes(c):
    """lstmfast.torch.from_onnx's layer of a node against ONNX Runtime running the node:
    both layouts, lengths (a PackedSequence), initial states, every direction."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from helpers import random_weights, recurrent_model

    rng = np.random.default_rng(c["seed"])
    T, N, I, H = c["T"], c["N"], c["I"], c["H"]
    D = 2 if c["direction"] == "bidirectional" else 1
    arrays = random_weights(c["op"], I, H, D, rng, c["peepholes"])
    model = recurrent_model(c["op"], I, H, direction=c["direction"], layout=c["layout"],
                            arrays=arrays, **c["attributes"])
    (layer,) = lt.from_onnx(model).values()
    batch_first = c["layout"] == 1
    X = rng.standard_normal((N, T, I) if batch_first else (T, N, I)).astype(np.float32)
    lengths = rng.integers(1, T + 1, N).astype(np.int32) if c["lengths"] else np.full(N, T, np.int32)
    states = [rng.standard_normal((D, N, H)).astype(np.float32) if c["states"]
              else np.zeros((D, N, H), np.float32) for _ in range(2 if c["op"] == "LSTM" else 1)]
    # ONNX Runtime refuses layout=1, which only moves the batch axis first: the same node
    # with layout=0 on the time-major input, its outputs put batch first again.
    time_major = recurrent_model(c["op"], I, H, direction=c["direction"], arrays=arrays,
                                 **c["attributes"])
    feeds = {"X": X.transpose(1, 0, 2) if batch_first else X, "sequence_lens": lengths,
             **dict(zip(("initial_h", "initial_c"), states))}
    session = ort.InferenceSession(time_major.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    expected = [a for a, name in zip(session.run(None, feeds), ("Y", "Y_h", "Y_c"))]
    if batch_first:
        expected = [expected[0].transpose(2, 0, 1, 3)] + [a.transpose(1, 0, 2) for a in expected[1:]]
    # Unbounded activations (Elu, LeakyRelu) can make the state grow without bound, and
    # float32's rounding with it, in any two implementations: such runs are not compared.
    assume(all(np.all(np.abs(a) < 100) for a in expected))

    x = torch.from_numpy(X)
    if c["lengths"]:
        x = torch.nn.utils.rnn.pack_padded_sequence(x, torch.from_numpy(lengths).long(),
                                                    batch_first=batch_first, enforce_sorted=False)
    hx = [torch.from_numpy(s) for s in states]
    with torch.no_grad():
        out, state = layer(x, tuple(hx) if c["op"] == "LSTM" else hx[0])
    if c["lengths"]:
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=batch_first,
                                                        total_length=T)
    out = out.numpy()
    Y = (out.reshape(N, T, D, H) if batch_first
         else out.reshape(T, N, D, H).transpose(0, 2, 1, 3))
    assert_close(Y, expected[0], name="Y")
    finals = state if c["op"] == "LSTM" else (state,)
    for got, want, name in zip(finals, expected[1:], ("Y_h", "Y_c")):
        got = got.numpy()
        assert_close(got.transpose(1, 0, 2) if batch_first else got, want, name=name)


def test_from_onnx_refuses_what_a_torch_layer_cannot_hold(tmp_path):
    pytest.importorskip("onnx")
    from helpers import recurrent_model

    model = recurrent_model("GRU", 3, 4, direction="reverse", rng=np.random.default_rng(0),
                            name="backwards")
    int8 = lstmfast.quantize(lstmfast.LSTM(3, 4), "int8")
    with pytest.raises(ValueError, match="DynamicQuantizeLSTM holds int8 weights"):
        lt.from_onnx(int8.to_onnx())
    with pytest.raises(TypeError, match="dtype must be torch.float32 or torch.float64"):
        lt.from_onnx(model, dtype=torch.float16)


def test_from_onnx_gives_float64_layers_that_train():
    pytest.importorskip("onnx")
    from helpers import recurrent_model

    model = recurrent_model("LSTM", 3, 4, rng=np.random.default_rng(1), peepholes=True,
                            activations=["HardSigmoid", "Tanh", "Tanh"], clip=1.5)
    (layer,) = lt.from_onnx(model, dtype=torch.float64).values()
    assert type(layer) is lt.PeepholeLSTM and not layer.training
    assert layer.weight_ih_l0.dtype == torch.float64 and layer.clip == 1.5
    (numpy_layer,) = lstmfast.from_onnx(model, dtype="float64").values()
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    layer.train()
    out, _ = layer(x)
    out.sum().backward()
    numpy_layer.train()
    expected, _ = numpy_layer(x.detach().numpy())
    assert_close(out.detach().numpy(), expected, name="output")
    dx = numpy_layer.backward(np.ones_like(expected))[0]
    assert_close(x.grad.numpy(), dx, name="grad x")
    for name, p in layer.named_parameters():
        assert_close(p.grad.numpy(), numpy_layer.grad[name], name=f"grad {name}")
