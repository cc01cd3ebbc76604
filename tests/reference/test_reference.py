"""The NumPy reference against its two oracles: finite differences and torch.nn.

Finite differences (float64, central, every entry) check that backward is the
derivative of forward; parity with torch.nn.LSTM/GRU/RNN (when torch is
installed) checks that forward is what torch computes.
"""

import numpy as np
import pytest

from lstmfast import reference

from helpers import assert_close, make_problem, run_backward, run_forward

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


# ----------------------------------------------------------------------------
# Helpers


def loss(p):
    """sum(output*R1) + sum(h_n*R2) (+ sum(c_n*R3)): its gradients are R1, R2, R3."""
    output, h_n, c_n, _ = run_forward(p)
    value = np.sum(output * p["R1"]) + np.sum(h_n * p["R2"])
    if c_n is not None:
        value += np.sum(c_n * p["R3"])
    return value


def numeric_gradient(p, array, eps=1e-6):
    """Central differences of loss(p) w.r.t. every entry of `array`.

    `array` is one of p's arrays: each entry is changed in place and then restored.
    """
    grad = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        saved = array[index]
        array[index] = saved + eps
        loss_plus = loss(p)
        array[index] = saved - eps
        loss_minus = loss(p)
        array[index] = saved
        grad[index] = (loss_plus - loss_minus) / (2 * eps)
    return grad


# ----------------------------------------------------------------------------
# Finite differences, float64, every entry of every gradient

FD_CONFIGS = {
    "one_layer": {},
    "bidirectional": {"bidirectional": True},
    "two_layers": {"num_layers": 2},
    "two_layers_bidirectional": {"num_layers": 2, "bidirectional": True, "H": 3},
    "three_layers": {"num_layers": 3, "H": 2, "I": 2},
    "no_bias": {"bias": False, "num_layers": 2},
    "lengths_unsorted": {"N": 3, "lengths": [2, 3, 1]},
    "lengths_bidirectional": {"N": 3, "lengths": [2, 3, 1], "bidirectional": True},
    "dropout_masks": {"num_layers": 2, "dropout": 0.4},
    "lengths_dropout_bidirectional_two_layers": {
        "N": 3, "lengths": [1, 3, 2], "num_layers": 2, "bidirectional": True,
        "dropout": 0.5, "H": 3},
    "sizes_of_one": {"T": 1, "N": 1, "I": 1, "H": 1},
    "sizes_of_one_bidirectional_two_layers": {
        "T": 1, "N": 1, "I": 1, "H": 1, "num_layers": 2, "bidirectional": True},
}

