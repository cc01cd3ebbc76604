"""lstmfast.CTRNN: the fused kernels against the reference (whose own oracles are in
reference/test_ctrnn_reference.py and reference/test_reference.py), and the layer's API."""

import pickle

import numpy as np
import pytest

import lstmfast

from helpers import BACKENDS, assert_close, tolerance

needs_fused = pytest.mark.skipif("fused" not in BACKENDS, reason="the fused kernels are not built")

CONFIGS = [
    dict(),
    dict(num_layers=2, bidirectional=True, dropout=0.3),
    dict(bias=False, batch_first=True, noise_std=0.0),
    dict(nonlinearity="tanh", leak="inside", num_layers=2),
    dict(nonlinearity="tanh", alpha=1.0, bidirectional=True),
    dict(leak="inside", alpha=0.05),
]


def pair(dtype, seed=0, **options):
    options = {"alpha": 0.2, "noise_std": 0.1, **options}
    fused = lstmfast.CTRNN(5, 7, dtype=dtype, seed=seed, **options)
    numpy = lstmfast.CTRNN(5, 7, dtype=dtype, seed=seed, backend="numpy", **options)
    return fused, numpy


def compare(fused, numpy, x, tol, **call):
    """Forward, then backward with one random upstream gradient, on both layers."""
    for layer in (fused, numpy):
        layer.zero_grad()
    outs = [layer(x, **call) for layer in (fused, numpy)]
    assert_close(outs[0][0], outs[1][0], tol=tol, name="output")
    assert_close(outs[0][1], outs[1][1], tol=tol, name="h_n")
    grad_out = np.random.default_rng(2).standard_normal(outs[1][0].shape).astype(x.dtype)
    grad_h = np.random.default_rng(3).standard_normal(outs[1][1].shape).astype(x.dtype)
    back = [layer.backward(grad_out, grad_h) for layer in (fused, numpy)]
    assert_close(back[0][0], back[1][0], tol=tol, name="grad x")
    assert_close(back[0][1], back[1][1], tol=tol, name="grad h0")
    assert list(fused.grad) == list(numpy.grad)
    for name in numpy.grad:
        assert_close(fused.grad[name], numpy.grad[name], tol=tol, name=name)
        assert np.abs(numpy.grad[name]).max() > 0, name
    return outs[0]


@needs_fused
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("T, N", [(6, 3), (30, 9), (2, 1)], ids=["pool", "fused", "short"])
def test_fused_forward_and_backward_match_the_reference(simd_target, dtype, options, T, N):
    fused, numpy = pair(dtype, **options)
    rng = np.random.default_rng(1)
    shape = (N, T, 5) if fused.batch_first else (T, N, 5)
    x = rng.standard_normal(shape).astype(dtype)
    compare(fused, numpy, x, tolerance(dtype), lengths=rng.integers(1, T + 1, N))


