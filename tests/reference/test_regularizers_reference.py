"""The reference's recurrent dropout and zoneout (docs/cells.md, Recurrent dropout and zoneout) against torch loops.

* Recurrent dropout: one mask per layer-direction on h_{t-1} where it enters the
  recurrent product, shared by all gates (Gal & Ghahramani; Keras with one mask). For
  the LSTM that is ``nn.LSTMCell(x_t, (h * M, c))`` exactly, as the cell reads h only in
  its product; the GRU also reads h in ``z * h``, unmasked, so its loop is written out.
* Zoneout, ESPnet's ZoneOutCell: masks fresh every step, 1 keeps the old value,
  ``h_t = m_h h_{t-1} + (1 - m_h) h~_t`` and the same for c; in eval the probability
  stands for the mask.

Forward and every gradient (autograd) at 1e-10 in float64. Finite differences of every
gradient are in test_reference.py (FD_CASES).
"""

import numpy as np
import pytest

from helpers import assert_close, make_problem, run_backward, run_forward

torch = pytest.importorskip("torch")


def leaf(a):
    return torch.from_numpy(np.array(a)).requires_grad_()


def gru_step(x, h, h_rec, w_ih, w_hh, b_ih, b_hh):
    """torch.nn.GRUCell's equations with the recurrent product on h_rec."""
    gi, gh = x @ w_ih.T + b_ih, h_rec @ w_hh.T + b_hh
    i_r, i_z, i_n = gi.chunk(3, 1)
    h_r, h_z, h_n = gh.chunk(3, 1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def torch_loop(mode, p, w, x, h0, c0):
    """One layer, one direction, no lengths: the cell step by step with the problem's
    masks, in torch ops."""
    reg = p["regularizers"]
    mask = reg.get("recurrent_dropout_masks")
    m_h, m_c = reg.get("zoneout_masks", (None, None))

    def at(m, t):
        if m is None:
            return None
        return torch.tensor(float(m), dtype=torch.float64) if np.ndim(m) == 0 else torch.from_numpy(m[0, t])

    h, c = h0, c0
    outputs = []
    for t in range(x.shape[0]):
        h_rec = h if mask is None else h * torch.from_numpy(mask[0])
        if mode == "LSTM":
            gates = x[t] @ w["weight_ih_l0"].T + w["bias_ih_l0"] + h_rec @ w["weight_hh_l0"].T + w["bias_hh_l0"]
            i, f, g, o = gates.chunk(4, 1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
        elif mode == "GRU":
            h_new = gru_step(x[t], h, h_rec, w["weight_ih_l0"], w["weight_hh_l0"], w["bias_ih_l0"],
                             w["bias_hh_l0"])
        else:
            h_new = torch.tanh(x[t] @ w["weight_ih_l0"].T + w["bias_ih_l0"]
                               + h_rec @ w["weight_hh_l0"].T + w["bias_hh_l0"])
        zh, zc = at(m_h, t), at(m_c, t)
        h = h_new if zh is None else zh * h + (1 - zh) * h_new  # ESPnet's _zoneout
        if c is not None:
            c = c_new if zc is None else zc * c + (1 - zc) * c_new
        outputs.append(h)
    return torch.stack(outputs), h, c


def lstm_cell_loop(p, w, x, h0, c0):
    """Recurrent dropout on an LSTM through torch.nn.LSTMCell itself: h * M as its h."""
    cell = torch.nn.LSTMCell(x.shape[2], h0.shape[1], dtype=torch.float64)
    params = {"weight_ih": w["weight_ih_l0"], "weight_hh": w["weight_hh_l0"],
              "bias_ih": w["bias_ih_l0"], "bias_hh": w["bias_hh_l0"]}
    mask = torch.from_numpy(p["regularizers"]["recurrent_dropout_masks"][0])
    h, c, outputs = h0, c0, []
    for t in range(x.shape[0]):
        h, c = torch.func.functional_call(cell, params, (x[t], (h * mask, c)))
        outputs.append(h)
    return torch.stack(outputs), h, c


CASES = [
    ("LSTM", {"recurrent_dropout": 0.4}, torch_loop),
    ("LSTM", {"recurrent_dropout": 0.4}, lstm_cell_loop),
    ("GRU", {"recurrent_dropout": 0.4}, torch_loop),
    ("RNN_TANH", {"recurrent_dropout": 0.4}, torch_loop),
    ("LSTM", {"zoneout": (0.3, 0.2)}, torch_loop),
    ("LSTM", {"zoneout": ("eval", 0.3, 0.2)}, torch_loop),
    ("LSTM", {"zoneout": (0.25, 0.25), "recurrent_dropout": 0.3}, torch_loop),
    ("GRU", {"zoneout": (0.3, None), "recurrent_dropout": 0.2}, torch_loop),
    ("RNN_TANH", {"zoneout": ("eval", 0.1, None)}, torch_loop),
]


@pytest.mark.parametrize("mode, options, loop", CASES,
                         ids=[f"{m}-{'-'.join(o)}-{f.__name__}" for m, o, f in CASES])
def test_reference_matches_a_torch_loop_with_the_same_masks(mode, options, loop):
    p = make_problem(mode, T=6, N=3, I=4, H=5, seed=9, **options)
    output, h_n, c_n, _ = run_forward(p)
    dx, dh0, dc0, grads = run_backward(p)
    w = {name: leaf(value) for name, value in p["params"].items()}
    x, h0 = leaf(p["x"]), leaf(p["h0"][0])
    c0 = leaf(p["c0"][0]) if p["c0"] is not None else None
    out, h, c = loop(mode, p, w, x, h0, c0) if loop is torch_loop else loop(p, w, x, h0, c0)
    value = (out * torch.from_numpy(p["R1"])).sum() + (h * torch.from_numpy(p["R2"][0])).sum()
    if c is not None:
        value = value + (c * torch.from_numpy(p["R3"][0])).sum()
    value.backward()

    def check(name, ours, theirs):
        theirs = theirs.detach().numpy()
        assert_close(ours, theirs, tol=1e-10, name=f"{mode} {name}")

    check("output", output, out)
    check("h_n", h_n[0], h)
    check("dx", dx, x.grad)
    check("dh0", dh0[0], h0.grad)
    if c is not None:
        check("c_n", c_n[0], c)
        check("dc0", dc0[0], c0.grad)
    for name, tensor in w.items():
        check(f"d{name}", grads[name], tensor.grad)


def test_masks_change_the_result_and_ones_change_nothing():
    plain = make_problem("LSTM", T=5, N=2, num_layers=2, seed=4)
    dropped = make_problem("LSTM", T=5, N=2, num_layers=2, seed=4, recurrent_dropout=0.5)
    assert not np.allclose(run_forward(plain)[0], run_forward(dropped)[0])
    ones = dict(plain, regularizers={"recurrent_dropout_masks": np.ones((2, 2, 4)),
                                     "zoneout_masks": (np.zeros((2, 5, 2, 4)), 0.0)})
    for a, b in zip(run_forward(plain)[:3] + run_backward(plain)[:3],
                    run_forward(ones)[:3] + run_backward(ones)[:3]):
        np.testing.assert_array_equal(a, b)