FD_CASES = [(mode, name, FD_CONFIGS[name]) for mode in reference.MODES for name in FD_CONFIGS]
FD_CASES += [
    ("LSTM", "projection", {"proj_size": 2}),
    ("LSTM", "projection_no_bias", {"proj_size": 2, "bias": False}),
    ("LSTM", "projection_bidirectional_lengths_two_layers", {
        "proj_size": 2, "bidirectional": True, "num_layers": 2, "N": 3,
        "lengths": [2, 3, 1], "dropout": 0.3}),
    ("LSTM", "projection_of_one", {"proj_size": 1, "H": 2, "T": 2, "N": 1, "I": 1}),
    ("LSTM", "peephole", {"peephole": True}),
    ("CTRNN_TANH", "leak_inside", {"leak": "inside"}),
    # recurrent dropout (one mask per layer-direction for all steps and gates) and
    # zoneout (fresh masks every step; ESPnet's convention), and zoneout's eval form
    ("LSTM", "recurrent_dropout", {"recurrent_dropout": 0.4, "num_layers": 2, "bidirectional": True,
                                   "N": 3, "lengths": [2, 3, 1]}),
    ("LSTM", "recurrent_dropout_projection", {"recurrent_dropout": 0.3, "proj_size": 2}),
    ("GRU", "recurrent_dropout", {"recurrent_dropout": 0.4, "bidirectional": True}),
    ("RNN_TANH", "recurrent_dropout", {"recurrent_dropout": 0.4, "num_layers": 2}),
    ("CTRNN_TANH", "recurrent_dropout", {"recurrent_dropout": 0.4, "leak": "inside"}),
    ("LN_LSTM", "recurrent_dropout", {"recurrent_dropout": 0.4}),
    ("LSTM", "zoneout", {"zoneout": (0.3, 0.4), "num_layers": 2, "bidirectional": True, "N": 3,
                         "lengths": [2, 3, 1]}),
    ("LSTM", "zoneout_h_only_projection", {"zoneout": (0.3, None), "proj_size": 2}),
    ("LSTM", "zoneout_eval", {"zoneout": ("eval", 0.1, 0.2), "num_layers": 2}),
    ("LSTM", "zoneout_and_recurrent_dropout", {"zoneout": (0.2, 0.2), "recurrent_dropout": 0.25,
                                               "dropout": 0.3, "num_layers": 2}),
    ("GRU", "zoneout", {"zoneout": (0.3, None), "bidirectional": True, "N": 3, "lengths": [3, 1, 2]}),
    ("RNN_RELU", "zoneout_eval", {"zoneout": ("eval", 0.25, None)}),
    ("GRU_RESET_BEFORE", "recurrent_dropout", {"recurrent_dropout": 0.4, "bidirectional": True,
                                               "N": 3, "lengths": [2, 3, 1]}),
    ("GRU_RESET_BEFORE", "zoneout", {"zoneout": (0.3, None), "num_layers": 2}),
    ("LN_LSTM", "zoneout", {"zoneout": (0.3, 0.3)}),
    ("CTRNN_RELU", "leak_inside_lengths_dropout_bidirectional_two_layers", {
        "leak": "inside", "N": 3, "lengths": [1, 3, 2], "num_layers": 2, "bidirectional": True,
        "dropout": 0.5, "H": 3}),
    ("CTRNN_TANH", "alpha_one_no_noise", {"alpha": 1.0, "noise_std": 0}),
    ("CTRNN_RELU", "small_alpha_leak_inside", {"alpha": 0.05, "leak": "inside", "T": 5}),
    ("LSTM", "peephole_projection_bidirectional_lengths_two_layers", {
        "peephole": True, "proj_size": 2, "bidirectional": True, "num_layers": 2, "N": 3,
        "lengths": [2, 3, 1], "dropout": 0.3}),
    # ONNX's options: activations (with alpha, beta), clip, the coupled gates, reverse
    ("LSTM", "hard_sigmoid_clip", {"options": {
        "activations": [("hardsigmoid", 0.3, 0.45), "tanh", "tanh"], "clip": 0.8}}),
    ("LSTM", "input_forget_peephole_clip_lengths", {
        "peephole": True, "N": 3, "lengths": [2, 3, 1],
        "options": {"input_forget": True, "clip": 1.1}}),
    ("LSTM", "other_activations_two_layers", {"num_layers": 2, "options": {
        "activations": [("affine", 0.4, 0.3), ("scaledtanh", 1.3, 0.7), "softsign"]}}),
    ("LSTM", "reverse_lengths_two_layers", {
        "num_layers": 2, "N": 3, "lengths": [2, 3, 1], "options": {"reverse": True}}),
    ("GRU", "activations_clip_bidirectional", {"bidirectional": True, "options": {
        "activations": ["hardsigmoid", ("leakyrelu", 0.2)], "clip": 0.7}}),
    ("GRU", "reverse_lengths", {"N": 3, "lengths": [3, 1, 2], "options": {"reverse": True}}),
    ("GRU_RESET_BEFORE", "activations_clip", {"options": {
        "activations": ["softsign", "elu"], "clip": 0.9}}),
    ("RNN_TANH", "softplus_clip_reverse", {"N": 3, "lengths": [2, 3, 1], "options": {
        "activations": ["softplus"], "clip": 0.6, "reverse": True}}),
    ("RNN_TANH", "thresholded_relu", {"options": {"activations": [("thresholdedrelu", 0.1)]}}),
    ("RNN_RELU", "clip", {"options": {"clip": 0.5}}),
]


@pytest.mark.parametrize(("mode", "name", "config"), FD_CASES,
                         ids=[f"{mode}-{name}" for mode, name, _ in FD_CASES])
