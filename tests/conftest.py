"""The suite's fixtures: SIMD targets, thread counts, backends. What tests share
besides fixtures (assert_close, BACKENDS, the reference's problems, the kernels'
cases) is in helpers.py, imported by name."""

import pytest

from helpers import BACKENDS, fused_available


@pytest.fixture(autouse=True, scope="session")
def small_steps_on_their_threads():
    """A call whose steps are small runs on the calling thread alone, however many
    threads are set (the floor of call_threads, stack.cpp). The suite's cases are
    small so that they are many: each runs on the threads it asks for, so that the
    pool's splits of rows and units are what they test. test_thread_pool.py checks
    the floor itself."""
    if not fused_available():
        yield
        return
    from lstmfast import _core

    _core._set_serial_step_work(0)
    yield
    _core._set_serial_step_work(-1)


def _compiled_simd_targets(own_cell_kernels):
    """The SIMD targets compiled in; with own_cell_kernels, only those whose cell
    kernels are their own (avx512_vnni and avx512_bf16 run avx512's and differ only
    in their reduced-precision products)."""
    if not fused_available():
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


@pytest.fixture
def pool_always_threaded():
    """Jobs run on all their threads even when the machine has no core free for them;
    after the test the pool stops counting what it did and learns its wake-up cost again."""
    from lstmfast import _core

    _core._pool_set_fit_to_cores(False)
    yield
    _core._pool_set_fit_to_cores(True)
    _core._pool_set_counting(False)
    _core._pool_set_wake_cost_ns(-1)  # learned again, where a test fixed it


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every backend built in this install: always "numpy", "fused" once the kernels exist."""
    return request.param

