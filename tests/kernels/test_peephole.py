"""LSTM(peephole=True): the fused kernels against the reference, whose own oracles
(finite differences, ONNX Runtime, onnx.reference, a torch-autograd loop) are in
reference/test_reference.py and reference/test_peephole_reference.py."""

import numpy as np
import pytest

import lstmfast

from helpers import BACKENDS, assert_close, tolerance

needs_fused = pytest.mark.skipif("fused" not in BACKENDS, reason="the fused kernels are not built")

CONFIGS = [
    dict(),
    dict(num_layers=2, bidirectional=True),
    dict(proj_size=3, num_layers=2),
    dict(bias=False, batch_first=True),
]


def pair(dtype, seed=0, **options):
    fused = lstmfast.LSTM(5, 7, peephole=True, dtype=dtype, seed=seed, **options)
    numpy = lstmfast.LSTM(5, 7, peephole=True, dtype=dtype, seed=seed, backend="numpy", **options)
    return fused, numpy


@needs_fused
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("T, N", [(6, 3), (30, 9), (2, 1)], ids=["pool", "fused", "short"])
def test_fused_forward_and_backward_match_the_reference(simd_target, dtype, options, T, N):
    fused, numpy = pair(dtype, **options)
    rng = np.random.default_rng(1)
    shape = (N, T, 5) if fused.batch_first else (T, N, 5)
    x = rng.standard_normal(shape).astype(dtype)
    lengths = rng.integers(1, T + 1, N)
    tol = tolerance(dtype)
    for layer in (fused, numpy):
        layer.zero_grad()
    outs = [layer(x, lengths=lengths) for layer in (fused, numpy)]
    assert_close(outs[0][0], outs[1][0], tol=tol, name="output")
    for a, b, name in zip(outs[0][1], outs[1][1], ("h_n", "c_n")):
        assert_close(a, b, tol=tol, name=name)
    grad_out = rng.standard_normal(outs[1][0].shape).astype(dtype)
    back = [layer.backward(grad_out) for layer in (fused, numpy)]
    assert_close(back[0][0], back[1][0], tol=tol, name="grad x")
    for a, b, name in zip(back[0][1], back[1][1], ("grad h0", "grad c0")):
        assert_close(a, b, tol=tol, name=name)
    assert list(fused.grad) == list(numpy.grad)
    for name in numpy.grad:
        assert_close(fused.grad[name], numpy.grad[name], tol=tol, name=name)
    assert np.abs(fused.grad["weight_co_l0"]).max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_peephole_parameters_are_named_and_placed_as_designed(backend):
    layer = lstmfast.LSTM(4, 3, num_layers=2, bidirectional=True, proj_size=2, peephole=True,
                          backend=backend)
    names = list(layer.state_dict())
    assert names[:8] == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0",
                         "weight_hr_l0", "weight_ci_l0", "weight_cf_l0", "weight_co_l0"]
    assert layer.weight_cf_l1_reverse.shape == (3,)
    assert "peephole=True" in repr(layer)
    plain = lstmfast.LSTM(4, 3, num_layers=2, bidirectional=True, proj_size=2, backend=backend)
    assert [n for n in names if "_c" not in n[6:9]] == list(plain.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_peepholes_give_the_plain_lstm(backend):
    peephole = lstmfast.LSTM(4, 6, num_layers=2, peephole=True, seed=3, backend=backend).eval()
    plain = lstmfast.LSTM(4, 6, num_layers=2, seed=4, backend=backend).eval()
    state = {k: v for k, v in peephole.state_dict().items() if "_c" not in k[6:9]}
    plain.load_state_dict(state)
    x = np.random.default_rng(5).standard_normal((7, 2, 4)).astype(np.float32)
    assert not np.allclose(peephole(x)[0], plain(x)[0])
    for name in peephole.state_dict():
        if "_c" in name[6:9]:
            setattr(peephole, name, np.zeros(6))
    np.testing.assert_array_equal(peephole(x)[0], plain(x)[0])


@needs_fused
@pytest.mark.parametrize("precision", ["int8", "bfloat16"])
def test_quantized_peephole_layers_keep_float_peepholes(precision):
    layer = lstmfast.LSTM(8, 16, peephole=True, seed=6).eval()
    q = lstmfast.quantize(layer, precision)
    reference = lstmfast.quantize(lstmfast.LSTM(8, 16, peephole=True, seed=6, backend="numpy"),
                                  precision)
    assert q.state_dict()["weight_ci_l0"].dtype == np.float32
    x = np.random.default_rng(7).standard_normal((1, 4, 8)).astype(np.float32)
    h0 = np.random.default_rng(8).standard_normal((1, 4, 16)).astype(np.float32)
    assert_close(q(x, (h0, h0))[0], reference(x, (h0, h0))[0], tol=1e-5)
    expected = layer(x, (h0, h0))[0]
    assert np.abs(q(x, (h0, h0))[0] - expected).max() <= 3e-2 * np.abs(expected).max()


def test_peephole_is_an_lstm_option_only():
    with pytest.raises(TypeError):
        lstmfast.GRU(3, 4, peephole=True)
    with pytest.raises(TypeError, match="peephole should be of type bool"):
        lstmfast.LSTM(3, 4, peephole=1)
