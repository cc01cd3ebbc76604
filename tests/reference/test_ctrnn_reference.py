"""The reference's continuous-time RNN (docs/cells.md, Continuous-time RNN) against independent oracles.

* The published modules, transcribed as torch loops and differentiated by autograd:
  Yang & Wang's primer CTRNN (leak inside the relu: input2h and h2h are nn.Linear)
  and the tutorials' form with the leak outside the nonlinearity; each also with
  additive noise, given as a tensor.
* torch.nn.RNN(nonlinearity="relu") for the leak-inside form, whose weights are the
  reparametrization W_ih' = alpha W_in, W_hh' = (1 - alpha) I + alpha W_rec,
  b' = alpha (b_in + b_rec): forward, and the gradients through that map.

Finite differences for every gradient are in test_reference.py (FD_CASES).
"""

import numpy as np
import pytest

from lstmfast import reference

from helpers import assert_close, make_problem, run_backward, run_forward

torch = pytest.importorskip("torch")


def primer_ctrnn_loop(x, h0, W_in, b_in, W_rec, b_rec, alpha, noise, act):
    """Yang & Wang's primer CTRNN.recurrence, step by step (noise added to its argument):
    h = relu(h (1 - alpha) + (input2h(x) + h2h(h)) alpha)."""
    h, outputs = h0, []
    for t in range(x.shape[0]):
        pre_activation = x[t] @ W_in.T + b_in + h @ W_rec.T + b_rec
        h = act(h * (1 - alpha) + pre_activation * alpha + noise[t])
        outputs.append(h)
    return torch.stack(outputs), h


def leak_outside_loop(x, h0, W_in, b_in, W_rec, b_rec, alpha, noise, act):
    """The tutorials' CTRNN: h = (1 - alpha) h + alpha act(input2h(x) + h2h(h)) (+ noise)."""
    h, outputs = h0, []
    for t in range(x.shape[0]):
        h_new = act(x[t] @ W_in.T + b_in + h @ W_rec.T + b_rec)
        h = h * (1 - alpha) + h_new * alpha + noise[t]
        outputs.append(h)
    return torch.stack(outputs), h


LOOPS = {"inside": primer_ctrnn_loop, "outside": leak_outside_loop}


@pytest.mark.parametrize("leak", ["inside", "outside"])
@pytest.mark.parametrize("mode", ["CTRNN_RELU", "CTRNN_TANH"])
@pytest.mark.parametrize("noise_std", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_reference_matches_the_published_module_as_a_torch_loop(leak, mode, noise_std, dtype):
    p = make_problem(mode, T=7, N=3, I=4, H=5, alpha=0.2, leak=leak, noise_std=noise_std,
                     dtype=dtype, seed=11)
    output, h_n, _, _ = run_forward(p)
    dx, dh0, _, grads = run_backward(p)

    def leaf(a):
        return torch.from_numpy(np.array(a)).requires_grad_()

    w = {name: leaf(value) for name, value in p["params"].items()}
    x, h0 = leaf(p["x"]), leaf(p["h0"][0])
    noise = p["ctrnn"]["noise"]
    noise = torch.zeros(p["x"].shape[:2] + (5,), dtype=x.dtype) if noise is None else \
        torch.from_numpy(noise[0])
    act = torch.relu if mode == "CTRNN_RELU" else torch.tanh
    out, h = LOOPS[leak](x, h0, w["weight_ih_l0"], w["bias_ih_l0"], w["weight_hh_l0"],
                         w["bias_hh_l0"], 0.2, noise, act)
    ((out * torch.from_numpy(p["R1"])).sum() + (h * torch.from_numpy(p["R2"][0])).sum()).backward()
    rtol = 1e-10 if dtype == np.float64 else 1e-5

    def check(name, ours, theirs):
        theirs = theirs.detach().numpy()
        assert ours.dtype == dtype, name
        assert_close(ours, theirs, tol=rtol, name=f"{leak} {mode} {name}")

    check("output", output, out)
    check("h_n", h_n[0], h)
    check("dx", dx, x.grad)
    check("dh0", dh0[0], h0.grad)
    for name, tensor in w.items():
        check(f"d{name}", grads[name], tensor.grad)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.1])
def test_leak_inside_is_torch_rnn_with_reparametrized_weights(alpha):
    """Forward and every gradient at 1e-10 (float64), through torch.nn.RNN(relu)."""
    H = 6
    p = make_problem("CTRNN_RELU", T=9, N=4, I=3, H=H, num_layers=2, alpha=alpha,
                     leak="inside", noise_std=0, seed=5)
    output, h_n, _, _ = run_forward(p)
    dx, dh0, _, grads = run_backward(p)

    leaves = {name: torch.from_numpy(value.copy()).requires_grad_()
              for name, value in p["params"].items()}
    rnn = torch.nn.RNN(3, H, num_layers=2, nonlinearity="relu", dtype=torch.float64)
    eye = torch.eye(H, dtype=torch.float64)
    reparametrized = {}
    for k in range(2):
        reparametrized[f"weight_ih_l{k}"] = alpha * leaves[f"weight_ih_l{k}"]
        reparametrized[f"weight_hh_l{k}"] = (1 - alpha) * eye + alpha * leaves[f"weight_hh_l{k}"]
        reparametrized[f"bias_ih_l{k}"] = alpha * (leaves[f"bias_ih_l{k}"] + leaves[f"bias_hh_l{k}"])
        reparametrized[f"bias_hh_l{k}"] = torch.zeros(H, dtype=torch.float64)
    x = torch.from_numpy(p["x"].copy()).requires_grad_()
    h0 = torch.from_numpy(p["h0"].copy()).requires_grad_()
    out, h = torch.func.functional_call(rnn, reparametrized, (x, h0))
    ((out * torch.from_numpy(p["R1"])).sum() + (h * torch.from_numpy(p["R2"])).sum()).backward()

    def check(name, ours, theirs):
        theirs = theirs.detach().numpy()
        assert_close(ours, theirs, tol=1e-10, name=f"alpha={alpha} {name}")

    check("output", output, out)
    check("h_n", h_n, h)
    check("dx", dx, x.grad)
    check("dh0", dh0, h0.grad)
    for name, leaf in leaves.items():
        check(f"d{name}", grads[name], leaf.grad)


def test_alpha_one_without_noise_is_the_elman_rnn():
    for nonlinearity in ("tanh", "relu"):
        ctrnn = make_problem(reference.CTRNN_MODES[nonlinearity], alpha=1.0, noise_std=0,
                             num_layers=2, bidirectional=True, N=3, lengths=[2, 3, 1])
        rnn = dict(ctrnn, mode="RNN_" + nonlinearity.upper(), ctrnn={})
        for a, b in zip(run_forward(ctrnn)[:2] + run_backward(ctrnn)[:2],
                        run_forward(rnn)[:2] + run_backward(rnn)[:2]):
            np.testing.assert_array_equal(a, b)


def test_bad_ctrnn_options_raise():
    p = make_problem("CTRNN_TANH")
    for options, match in (({"alpha": 0.0}, "alpha"), ({"alpha": 1.5}, "alpha"),
                           ({"leak": "sideways"}, "leak")):
        with pytest.raises(ValueError, match=match):
            run_forward(dict(p, ctrnn=dict(p["ctrnn"], **options)))
    lstm = make_problem("LSTM")
    with pytest.raises(ValueError, match="noise"):
        run_forward(dict(lstm, ctrnn={"noise": np.zeros((1, 3, 2, 4))}))