@needs_fused
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("leak", ["outside", "inside"])
def test_fused_matches_the_reference_on_the_pool_at_the_neuroscience_shape(
        threads_restored, threads, leak):
    lstmfast.set_num_threads(threads)
    fused = lstmfast.CTRNN(3, 64, alpha=0.2, leak=leak, noise_std=0.1, seed=4)
    numpy = lstmfast.CTRNN(3, 64, alpha=0.2, leak=leak, noise_std=0.1, seed=4, backend="numpy")
    x = np.random.default_rng(5).standard_normal((100, 16, 3)).astype(np.float32)
    compare(fused, numpy, x, tolerance("float32"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_is_drawn_from_the_seed_and_can_be_given(backend):
    layer = lstmfast.CTRNN(3, 4, num_layers=2, bidirectional=True, alpha=0.5, noise_std=0.3,
                           seed=7, backend=backend)
    quiet = lstmfast.CTRNN(3, 4, num_layers=2, bidirectional=True, alpha=0.5, seed=7,
                           backend=backend)
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    first, second = layer(x)[0], layer(x)[0]
    assert not np.allclose(first, second), "each call draws fresh noise"
    again = lstmfast.CTRNN(3, 4, num_layers=2, bidirectional=True, alpha=0.5, noise_std=0.3,
                           seed=7, backend=backend)
    np.testing.assert_array_equal(again(x)[0], first)
    assert not np.allclose(quiet(x)[0], first)
    zeros = np.zeros((4, 5, 2, 4), dtype=np.float32)
    np.testing.assert_array_equal(layer(x, noise=zeros)[0], quiet(x)[0])
    # noise is part of the model: eval mode adds it too
    layer.eval()
    assert not np.allclose(layer(x)[0], quiet.eval()(x)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_given_noise_follows_the_callers_layout(backend):
    """batch_first and unbatched noise is the caller's layout of each direction's output."""
    time_major = lstmfast.CTRNN(3, 4, alpha=0.3, seed=1, backend=backend)
    batch_first = lstmfast.CTRNN(3, 4, alpha=0.3, seed=1, backend=backend, batch_first=True)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 2, 3)).astype(np.float32)
    noise = rng.standard_normal((1, 6, 2, 4)).astype(np.float32)
    expected = time_major(x, noise=noise)[0]
    got = batch_first(x.transpose(1, 0, 2), noise=noise.transpose(0, 2, 1, 3))[0]
    np.testing.assert_array_equal(got.transpose(1, 0, 2), expected)
    unbatched = time_major(x[:, 0], noise=noise[:, :, 0])[0]
    np.testing.assert_allclose(unbatched, expected[:, 0], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"noise: expected shape \(1, 6, 2, 4\)"):
        time_major(x, noise=noise[:, :5])


def test_parameters_are_the_rnns_and_load_its_state_dict():
    rnn = lstmfast.RNN(3, 4, num_layers=2, nonlinearity="relu", seed=3)
    ctrnn = lstmfast.CTRNN(3, 4, num_layers=2, alpha=1.0, seed=9)
    assert list(ctrnn.state_dict()) == list(rnn.state_dict())
    ctrnn.load_state_dict(rnn.state_dict())
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    for a, b in zip(ctrnn(x), rnn(x)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_options_repr_and_pickle(backend):
    layer = lstmfast.CTRNN(3, 4, nonlinearity="tanh", alpha=0.1, leak="inside", noise_std=0.2,
                           backend=backend)
    assert repr(layer).startswith("CTRNN(3, 4, nonlinearity='tanh', alpha=0.1, leak='inside', "
                                  "noise_std=0.2")
    clone = pickle.loads(pickle.dumps(layer))
    assert (clone.alpha, clone.leak, clone.noise_std) == (0.1, "inside", 0.2)
    x = np.ones((2, 1, 3), dtype=np.float32)
    noise = np.zeros((1, 2, 1, 4), dtype=np.float32)
    np.testing.assert_array_equal(clone(x, noise=noise)[0], layer(x, noise=noise)[0])


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": 0}, "alpha"), ({"alpha": 1.01}, "alpha"), ({"alpha": float("nan")}, "alpha"),
    ({"alpha": "0.5"}, "alpha"), ({"leak": "both"}, "leak"), ({"noise_std": -1}, "noise_std"),
    ({"noise_std": float("inf")}, "noise_std"), ({"nonlinearity": "sigmoid"}, "nonlinearity"),
])
def test_bad_options_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lstmfast.CTRNN(3, 4, **kwargs)


@pytest.mark.parametrize("precision", ["int8", "bfloat16"])
def test_quantizing_keeps_the_options(precision):
    # The products' accuracy and the kernels against the reference: test_quantize.py.
    layer = lstmfast.CTRNN(3, 4, nonlinearity="tanh", alpha=0.25, leak="inside", seed=0)
    q = lstmfast.quantize(layer, precision)
    assert type(q) is lstmfast.CTRNN
    assert (q.nonlinearity, q.alpha, q.leak) == ("tanh", 0.25, "inside")
    assert q.state_dict()["weight_hh_l0"].dtype == (np.int8 if precision == "int8" else np.uint16)
    assert q.state_dict()["bias_hh_l0"].dtype == np.float32


@needs_fused
def test_kernels_refuse_noise_for_other_cells_and_bad_alpha():
    from lstmfast import _fused

    x = np.zeros((2, 1, 3), dtype=np.float32)
    h0 = np.zeros((1, 1, 4), dtype=np.float32)
    params = {"weight_ih_l0": np.zeros((4, 3), np.float32), "weight_hh_l0": np.zeros((4, 4), np.float32)}
    with pytest.raises(ValueError, match="noise: only a CTRNN"):
        _fused.forward("RNN_TANH", x, h0, params, num_layers=1, bidirectional=False,
                       noise=np.zeros((1, 2, 1, 4)))
    with pytest.raises(ValueError, match="alpha must be in"):
        _fused.forward("CTRNN_TANH", x, h0, params, num_layers=1, bidirectional=False, alpha=2.0)
    with pytest.raises(ValueError, match="noise: expected shape"):
        _fused.forward("CTRNN_TANH", x, h0, params, num_layers=1, bidirectional=False,
                       noise=np.zeros((1, 2, 2, 4)))
