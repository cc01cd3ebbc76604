"""The reference's GRU_RESET_BEFORE (the GRU of the original paper: r multiplies h
before W_hn) against independent oracles.

Forward: an ONNX `GRU` node with ``linear_before_reset=0`` run by ONNX Runtime
(float32, with sequence lengths, both directions) and by onnx.reference (float64).
Forward and gradients: Keras 3's GRUCell with ``reset_after=False`` on its torch
backend, differentiated by autograd. Finite differences are in test_reference.py.
"""

import numpy as np
import pytest

from helpers import assert_close, keras_on_torch, make_problem, run_backward, run_forward

SUFFIXES = ("", "_reverse")
MODE = "GRU_RESET_BEFORE"


def onnx_gru(params, I, H, bidirectional, dtype):
    """One ONNX GRU node (linear_before_reset=0) holding the reference's parameters.

    ONNX orders the gates z, r, h (torch: r, z, n)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    D = 2 if bidirectional else 1
    torch_to_onnx = [1, 0, 2]  # ONNX block j holds torch's block torch_to_onnx[j]

    def reorder(a):
        return np.concatenate([a[k * H:(k + 1) * H] for k in torch_to_onnx])

    W = np.stack([reorder(params[f"weight_ih_l0{s}"]) for s in SUFFIXES[:D]])
    R = np.stack([reorder(params[f"weight_hh_l0{s}"]) for s in SUFFIXES[:D]])
    B = np.stack([np.concatenate([reorder(params[f"bias_ih_l0{s}"]), reorder(params[f"bias_hh_l0{s}"])])
                  for s in SUFFIXES[:D]])
    elem = TensorProto.DOUBLE if dtype == np.float64 else TensorProto.FLOAT
    initializers = [numpy_helper.from_array(a.astype(dtype), name)
                    for name, a in (("W", W), ("R", R), ("B", B))]
    node = helper.make_node("GRU", ["X", "W", "R", "B", "lengths", "h0"], ["Y", "Y_h"],
                            hidden_size=H, linear_before_reset=0,
                            direction="bidirectional" if bidirectional else "forward")
    graph = helper.make_graph(
        [node], "gru_reset_before",
        [helper.make_tensor_value_info("X", elem, ["T", "N", I]),
         helper.make_tensor_value_info("lengths", TensorProto.INT32, ["N"]),
         helper.make_tensor_value_info("h0", elem, [D, "N", H])],
        [helper.make_tensor_value_info("Y", elem, ["T", D, "N", H]),
         helper.make_tensor_value_info("Y_h", elem, [D, "N", H])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def onnx_outputs(Y, Y_h):
    """ONNX's Y [T, D, N, H] as the reference's output [T, N, D*H]."""
    T, D, N, H = Y.shape
    return Y.transpose(0, 2, 1, 3).reshape(T, N, D * H), Y_h


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_forward_matches_onnxruntime(bidirectional, with_lengths):
    ort = pytest.importorskip("onnxruntime")
    T, N, I, H = 6, 3, 5, 4
    p = make_problem(MODE, T=T, N=N, I=I, H=H, bidirectional=bidirectional,
                     lengths=[4, 6, 2] if with_lengths else None, dtype=np.float32, seed=3)
    output, h_n, _, _ = run_forward(p)
    model = onnx_gru(p["params"], I, H, bidirectional, np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    lengths = np.full(N, T) if p["lengths"] is None else p["lengths"]
    Y, Y_h = onnx_outputs(*session.run(None, {"X": p["x"], "lengths": lengths.astype(np.int32),
                                              "h0": p["h0"]}))
    assert_close(output, Y, tol=1e-5, name="output")
    assert_close(h_n, Y_h, tol=1e-5, name="h_n")


@pytest.mark.parametrize("bidirectional", [False, True])
def test_forward_matches_onnx_reference_in_float64(bidirectional):
    pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    T, N, I, H = 5, 2, 3, 4
    p = make_problem(MODE, T=T, N=N, I=I, H=H, bidirectional=bidirectional, seed=4)
    output, h_n, _, _ = run_forward(p)
    model = onnx_gru(p["params"], I, H, bidirectional, np.float64)
    # onnx.reference ignores sequence_lens: full lengths only.
    Y, Y_h = onnx_outputs(*ReferenceEvaluator(model).run(None, {
        "X": p["x"], "lengths": np.full(N, T, np.int32), "h0": p["h0"]}))
    assert_close(output, Y, tol=1e-10, name="output")
    assert_close(h_n, Y_h, tol=1e-10, name="h_n")


def test_torch_order_gru_differs_from_it():
    """The oracle tells the two GRUs apart: torch's (r after W_hn) is not this one."""
    p = make_problem(MODE, T=4, N=2, I=3, H=4, seed=5)
    ours = run_forward(p)[0]
    theirs = run_forward(dict(p, mode="GRU"))[0]
    assert np.max(np.abs(ours - theirs)) > 1e-3


