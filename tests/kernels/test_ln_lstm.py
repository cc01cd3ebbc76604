"""lstmfast.LayerNormLSTM: the fused kernels against the reference (whose own oracles
are in reference/test_ln_lstm_reference.py and reference/test_reference.py), and the
layer's API.

float32 results are compared with the float64 reference on the same (float32)
parameters and inputs: two float32 computations through two layer norms each step
differ from each other by about as much as each differs from the exact result."""

import numpy as np
import pytest

import lstmfast
from lstmfast import interop

from helpers import BACKENDS, assert_close, tolerance

needs_fused = pytest.mark.skipif("fused" not in BACKENDS, reason="the fused kernels are not built")

CONFIGS = [
    dict(),
    dict(num_layers=2, bidirectional=True, dropout=0.3),
    dict(batch_first=True, layer_norm_eps=1e-3),
]


def layers(dtype, H=7, seed=0, **options):
    """The fused layer in dtype and the float64 reference layer, with the same
    parameters, the layer norms moved away from their identity start."""
    fused = lstmfast.LayerNormLSTM(5, H, dtype=dtype, seed=seed, **options)
    rng = np.random.default_rng(seed + 100)
    state = {name: (value + 0.3 * rng.standard_normal(value.shape)).astype(dtype)
             if name.startswith("ln_") else value for name, value in fused.state_dict().items()}
    fused.load_state_dict(state)
    reference = lstmfast.LayerNormLSTM(5, H, dtype="float64", backend="numpy", seed=seed, **options)
    reference.load_state_dict(state)
    return fused, reference


def compare(fused, reference, x, lengths, dropout_seed=None):
    tol = tolerance(fused.dtype)  # float32 against the float64 reference: dtypes differ on purpose
    for layer in (fused, reference):
        layer.zero_grad()
    if dropout_seed is not None:  # the same dropout masks: the same stream in both layers
        for layer in (fused, reference):
            layer._dropout_rng = np.random.default_rng(dropout_seed)
    outs = [layer(x.astype(layer.dtype), lengths=lengths) for layer in (fused, reference)]
    assert outs[0][0].dtype == fused.dtype
    assert_close(outs[0][0], outs[1][0], tol=tol, name="output", check_dtype=False)
    assert_close(outs[0][1][0], outs[1][1][0], tol=tol, name="h_n", check_dtype=False)
    assert_close(outs[0][1][1], outs[1][1][1], tol=tol, name="c_n", check_dtype=False)
    rng = np.random.default_rng(2)
    grad_out = rng.standard_normal(outs[1][0].shape)
    grad_h = rng.standard_normal(outs[1][1][0].shape)
    grad_c = rng.standard_normal(outs[1][1][1].shape)
    back = [layer.backward(*(g.astype(layer.dtype) for g in (grad_out,)),
                           tuple(g.astype(layer.dtype) for g in (grad_h, grad_c)))
            for layer in (fused, reference)]
    assert_close(back[0][0], back[1][0], tol=tol, name="grad x", check_dtype=False)
    assert_close(back[0][1][0], back[1][1][0], tol=tol, name="grad h0", check_dtype=False)
    assert_close(back[0][1][1], back[1][1][1], tol=tol, name="grad c0", check_dtype=False)
    assert list(fused.grad) == list(reference.grad)
    for name in reference.grad:
        assert_close(fused.grad[name], reference.grad[name], tol=tol, name=name, check_dtype=False)
        assert np.abs(reference.grad[name]).max() > 0, name


@needs_fused
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("T, N, H", [(6, 3, 7), (30, 9, 33), (2, 1, 8)], ids=["small", "rows", "short"])
def test_fused_forward_and_backward_match_the_reference(simd_target, dtype, options, T, N, H):
    fused, reference = layers(dtype, H=H, **options)
    rng = np.random.default_rng(1)
    shape = (N, T, 5) if fused.batch_first else (T, N, 5)
    compare(fused, reference, rng.standard_normal(shape), rng.integers(1, T + 1, N), dropout_seed=4)


@needs_fused
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_matches_the_reference_on_two_threads(threads_restored, threads):
    lstmfast.set_num_threads(threads)
    fused, reference = layers("float32", H=64, num_layers=2, bidirectional=True)
    x = np.random.default_rng(3).standard_normal((40, 8, 5))
    compare(fused, reference, x, np.array([40, 17, 40, 1, 33, 40, 8, 2]))