def test_gradients_match_finite_differences(mode, name, config):
    p = make_problem(mode, **config)
    dx, dh0, dc0, grads = run_backward(p)

    def check(label, analytic, array):
        numeric = numeric_gradient(p, array)
        assert_close(analytic, numeric, tol=1e-7, name=f"{mode}-{name} d{label}")

    check("x", dx, p["x"])
    check("h0", dh0, p["h0"])
    if mode in reference.CELL_STATE_MODES:
        check("c0", dc0, p["c0"])
    else:
        assert dc0 is None
    assert list(grads) == list(p["params"])
    for key, array in p["params"].items():
        check(key, grads[key], array)


# ----------------------------------------------------------------------------
# Properties


@pytest.mark.parametrize("mode", reference.MODES)
def test_lengths_pad_with_zeros_and_block_gradients(mode):
    p = make_problem(mode, T=4, N=3, lengths=[2, 4, 1], num_layers=2, bidirectional=True,
                     proj_size=2 if mode == "LSTM" else 0)
    output, _, _, _ = run_forward(p)
    dx, _, _, _ = run_backward(p)
    for b, length in enumerate(p["lengths"]):
        assert np.all(output[length:, b] == 0), f"output of sequence {b} past its length"
        assert np.all(dx[length:, b] == 0), f"dx of sequence {b} past its length"
        if mode != "RNN_RELU":  # relu outputs may be exactly 0 anywhere
            assert np.all(output[:length, b] != 0)


@pytest.mark.parametrize("mode", reference.MODES)
def test_lengths_equal_running_each_sequence_alone(mode):
    """With lengths, sequence b gives what its first lengths[b] steps give on their own."""
    p = make_problem(mode, T=4, N=3, lengths=[3, 4, 1], num_layers=2, bidirectional=True)
    output, h_n, c_n, _ = run_forward(p)
    for b, length in enumerate(p["lengths"]):
        alone = dict(p, x=p["x"][:length, b:b + 1], h0=p["h0"][:, b:b + 1],
                     c0=None if p["c0"] is None else p["c0"][:, b:b + 1], lengths=None)
        if p["ctrnn"].get("noise") is not None:
            alone["ctrnn"] = dict(p["ctrnn"], noise=p["ctrnn"]["noise"][:, :length, b:b + 1])
        output_b, h_n_b, c_n_b, _ = run_forward(alone)
        assert_close(output[:length, b:b + 1], output_b, atol=1e-14, name=f"output[{b}]")
        assert_close(h_n[:, b:b + 1], h_n_b, atol=1e-14, name=f"h_n[{b}]")
        if c_n is not None:
            assert_close(c_n[:, b:b + 1], c_n_b, atol=1e-14, name=f"c_n[{b}]")


@pytest.mark.parametrize("mode", reference.MODES)
def test_float32_stays_float32(mode):
    config = {"num_layers": 2, "bidirectional": True, "N": 3, "lengths": [2, 3, 1],
              "dropout": 0.5, "proj_size": 2 if mode == "LSTM" else 0}
    p32 = make_problem(mode, dtype=np.float32, **config)
    p64 = make_problem(mode, dtype=np.float64, **config)
    results32 = run_forward(p32)[:3] + run_backward(p32)[:3]
    results64 = run_forward(p64)[:3] + run_backward(p64)[:3]
    _, _, _, grads32 = run_backward(p32)
    for name, r32, r64 in zip(["output", "h_n", "c_n", "dx", "dh0", "dc0"], results32, results64):
        if r32 is None:
            assert r64 is None and mode not in reference.CELL_STATE_MODES
            continue
        assert r32.dtype == np.float32, name
        assert_close(r32, r64, tol=1e-5, name=name, check_dtype=False)
    for key, g in grads32.items():
        assert g.dtype == np.float32, key


@pytest.mark.parametrize("mode", reference.MODES)
def test_backward_adds_into_grads(mode):
    p = make_problem(mode, num_layers=2, bidirectional=True)
    _, _, _, once = run_backward(p)
    grads = {key: np.zeros_like(value) for key, value in p["params"].items()}
    arrays = dict(grads)
    run_backward(p, grads)
    _, _, _, returned = run_backward(p, grads)
    assert returned is grads
    for key in p["params"]:
        assert grads[key] is arrays[key], f"{key}: not updated in place"
        assert_close(grads[key], 2 * once[key], atol=1e-14, name=key)


