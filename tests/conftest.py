"""Shared fixtures and comparison helpers for the test suite."""

import importlib

import numpy as np
import pytest

TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}


def _fused_available():
    try:
        module = importlib.import_module("lstmfast._fused")
    except ImportError:
        return False
    return bool(getattr(module, "available", False))


BACKENDS = ["numpy"] + (["fused"] if _fused_available() else [])


def _simd_targets():
    from lstmfast import _core

    return _core.simd_targets() if hasattr(_core, "simd_targets") else []


@pytest.fixture(params=_simd_targets())
def simd_target(request):
    """Run the test with each instruction set compiled in and supported here, then restore."""
    from lstmfast import _core

    before = _core.simd_target()
    _core.set_simd_target(request.param)
    yield request.param
    _core.set_simd_target(before)


@pytest.fixture
def threads_restored():
    """Give the test a free hand with set_num_threads: the count is restored after it."""
    import lstmfast

    before = lstmfast.get_num_threads()
    yield
    lstmfast.set_num_threads(before)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every backend built in this install: always "numpy", "fused" once the kernels exist."""
    return request.param


def tolerance(dtype):
    """The default tolerance for ``dtype``: 1e-5 for float32, 1e-10 for float64."""
    return TOLERANCE[np.dtype(dtype)]


def assert_close(actual, expected, tol=None, name="array"):
    """Assert ``|actual - expected| <= tol + tol * max|expected|`` everywhere.

    The tolerance is relative to the largest magnitude of the reference (a gradient's
    small entries are compared at the scale of its large ones). ``tol`` defaults to
    ``tolerance(expected.dtype)``. The failure message shows the max difference, where
    it is, and both values there.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (
        f"{name}: shape {actual.shape} != expected {expected.shape}")
    if tol is None:
        tol = tolerance(expected.dtype)
    if expected.size == 0:
        return
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    assert np.all(np.isfinite(a) == np.isfinite(e)), f"{name}: non-finite values differ"
    scale = float(np.max(np.abs(e)))
    bound = tol + tol * scale
    diff = np.abs(a - e)
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
    assert diff[worst] <= bound, (
        f"{name}: max |diff| = {diff[worst]:.3e} at index {tuple(int(i) for i in worst)} "
        f"(actual {a[worst]!r}, expected {e[worst]!r}) exceeds {bound:.3e} "
        f"= {tol:g} * (1 + max|expected| = {scale:.3e})")


def assert_tree_close(actual, expected, tol=None, name="value"):
    """assert_close over matching nested tuples/lists/dicts of arrays (None matches None)."""
    if expected is None:
        assert actual is None, f"{name}: expected None, got {type(actual).__name__}"
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{name}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_tree_close(actual[key], expected[key], tol, f"{name}[{key!r}]")
    elif isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected), (
            f"{name}: expected a sequence of {len(expected)}, got {actual!r:.80}")
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_tree_close(a, e, tol, f"{name}[{i}]")
    else:
        assert_close(actual, expected, tol, name)