def test_parameters_are_named_and_shaped_as_designed():
    layer = lstmfast.LayerNormLSTM(3, 4, num_layers=2, bidirectional=True)
    shapes = {name: value.shape for name, value in layer.state_dict().items()}
    assert list(shapes)[:6] == ["weight_ih_l0", "weight_hh_l0", "ln_gates_weight_l0",
                                "ln_gates_bias_l0", "ln_cell_weight_l0", "ln_cell_bias_l0"]
    assert shapes["weight_ih_l1_reverse"] == (16, 8)
    assert shapes["ln_gates_bias_l1"] == (16,) and shapes["ln_cell_weight_l0_reverse"] == (4,)
    np.testing.assert_array_equal(layer.ln_gates_weight_l0, np.ones(16, np.float32))
    np.testing.assert_array_equal(layer.ln_cell_bias_l1, np.zeros(4, np.float32))
    assert repr(layer) == "LayerNormLSTM(3, 4, num_layers=2, bidirectional=True)"
    assert "layer_norm_eps=0.001" in repr(lstmfast.LayerNormLSTM(3, 4, layer_norm_eps=1e-3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_loads_torchaudio_weights_through_the_key_map(backend):
    source = lstmfast.LayerNormLSTM(3, 4, num_layers=2, seed=1, backend=backend)
    states = interop.to_torchaudio_lstm(source.state_dict(), 2)
    target = lstmfast.LayerNormLSTM(3, 4, num_layers=2, seed=2, backend=backend)
    target.load_state_dict(interop.from_torchaudio_lstm(states))
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    np.testing.assert_array_equal(target(x)[0], source(x)[0])


@pytest.mark.parametrize("eps", [0, -1e-5, float("nan"), float("inf"), "1e-5", True])
def test_bad_eps_raises_value_error(eps):
    with pytest.raises(ValueError, match="layer_norm_eps"):
        lstmfast.LayerNormLSTM(3, 4, layer_norm_eps=eps)


@pytest.mark.parametrize("precision", ["int8", "bfloat16"])
def test_quantizing_reduces_the_weights_and_keeps_the_layer_norms(precision):
    # The products' accuracy and the kernels against the reference: test_quantize.py.
    layer = lstmfast.LayerNormLSTM(3, 4, layer_norm_eps=1e-3, seed=0)
    q = lstmfast.quantize(layer, precision)
    assert type(q) is lstmfast.LayerNormLSTM and q.layer_norm_eps == 1e-3
    state, original = q.state_dict(), layer.state_dict()
    for name in ("weight_ih_l0", "weight_hh_l0"):
        assert state[name].dtype == (np.int8 if precision == "int8" else np.uint16)
    for name in ("ln_gates_weight_l0", "ln_gates_bias_l0", "ln_cell_weight_l0", "ln_cell_bias_l0"):
        assert state[name].dtype == np.float32
        np.testing.assert_array_equal(state[name], original[name])


@needs_fused
def test_kernels_refuse_linear_biases_and_missing_norms():
    from lstmfast import _fused

    layer = lstmfast.LayerNormLSTM(3, 4)
    params = layer.state_dict()
    x = np.zeros((2, 1, 3), np.float32)
    hx = (np.zeros((1, 1, 4), np.float32), np.zeros((1, 1, 4), np.float32))
    with pytest.raises(ValueError, match="bias_ih_l0.*no linear biases"):
        _fused.forward("LN_LSTM", x, hx, dict(params, bias_ih_l0=np.zeros(16, np.float32)),
                       num_layers=1, bidirectional=False)
    with pytest.raises(ValueError, match=r"params\['ln_cell_bias_l0'\]: missing"):
        _fused.forward("LN_LSTM", x, hx, {k: v for k, v in params.items() if k != "ln_cell_bias_l0"},
                       num_layers=1, bidirectional=False)
    with pytest.raises(ValueError, match="layer_norm_eps must be > 0"):
        _fused.forward("LN_LSTM", x, hx, params, num_layers=1, bidirectional=False,
                       layer_norm_eps=0.0)