@pytest.mark.parametrize("mode", reference.MODES)
def test_cache_only_in_training(mode):
    p = make_problem(mode)
    output, h_n, c_n, cache = run_forward(p, training=False)
    assert cache is None
    assert (c_n is None) == (mode not in reference.CELL_STATE_MODES)
    with pytest.raises(ValueError, match="training=True"):
        reference.backward(cache, output, h_n)
    output2, _, _, cache = run_forward(p, training=True)
    assert cache is not None
    assert np.array_equal(output, output2)


def test_shapes_and_init():
    shapes = reference.param_shapes("LSTM", 5, 6, 2, True, True, 3)
    assert shapes == {
        "weight_ih_l0": (24, 5), "weight_hh_l0": (24, 3), "bias_ih_l0": (24,),
        "bias_hh_l0": (24,), "weight_hr_l0": (3, 6),
        "weight_ih_l0_reverse": (24, 5), "weight_hh_l0_reverse": (24, 3),
        "bias_ih_l0_reverse": (24,), "bias_hh_l0_reverse": (24,), "weight_hr_l0_reverse": (3, 6),
        "weight_ih_l1": (24, 6), "weight_hh_l1": (24, 3), "bias_ih_l1": (24,),
        "bias_hh_l1": (24,), "weight_hr_l1": (3, 6),
        "weight_ih_l1_reverse": (24, 6), "weight_hh_l1_reverse": (24, 3),
        "bias_ih_l1_reverse": (24,), "bias_hh_l1_reverse": (24,), "weight_hr_l1_reverse": (3, 6),
    }
    assert list(shapes) == list(reference.param_shapes("LSTM", 5, 6, 2, True, True, 3))
    params = reference.init_params("GRU", 5, 16, 2, True, False, 0, np.float32,
                                   np.random.default_rng(1))
    assert list(params) == list(reference.param_shapes("GRU", 5, 16, 2, True, False, 0))
    for key, value in params.items():
        assert value.dtype == np.float32
        assert np.all(np.abs(value) <= 0.25), key
    again = reference.init_params("GRU", 5, 16, 2, True, False, 0, np.float32,
                                  np.random.default_rng(1))
    assert all(np.array_equal(params[key], again[key]) for key in params)
    with pytest.raises(ValueError):
        reference.param_shapes("GRU", 5, 16, 1, True, False, 4)
    with pytest.raises(ValueError):
        reference.param_shapes("LSTM", 5, 4, 1, True, False, 4)
    with pytest.raises(ValueError):
        reference.param_shapes("LSTM_", 5, 4, 1, True, False, 0)


# ----------------------------------------------------------------------------
# Parity with torch.nn


def torch_module(torch, mode, params, *, input_size, hidden_size, num_layers, bias,
                 bidirectional, proj_size, dtype):
    kwargs = {"input_size": input_size, "hidden_size": hidden_size, "num_layers": num_layers,
              "bias": bias, "bidirectional": bidirectional, "dtype": dtype}
    if mode == "LSTM":
        module = torch.nn.LSTM(proj_size=proj_size, **kwargs)
    elif mode == "GRU":
        module = torch.nn.GRU(**kwargs)
    else:
        module = torch.nn.RNN(nonlinearity="tanh" if mode == "RNN_TANH" else "relu", **kwargs)
    module.load_state_dict({key: torch.from_numpy(value.copy()) for key, value in params.items()})
    return module


def torch_forward_backward(torch, p, H):
    """output, h_n, c_n, dx, dh0, dc0 and parameter grads from torch autograd, as numpy."""
    dtype = torch.float64 if p["x"].dtype == np.float64 else torch.float32
    T, N, I = p["x"].shape
    module = torch_module(torch, p["mode"], p["params"], input_size=I, hidden_size=H,
                          num_layers=p["num_layers"], bias=p["bias"],
                          bidirectional=p["bidirectional"], proj_size=p["proj_size"], dtype=dtype)
    x = torch.from_numpy(p["x"].copy()).requires_grad_()
    h0 = torch.from_numpy(p["h0"].copy()).requires_grad_()
    c0 = None if p["c0"] is None else torch.from_numpy(p["c0"].copy()).requires_grad_()
    inputs = x
    if p["lengths"] is not None:
        inputs = torch.nn.utils.rnn.pack_padded_sequence(
            x, torch.from_numpy(p["lengths"]), enforce_sorted=False)
    if c0 is None:
        output, h_n = module(inputs, h0)
        c_n = None
    else:
        output, (h_n, c_n) = module(inputs, (h0, c0))
    if p["lengths"] is not None:
        output, _ = torch.nn.utils.rnn.pad_packed_sequence(output, total_length=T)
    value = (output * torch.from_numpy(p["R1"])).sum() + (h_n * torch.from_numpy(p["R2"])).sum()
    if c_n is not None:
        value = value + (c_n * torch.from_numpy(p["R3"])).sum()
    value.backward()

    def numpy(t):
        return None if t is None else t.detach().numpy()

    grads = {key: numpy(param.grad) for key, param in module.named_parameters()}
    return ([numpy(output), numpy(h_n), numpy(c_n), numpy(x.grad), numpy(h0.grad),
             numpy(None if c0 is None else c0.grad)], grads)


