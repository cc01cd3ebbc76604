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


def _compiled_simd_targets(own_cell_kernels):
    """The SIMD targets compiled in; with own_cell_kernels, only those whose cell
    kernels are their own (avx512_vnni and avx512_bf16 run avx512's and differ only
    in their reduced-precision products)."""
    if not _fused_available():
        return []
    from lstmfast import _core

    targets = _core.compiled_simd_targets()
    if own_cell_kernels:
        targets = [t for t in targets if _core.simd_target_builds(t)[0] == t]
    return targets


def _use_simd_target(name):
    """Force target ``name`` for one test and restore the one before; a target this
    CPU cannot run skips the test, saying which."""
    from lstmfast import _core

    if name not in _core.simd_targets():
        pytest.skip(f"this CPU cannot run SIMD target {name} "
                    f"(it runs: {', '.join(_core.simd_targets())})")
    before = _core.simd_target()
    _core.set_simd_target(name)
    try:
        yield name
    finally:
        _core.set_simd_target(before)


@pytest.fixture(params=_compiled_simd_targets(own_cell_kernels=True))
def simd_target(request):
    """Run the test with each instruction set's cell kernels, then restore."""
    yield from _use_simd_target(request.param)


@pytest.fixture(params=_compiled_simd_targets(own_cell_kernels=False))
def reduced_simd_target(request):
    """Every target, those that add only reduced-precision products (VNNI, BF16) too."""
    yield from _use_simd_target(request.param)


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
