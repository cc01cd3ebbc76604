"""The vector math of every compiled SIMD target, and the caller's floating-point state.

exp, sigmoid and tanh (cpp/runtime/simd.h, reached through the test hook _core._activation)
are compared with NumPy in float64 over a dense range, tiny and huge inputs included,
in units in the last place (ulp) of the result's dtype.
"""

import numpy as np
import pytest

from lstmfast import _core, reference

_fused = pytest.importorskip("lstmfast._fused")
pytestmark = pytest.mark.skipif(not _fused.available, reason="fused kernels not built")

# Largest error allowed, in ulps of the result (measured: 2.4 and 4.0).
MAX_ULPS = {np.dtype(np.float32): 4.0, np.dtype(np.float64): 6.0}

def _sigmoid(x):
    with np.errstate(over="ignore"):  # e^-x = inf for x << 0 gives the right 0
        return 1.0 / (1.0 + np.exp(-x))


EXACT = {"exp": np.exp, "sigmoid": _sigmoid, "tanh": np.tanh}


def inputs(dtype):
    tiny = np.geomspace(1e-30 if dtype == np.float32 else 1e-300, 1.0, 2000)
    x = np.concatenate([
        np.linspace(-100.0, 100.0, 200001),   # dense, across every branch point
        tiny, -tiny, [0.0, -0.0],             # tiny: the relative error must stay small
        [1e3, -1e3, 1e30, -1e30],             # huge: saturation, no overflow to NaN
    ])
    return x.astype(dtype)


def ulp_errors(name, x):
    """|f(x) - exact| in ulps of the dtype where the exact value is a normal number,
    and the absolute error where it is subnormal."""
    dtype = x.dtype
    got = _core._activation(name, x)
    assert got.dtype == dtype and got.shape == x.shape
    assert np.isfinite(got).all(), f"{name}: non-finite results"
    exact = EXACT[name](x.astype(np.float64))
    err = np.abs(got.astype(np.float64) - exact)
    normal = np.abs(exact) >= np.finfo(dtype).tiny
    spacing = np.spacing(np.abs(exact[normal]).astype(dtype)).astype(np.float64)
    return err[normal] / spacing, x[normal], err[~normal]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", ["sigmoid", "tanh", "exp"])
def test_activation_accuracy(simd_target, name, dtype):
    x = inputs(dtype)
    if name == "exp":  # where e^x is a finite normal number (beyond, it is clamped)
        lo, hi = (-87.0, 88.0) if dtype == np.float32 else (-708.0, 709.0)
        _core._activation("exp", x)  # must not fail on the clamped part
        x = x[(x > lo) & (x < hi)]
    ulps, where, subnormal_err = ulp_errors(name, x)
    worst = int(np.argmax(ulps))
    assert ulps[worst] <= MAX_ULPS[np.dtype(dtype)], (
        f"{simd_target} {name}({where[worst]!r}): {ulps[worst]:.2f} ulps")
    if subnormal_err.size:
        assert subnormal_err.max() <= 2 * np.finfo(dtype).tiny


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_activation_saturates_exactly(simd_target, name):
    for dtype in (np.float32, np.float64):
        big = np.array([50.0, 1e3, 1e30], dtype=dtype)
        assert (_core._activation(name, big) == 1).all()
        low = _core._activation(name, -big)
        if name == "tanh":
            assert (low == -1).all()
        else:
            assert (low >= 0).all() and (low < 1e-20).all()


@pytest.mark.parametrize("n", [0, 1, 3, 7, 8, 9, 15, 16, 17, 33])
def test_activation_tails(simd_target, n):
    """Every length, so that full vectors and the partial tail are both exercised."""
    x = np.linspace(-3, 3, n).astype(np.float32)
    got = _core._activation("tanh", x)
    np.testing.assert_allclose(got, np.tanh(x.astype(np.float64)), rtol=1e-6, atol=1e-7)


def _produces_denormal():
    # 1e-38 / 1e3 = 1e-41 is a float32 denormal; with FTZ left set it would be 0.
    return np.float32(1e-38) / np.float32(1e3) != 0


@pytest.mark.parametrize("bidirectional", [False, True])
def test_kernels_restore_the_callers_denormal_state(simd_target, bidirectional):
    assert _produces_denormal()
    rng = np.random.default_rng(0)
    params = reference.init_params("LSTM", 3, 4, 2, True, bidirectional, 0, np.float32, rng)
    D = 2 if bidirectional else 1
    x = rng.standard_normal((4, 2, 3)).astype(np.float32)
    hx = (np.zeros((2 * D, 2, 4), np.float32), np.zeros((2 * D, 2, 4), np.float32))
    y, _, _, cache = _fused.forward("LSTM", x, hx, params, num_layers=2,
                                    bidirectional=bidirectional, training=True)
    assert _produces_denormal()
    _fused.backward(cache, np.ones_like(y))
    assert _produces_denormal()
    with pytest.raises(ValueError):  # and on the way out of an error
        _fused.forward("LSTM", x, hx, params, num_layers=2, bidirectional=bidirectional,
                       lengths=np.array([0, 4]))
    assert _produces_denormal()