TORCH_CASES = [
    ("LSTM", {}),
    ("LSTM", {"proj_size": 2}),
    ("LSTM", {"proj_size": 2, "num_layers": 2, "bidirectional": True, "N": 3,
              "lengths": [2, 3, 1]}),
    ("LSTM", {"num_layers": 2, "bias": False}),
    ("GRU", {}),
    ("GRU", {"num_layers": 2, "bidirectional": True, "N": 3, "lengths": [2, 3, 1]}),
    ("RNN_TANH", {"bidirectional": True, "N": 3, "lengths": [1, 3, 2]}),
    ("RNN_TANH", {"num_layers": 2}),
    ("RNN_RELU", {"num_layers": 2, "bidirectional": True}),
    ("RNN_RELU", {"N": 4, "lengths": [5, 2, 4, 1], "T": 5}),
]


# torch's float32 LSTM with projection warns that it leaves oneDNN for its own path.
@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("mode", "config"), TORCH_CASES,
                         ids=[f"{mode}-{i}" for i, (mode, _) in enumerate(TORCH_CASES)])
def test_parity_with_torch(mode, config, dtype):
    torch = pytest.importorskip("torch")
    config = {"T": 5, "N": 3, "I": 4, "H": 6, **config}
    p = make_problem(mode, dtype=dtype, seed=7, **config)
    ours = list(run_forward(p)[:3]) + list(run_backward(p)[:3])
    _, _, _, our_grads = run_backward(p)
    theirs, their_grads = torch_forward_backward(torch, p, config["H"])
    rtol = 1e-10 if dtype == np.float64 else 1e-5
    names = ["output", "h_n", "c_n", "dx", "dh0", "dc0"]
    for name, a, b in zip(names, ours, theirs):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == dtype, name
        assert_close(a, b, tol=rtol, name=f"{mode} {name}")
    assert list(our_grads) == list(their_grads)
    for key, b in their_grads.items():
        assert_close(our_grads[key], b, tol=rtol, name=f"{mode} d{key}")


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_param_order_matches_torch(mode, bidirectional):
    torch = pytest.importorskip("torch")
    for bias in (True, False):
        for proj_size in ((0, 2) if mode == "LSTM" else (0,)):
            shapes = reference.param_shapes(mode, 3, 4, 3, bias, bidirectional, proj_size)
            module = torch_module(
                torch, mode, reference.init_params(mode, 3, 4, 3, bias, bidirectional,
                                                   proj_size, np.float64,
                                                   np.random.default_rng(0)),
                input_size=3, hidden_size=4, num_layers=3, bias=bias,
                bidirectional=bidirectional, proj_size=proj_size, dtype=torch.float64)
            assert [(k, tuple(v.shape)) for k, v in module.state_dict().items()] == \
                list(shapes.items())


def test_products_report_overflow_but_not_invalid():
    # reference.product silences only "invalid" (BLAS kernels may leave it raised on
    # finite data): a NaN still shows in the result, and an overflow still warns.
    a = np.array([[np.inf, 1.0]], np.float32)
    b = np.array([[0.0], [1.0]], np.float32)
    assert np.isnan(reference.product(a, b)).all()
    big = np.full((1, 2), 3e38, np.float32)
    with pytest.warns(RuntimeWarning, match="overflow"):
        reference.product(big, np.full((2, 1), 3e38, np.float32))