def test_forward_and_gradients_match_keras_gru_cell_reset_after_false():
    """Keras's kernel (I, 3H) is W_ih^T with gates z, r, h; recurrent_kernel (H, 3H)
    likewise; its one bias is b_ih + b_hh (b_hn sits outside r here, so the two biases
    only ever appear summed). 1e-5: Keras's torch backend multiplies float64 matrices
    in float32 (see test_keras_oracle.py)."""
    keras = keras_on_torch()
    import torch

    T, N, I, H = 6, 3, 4, 5
    p = make_problem(MODE, T=T, N=N, I=I, H=H, seed=12)
    output, h_n, _, _ = run_forward(p)
    dx, dh0, _, grads = run_backward(p)

    order = [1, 0, 2]  # Keras block j holds torch's block order[j]

    def to_keras(a):
        return np.concatenate([a[k * H:(k + 1) * H] for k in order])

    def from_keras(a):
        blocks = [a[..., j * H:(j + 1) * H] for j in range(3)]
        return np.concatenate([blocks[order.index(k)] for k in range(3)], axis=-1)

    params = p["params"]
    cell = keras.layers.GRUCell(H, reset_after=False, dtype="float64")
    cell.build((N, I))
    cell.kernel.assign(to_keras(params["weight_ih_l0"]).T)
    cell.recurrent_kernel.assign(to_keras(params["weight_hh_l0"]).T)
    cell.bias.assign(to_keras(params["bias_ih_l0"] + params["bias_hh_l0"]))

    x = torch.from_numpy(p["x"].copy()).requires_grad_()
    h = h0 = torch.from_numpy(p["h0"][0].copy()).requires_grad_()
    outputs = []
    for t in range(T):
        out, state = cell(x[t], [h], training=True)
        h = state[0] if isinstance(state, (list, tuple)) else state
        outputs.append(out)
    out = torch.stack(outputs)
    weights = [cell.kernel.value, cell.recurrent_kernel.value, cell.bias.value]
    value = (out * torch.from_numpy(p["R1"])).sum() + (h * torch.from_numpy(p["R2"][0])).sum()
    d_kernel, d_recurrent, d_bias, d_x, d_h0 = torch.autograd.grad(value, weights + [x, h0])

    def check(name, ours, theirs):
        theirs = theirs.detach().numpy() if hasattr(theirs, "detach") else theirs
        assert_close(ours, theirs, tol=1e-5, name=f"keras {name}")

    check("output", output, out)
    check("h_n", h_n[0], h)
    check("dx", dx, d_x)
    check("dh0", dh0[0], d_h0)
    check("dW_ih", grads["weight_ih_l0"], from_keras(d_kernel.detach().numpy()).T)
    check("dW_hh", grads["weight_hh_l0"], from_keras(d_recurrent.detach().numpy()).T)
    check("db_ih", grads["bias_ih_l0"], from_keras(d_bias.detach().numpy()))
    check("db_hh", grads["bias_hh_l0"], from_keras(d_bias.detach().numpy()))
