"""Recurrent dropout against Keras 3's LSTMCell (docs/cells.md, Recurrent dropout and zoneout), an optional oracle:
skipped when keras is not installed or cannot run on torch here.

Keras's cell (implementation=1, the one that applies recurrent dropout) multiplies
h_{t-1} by one mask per gate, [M_i, M_f, M_c, M_o], kept for the whole sequence; with
the four equal it is lstmfast's shared mask. Its weights are ours transposed: kernel
(I, 4H) = W_ih^T, recurrent_kernel (H, 4H) = W_hh^T, bias = b_ih + b_hh, gates i, f,
c (= g), o. Forward and every gradient (torch's autograd through Keras's torch backend)
at 1e-5: Keras's torch backend multiplies float64 matrices in float32 (keras.ops.matmul
was 3e-7 off torch's float64 product here), so it is an oracle of the semantics, not of
float64 rounding; a mask applied to the wrong term is off by orders more.
"""

import pytest

from helpers import assert_close, keras_on_torch, make_problem, run_backward, run_forward

torch = pytest.importorskip("torch")


def test_recurrent_dropout_matches_keras_lstm_cell_with_its_masks_set():
    keras = keras_on_torch()
    T, N, I, H = 6, 3, 4, 5
    p = make_problem("LSTM", T=T, N=N, I=I, H=H, seed=12, recurrent_dropout=0.3)
    output, h_n, c_n, _ = run_forward(p)
    dx, dh0, dc0, grads = run_backward(p)

    cell = keras.layers.LSTMCell(H, recurrent_dropout=0.3, implementation=1, dtype="float64")
    cell.build((N, I))
    params = p["params"]
    cell.kernel.assign(params["weight_ih_l0"].T)
    cell.recurrent_kernel.assign(params["weight_hh_l0"].T)
    cell.bias.assign(params["bias_ih_l0"] + params["bias_hh_l0"])
    mask = torch.from_numpy(p["regularizers"]["recurrent_dropout_masks"][0])
    cell._recurrent_dropout_mask = [mask, mask, mask, mask]

    x = torch.from_numpy(p["x"].copy()).requires_grad_()
    h = h0 = torch.from_numpy(p["h0"][0].copy()).requires_grad_()
    c = c0 = torch.from_numpy(p["c0"][0].copy()).requires_grad_()
    outputs = []
    for t in range(T):
        out, (h, c) = cell(x[t], [h, c], training=True)
        outputs.append(out)
    out = torch.stack(outputs)
    weights = [cell.kernel.value, cell.recurrent_kernel.value, cell.bias.value]
    value = ((out * torch.from_numpy(p["R1"])).sum() + (h * torch.from_numpy(p["R2"][0])).sum()
             + (c * torch.from_numpy(p["R3"][0])).sum())
    d_kernel, d_recurrent, d_bias, d_x, d_h0, d_c0 = torch.autograd.grad(
        value, weights + [x, h0, c0])

    def check(name, ours, theirs):
        theirs = theirs.detach().numpy()
        assert_close(ours, theirs, tol=1e-5, name=f"keras {name}")

    check("output", output, out)
    check("h_n", h_n[0], h)
    check("c_n", c_n[0], c)
    check("dx", dx, d_x)
    check("dh0", dh0[0], d_h0)
    check("dc0", dc0[0], d_c0)
    check("dW_ih", grads["weight_ih_l0"], d_kernel.T)
    check("dW_hh", grads["weight_hh_l0"], d_recurrent.T)
    check("db_ih", grads["bias_ih_l0"], d_bias)
    check("db_hh", grads["bias_hh_l0"], d_bias)
