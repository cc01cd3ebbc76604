"""The reference's layer-normalized LSTM (docs/cells.md, Layer-normalized LSTM) against torchaudio's RNN-T form.

torchaudio's ``_CustomLSTM(layer_norm=True)``, transcribed as a torch loop
(``lstmfast.oracles.CustomLSTMLoop``, which the benchmark times), one module per
layer, fed our parameters
through the documented key map (``lstmfast.interop.from_torchaudio_lstm``). When
torchaudio itself imports, its module is the oracle too. Finite differences for every
gradient are in test_reference.py (FD_CASES).
"""

import numpy as np
import pytest

from lstmfast import interop, reference

from helpers import assert_close, make_problem, torchaudio_custom_lstm

torch = pytest.importorskip("torch")

from lstmfast.oracles import CustomLSTMLoop  # noqa: E402


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_reference_matches_torchaudio_custom_lstm_as_a_torch_loop(dtype, num_layers, eps):
    H = 5
    p = make_problem("LN_LSTM", T=6, N=3, I=4, H=H, num_layers=num_layers, dtype=dtype, seed=3)
    output, h_n, c_n, _ = reference.forward(
        "LN_LSTM", p["x"], (p["h0"], p["c0"]), p["params"], num_layers=num_layers,
        bidirectional=False, layer_norm_eps=eps)
    _, _, _, cache = reference.forward(
        "LN_LSTM", p["x"], (p["h0"], p["c0"]), p["params"], num_layers=num_layers,
        bidirectional=False, layer_norm_eps=eps, training=True)
    dx, dh0, dc0, grads = reference.backward(cache, p["R1"], p["R2"], p["R3"])

    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    layers = []
    for k, state in enumerate(interop.to_torchaudio_lstm(p["params"], num_layers)):
        module = CustomLSTMLoop(4 if k == 0 else H, H, layer_norm_epsilon=eps).to(tdtype)
        module.load_state_dict({key: torch.from_numpy(v.copy()) for key, v in state.items()})
        layers.append(module)
    x = torch.from_numpy(p["x"].copy()).requires_grad_()
    h0 = torch.from_numpy(p["h0"].copy()).requires_grad_()
    c0 = torch.from_numpy(p["c0"].copy()).requires_grad_()
    out, hs, cs = x, [], []
    for k, module in enumerate(layers):
        out, (h, c) = module(out, [h0[k], c0[k]])
        hs.append(h)
        cs.append(c)
    h, c = torch.stack(hs), torch.stack(cs)
    ((out * torch.from_numpy(p["R1"])).sum() + (h * torch.from_numpy(p["R2"])).sum()
     + (c * torch.from_numpy(p["R3"])).sum()).backward()
    rtol = 1e-10 if dtype == np.float64 else 1e-5

    def check(name, ours, theirs):
        theirs = theirs.detach().numpy() if hasattr(theirs, "detach") else theirs
        assert ours.dtype == dtype, name
        assert_close(ours, theirs, tol=rtol, name=name)

    check("output", output, out)
    check("h_n", h_n, h)
    check("c_n", c_n, c)
    check("dx", dx, x.grad)
    check("dh0", dh0, h0.grad)
    check("dc0", dc0, c0.grad)
    their_grads = interop.from_torchaudio_lstm(
        [{key: t.grad for key, t in module.named_parameters()} for module in layers])
    assert list(their_grads) == list(grads)
    for name, g in their_grads.items():
        check(f"d{name}", grads[name], g)


def test_key_map_round_trips_and_names_what_is_wrong():
    params = reference.init_params("LN_LSTM", 3, 4, 2, False, False, 0, np.float32,
                                   np.random.default_rng(0))
    states = interop.to_torchaudio_lstm(params, 2)
    assert list(states[0]) == ["x2g.weight", "p2g.weight", "c_norm.weight", "c_norm.bias",
                               "g_norm.weight", "g_norm.bias"]
    back = interop.from_torchaudio_lstm(states)
    assert list(back) == list(params)
    for name in params:
        np.testing.assert_array_equal(back[name], params[name])
    broken = dict(states[0])
    broken["x2g.bias"] = np.zeros(16)
    with pytest.raises(ValueError, match="x2g.bias"):
        interop.from_torchaudio_lstm([broken])
    del broken["x2g.bias"], broken["g_norm.bias"]
    with pytest.raises(ValueError, match="g_norm.bias"):
        interop.from_torchaudio_lstm([broken])


def test_torchaudio_itself_when_it_imports():
    custom_lstm, why = torchaudio_custom_lstm()
    if custom_lstm is None:
        pytest.skip(why)
    torch.manual_seed(0)
    theirs = custom_lstm(4, 5, layer_norm=True, layer_norm_epsilon=1e-3).double()
    for name, param in theirs.named_parameters():  # layer norms away from their start
        with torch.no_grad():
            param.add_(0.3 * torch.randn_like(param))
    params = interop.from_torchaudio_lstm([{k: v.detach().numpy() for k, v in theirs.state_dict().items()}])
    x = np.random.default_rng(1).standard_normal((6, 3, 4))
    zeros = np.zeros((1, 3, 5))
    output, h_n, c_n, _ = reference.forward("LN_LSTM", x, (zeros, zeros), params, num_layers=1,
                                            bidirectional=False, layer_norm_eps=1e-3)
    out, (h, c) = theirs(torch.from_numpy(x), None)
    for name, a, b in (("output", output, out), ("h_n", h_n[0], h), ("c_n", c_n[0], c)):
        assert_close(a, b.detach().numpy(), atol=1e-10, name=name)
