"""The reference's peephole LSTM (docs/cells.md, Peephole LSTM) against independent oracles.

Forward: an ONNX `LSTM` node with its peephole input P, run by ONNX Runtime
(float32, with sequence lengths) and by onnx.reference (float64). Gradients: a
loop over torch ops differentiated by autograd (ONNX Runtime's training kernel
truncates the peephole gradient, so it cannot serve). Finite differences are in
test_reference.py.
"""

import numpy as np
import pytest

from lstmfast import reference

from helpers import assert_close, make_problem, run_backward, run_forward

SUFFIXES = ("", "_reverse")


def onnx_lstm(params, I, H, bidirectional, dtype):
    """One ONNX LSTM node with peepholes holding the reference's parameters.

    ONNX orders the gates i, o, f, c (torch: i, f, g, o) and the peepholes i, o, f."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    D = 2 if bidirectional else 1
    torch_to_onnx = [0, 3, 1, 2]  # ONNX block j holds torch's block torch_to_onnx[j]

    def reorder(a):
        return np.concatenate([a[k * H:(k + 1) * H] for k in torch_to_onnx])

    W = np.stack([reorder(params[f"weight_ih_l0{s}"]) for s in SUFFIXES[:D]])
    R = np.stack([reorder(params[f"weight_hh_l0{s}"]) for s in SUFFIXES[:D]])
    B = np.stack([np.concatenate([reorder(params[f"bias_ih_l0{s}"]), reorder(params[f"bias_hh_l0{s}"])])
                  for s in SUFFIXES[:D]])
    P = np.stack([np.concatenate([params[f"weight_c{g}_l0{s}"] for g in "iof"]) for s in SUFFIXES[:D]])
    elem = TensorProto.DOUBLE if dtype == np.float64 else TensorProto.FLOAT
    initializers = [numpy_helper.from_array(a.astype(dtype), name)
                    for name, a in (("W", W), ("R", R), ("B", B), ("P", P))]
    node = helper.make_node("LSTM", ["X", "W", "R", "B", "lengths", "h0", "c0", "P"],
                            ["Y", "Y_h", "Y_c"], hidden_size=H,
                            direction="bidirectional" if bidirectional else "forward")
    graph = helper.make_graph(
        [node], "peephole_lstm",
        [helper.make_tensor_value_info("X", elem, ["T", "N", I]),
         helper.make_tensor_value_info("lengths", TensorProto.INT32, ["N"]),
         helper.make_tensor_value_info("h0", elem, [D, "N", H]),
         helper.make_tensor_value_info("c0", elem, [D, "N", H])],
        [helper.make_tensor_value_info("Y", elem, ["T", D, "N", H]),
         helper.make_tensor_value_info("Y_h", elem, [D, "N", H]),
         helper.make_tensor_value_info("Y_c", elem, [D, "N", H])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def onnx_outputs(Y, Y_h, Y_c):
    """ONNX's Y [T, D, N, H] as the reference's output [T, N, D*H]."""
    T, D, N, H = Y.shape
    return Y.transpose(0, 2, 1, 3).reshape(T, N, D * H), Y_h, Y_c


def onnxruntime_outputs(model, p):
    """The model run by ONNX Runtime on problem p (all T steps when p has no lengths)."""
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    T, N = p["x"].shape[:2]
    lengths = np.full(N, T) if p["lengths"] is None else p["lengths"]
    return onnx_outputs(*session.run(None, {
        "X": p["x"], "lengths": lengths.astype(np.int32), "h0": p["h0"], "c0": p["c0"]}))


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_forward_matches_onnxruntime(bidirectional, with_lengths):
    T, N, I, H = 6, 3, 5, 4
    p = make_problem("LSTM", T=T, N=N, I=I, H=H, bidirectional=bidirectional, peephole=True,
                     lengths=[4, 6, 2] if with_lengths else None, dtype=np.float32, seed=3)
    theirs = onnxruntime_outputs(onnx_lstm(p["params"], I, H, bidirectional, np.float32), p)
    ours = run_forward(p)[:3]
    for name, a, b in zip(("output", "h_n", "c_n"), ours, theirs):
        assert_close(a, b, tol=1e-5, name=name)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_forward_matches_onnx_reference_in_float64(bidirectional):
    pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    T, N, I, H = 5, 2, 3, 4
    p = make_problem("LSTM", T=T, N=N, I=I, H=H, bidirectional=bidirectional, peephole=True,
                     seed=4)
    model = onnx_lstm(p["params"], I, H, bidirectional, np.float64)
    # onnx.reference ignores sequence_lens (docs/cells.md): full lengths only.
    theirs = onnx_outputs(*ReferenceEvaluator(model).run(None, {
        "X": p["x"], "lengths": np.full(N, T, np.int32), "h0": p["h0"], "c0": p["c0"]}))
    for name, a, b in zip(("output", "h_n", "c_n"), run_forward(p)[:3], theirs):
        assert_close(a, b, tol=1e-10, name=name)


def test_gradients_match_a_torch_autograd_loop():
    torch = pytest.importorskip("torch")
    T, N, I, H = 4, 3, 3, 5
    p = make_problem("LSTM", T=T, N=N, I=I, H=H, peephole=True, lengths=[3, 4, 1], seed=5)
    params = {k: torch.tensor(v, requires_grad=True) for k, v in p["params"].items()}
    x = torch.tensor(p["x"], requires_grad=True)
    h = torch.tensor(p["h0"][0], requires_grad=True)
    c = torch.tensor(p["c0"][0], requires_grad=True)
    h0, c0 = h, c
    lengths = torch.tensor(p["lengths"])
    outputs = []
    for t in range(T):
        a = (x[t] @ params["weight_ih_l0"].T + params["bias_ih_l0"]
             + h @ params["weight_hh_l0"].T + params["bias_hh_l0"])
        a_i, a_f, a_g, a_o = a.split(H, dim=1)
        i = torch.sigmoid(a_i + params["weight_ci_l0"] * c)
        f = torch.sigmoid(a_f + params["weight_cf_l0"] * c)
        c_new = f * c + i * torch.tanh(a_g)
        o = torch.sigmoid(a_o + params["weight_co_l0"] * c_new)
        h_new = o * torch.tanh(c_new)
        running = (t < lengths)[:, None]
        outputs.append(torch.where(running, h_new, torch.zeros_like(h_new)))
        h = torch.where(running, h_new, h)
        c = torch.where(running, c_new, c)
    value = ((torch.stack(outputs) * torch.tensor(p["R1"])).sum() + (h * torch.tensor(p["R2"][0])).sum()
             + (c * torch.tensor(p["R3"][0])).sum())
    value.backward()
    dx, dh0, dc0, grads = run_backward(p)
    expected = {"x": (dx, x.grad), "h0": (dh0[0], h0.grad), "c0": (dc0[0], c0.grad)}
    expected.update({f"d{k}": (grads[k], params[k].grad) for k in params})
    for name, (ours, theirs) in expected.items():
        theirs = theirs.numpy()
        assert_close(ours, theirs, tol=1e-10, name=name)
    assert reference.param_shapes("LSTM", I, H, 1, True, False, 0, peephole=True)["weight_co_l0"] == (H,)


@pytest.mark.parametrize("peephole", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_from_onnx_lstm_computes_what_onnxruntime_computes(peephole, bidirectional):
    import lstmfast

    T, N, I, H = 6, 3, 5, 4
    p = make_problem("LSTM", T=T, N=N, I=I, H=H, bidirectional=bidirectional, peephole=True,
                     lengths=[4, 6, 2], dtype=np.float32, seed=6)
    model = onnx_lstm(p["params"], I, H, bidirectional, np.float32)
    if not peephole:  # the same node without its P input
        model.graph.node[0].input[7] = ""
        model.graph.initializer.pop()
    theirs = onnxruntime_outputs(model, p)
    for backend in ("fused", "numpy"):
        layer = lstmfast.from_onnx_lstm(model, backend=backend).eval()
        assert layer.peephole == peephole and layer.bidirectional == bidirectional
        out, (h_n, c_n) = layer(p["x"], (p["h0"], p["c0"]), lengths=p["lengths"])
        for name, a, b in zip(("output", "h_n", "c_n"), (out, h_n, c_n), theirs):
            assert_close(a, b, tol=1e-5, name=f"{backend} {name}")


def test_from_onnx_lstm_refuses_what_it_cannot_honour():
    import lstmfast
    from onnx import helper

    p = make_problem("LSTM", I=3, H=2, peephole=True, dtype=np.float32)
    model = onnx_lstm(p["params"], 3, 2, False, np.float32)
    model.graph.node[0].attribute.append(helper.make_attribute("clip", 3.0))
    assert lstmfast.from_onnx_lstm(model).clip == 3.0  # honoured (docs/onnx.md)
    model.graph.node[0].attribute.append(helper.make_attribute("activations", ["Gelu"] * 3))
    with pytest.raises(ValueError, match="activations: 'Gelu' is not one of ONNX's"):
        lstmfast.from_onnx_lstm(model)
    node = helper.make_node("LSTM", ["X", "W", "R"], ["Y"], hidden_size=2, direction="sideways")
    with pytest.raises(ValueError, match="direction='sideways'"):
        lstmfast.from_onnx_lstm(node, {"W": np.zeros((1, 8, 3)), "R": np.zeros((1, 8, 2))})
    with pytest.raises(TypeError, match="expected an onnx ModelProto"):
        lstmfast.from_onnx_lstm("model.onnx")
