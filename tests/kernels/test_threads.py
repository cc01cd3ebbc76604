"""Threads: one layer shared by several Python threads, the GIL, and determinism.

* eval mode: the same layer called from 8 threads at once gives each thread the
  right result;
* the kernels release the GIL: Python code keeps running in another thread for the
  whole length of a kernel call;
* training mode: each thread's backward pairs with that thread's own forward, and
  the gradients of all threads add up in ``layer.grad``;
* determinism: the same inputs and thread count give bitwise identical outputs and
  gradients, with 1 thread and with 2.
"""

import threading
import time

import numpy as np
import pytest

import lstmfast
from helpers import BACKENDS, assert_close, run_all

FUSED = pytest.mark.skipif("fused" not in BACKENDS, reason="the fused kernels are not built")


@pytest.fixture
def num_threads():
    """Restores the thread count a test changes."""
    before = lstmfast.get_num_threads()
    yield lstmfast.set_num_threads
    lstmfast.set_num_threads(before)


def make(kind, backend, **kwargs):
    kwargs.setdefault("seed", 0)
    return getattr(lstmfast, kind)(4, 6, backend=backend, **kwargs)


CONFIGS = [
    ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=3), True),
    ("GRU", dict(bidirectional=True), True),
    ("RNN", dict(num_layers=2, nonlinearity="relu"), False),
    ("LSTM", dict(batch_first=True), False),
]


def inputs(seed, T=7, N=3, I=4):  # noqa: E741
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, N, I)).astype(np.float32)
    return x, rng.integers(1, T + 1, N)


# ------------------------------------------------------------------------------------------
# eval mode: one layer, eight threads


@FUSED
@pytest.mark.parametrize("kind, kwargs, with_lengths", CONFIGS)
def test_eval_mode_from_8_threads(kind, kwargs, with_lengths):
    layer = make(kind, "fused", **kwargs).eval()
    reference = make(kind, "numpy", **kwargs).eval()
    cases = [inputs(seed) for seed in range(8)]
    if kwargs.get("batch_first"):
        cases = [(np.ascontiguousarray(x.transpose(1, 0, 2)), n) for x, n in cases]
    expected = [reference(x, lengths=n if with_lengths else None) for x, n in cases]

    def calls(i):
        x, n = cases[i]
        return lambda: [layer(x, lengths=n if with_lengths else None) for _ in range(20)]

    results = run_all([calls(i) for i in range(8)])
    for i, repeats in enumerate(results):
        for out, h in repeats:
            assert_close(out, expected[i][0], name=f"thread {i} output")
            for a, b in zip(h if isinstance(h, tuple) else (h,),
                            expected[i][1] if isinstance(h, tuple) else (expected[i][1],)):
                assert_close(a, b, name=f"thread {i} state")


@FUSED
def test_eval_mode_cells_from_8_threads():
    cell = lstmfast.LSTMCell(4, 6, seed=1).eval()
    reference = lstmfast.LSTMCell(4, 6, seed=1, backend="numpy").eval()
    xs = [inputs(seed, T=1)[0][0] for seed in range(8)]
    expected = [reference(x) for x in xs]
    results = run_all([lambda x=x: [cell(x) for _ in range(50)] for x in xs])
    for i, repeats in enumerate(results):
        for h, c in repeats:
            assert_close(h, expected[i][0], name=f"thread {i} h")
            assert_close(c, expected[i][1], name=f"thread {i} c")


def longest_pause_of_python(call):
    """Runs ``call`` in a thread while this one runs Python as fast as it can; returns the
    longest stretch of the call's duration in which this thread made no progress, as a
    fraction of that duration. A call holding the GIL stops this thread for all of its
    time in C (close to 1); one that releases it barely pauses it (OS scheduling only)."""
    window, done = [], threading.Event()

    def worker():
        t0 = time.perf_counter()
        call()
        window.extend([t0, time.perf_counter()])
        done.set()

    ticks = []
    thread = threading.Thread(target=worker)
    thread.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
    thread.join()
    t0, t1 = window
    points = [t0] + [t for t in ticks if t0 < t < t1] + [t1]
    return max(b - a for a, b in zip(points, points[1:])) / (t1 - t0), t1 - t0


@FUSED
@pytest.mark.parametrize("training", [False, True])
def test_kernels_release_the_gil(num_threads, training):
    num_threads(1)
    layer = lstmfast.LSTM(256, 256, seed=0).train(training)
    x = np.random.default_rng(0).standard_normal((100, 8, 256)).astype(np.float32)

    def call():
        out, _ = layer(x)
        if training:
            layer.backward(np.ones_like(out))

    call()  # warm-up: workspace, pages
    # A GIL-holding kernel can never pass; a few tries only spare a loaded machine.
    tries = [longest_pause_of_python(call) for _ in range(3)]
    assert min(pause for pause, _ in tries) < 0.5, (
        f"the Python thread stood still for {[f'{p:.0%}' for p, _ in tries]} of calls lasting "
        f"{[f'{d:.3f} s' for _, d in tries]}: the kernels held the GIL")


# ------------------------------------------------------------------------------------------
# training mode: one layer, several threads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, kwargs, with_lengths", CONFIGS[:3])
def test_training_from_several_threads(backend, kind, kwargs, with_lengths):
    """Every thread's forward stays pending until its own backward; grads add up."""
    layer = make(kind, backend, **kwargs)
    oracle = make(kind, backend, **kwargs)
    n_threads, steps = 4, 5
    cases = [inputs(seed) for seed in range(n_threads)]
    grads_out = []
    expected_dx, expected_grad = [], {k: np.zeros_like(v) for k, v in oracle.grad.items()}
    for x, n in cases:  # one after the other, on the oracle
        out, _ = oracle(x, lengths=n if with_lengths else None)
        g = np.random.default_rng(len(grads_out)).standard_normal(out.shape).astype(np.float32)
        grads_out.append(g)
        oracle.zero_grad()
        expected_dx.append(oracle.backward(g)[0])
        for k, v in oracle.grad.items():
            expected_grad[k] += steps * v
    barrier = threading.Barrier(n_threads)

    def calls(i):
        x, n = cases[i]

        def go():
            dxs = []
            for _ in range(steps):
                layer(x, lengths=n if with_lengths else None)
                barrier.wait()  # every thread has a forward pending before any backward
                dxs.append(layer.backward(grads_out[i])[0])
                barrier.wait()
            return dxs

        return go

    results = run_all([calls(i) for i in range(n_threads)])
    for i, dxs in enumerate(results):
        for dx in dxs:
            assert_close(dx, expected_dx[i], name=f"thread {i} grad_x")
    for k in expected_grad:
        assert_close(layer.grad[k], expected_grad[k], tol=1e-4, name=f"grad[{k!r}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_pairs_only_with_this_threads_forward(backend):
    layer = make("GRU", backend)
    x, _ = inputs(0)
    out, _ = layer(x)
    error = []

    def other_thread():
        try:
            layer.backward(np.ones_like(out))
        except RuntimeError as exc:
            error.append(exc)

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert error and "no forward pass has run yet (in this thread" in str(error[0])
    layer.backward(np.ones_like(out))  # this thread's forward is still pending


# ------------------------------------------------------------------------------------------
# determinism


def forward_backward(layer, x, lengths, g):
    out, h = layer(x, lengths=lengths)
    layer.zero_grad()
    dx, dh = layer.backward(g)
    states = h if isinstance(h, tuple) else (h,)
    dstates = dh if isinstance(dh, tuple) else (dh,)
    return [out, *states, dx, *dstates] + [v.copy() for v in layer.grad.values()]


DETERMINISM = [
    ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=3), dict(T=30, N=5)),
    ("GRU", dict(num_layers=2, bidirectional=True, dropout=0.3), dict(T=30, N=5)),
    ("RNN", dict(bidirectional=True), dict(T=30, N=1)),
    ("LSTM", dict(), dict(T=20, N=64)),
]


@FUSED
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind, kwargs, sizes", DETERMINISM)
def test_same_inputs_and_threads_give_identical_bits(num_threads, threads, kind, kwargs, sizes):
    num_threads(threads)
    rng = np.random.default_rng(3)
    T, N = sizes["T"], sizes["N"]
    layer_kwargs = dict(kwargs, seed=5)
    x = rng.standard_normal((T, N, 4)).astype(np.float32)
    lengths = rng.integers(1, T + 1, N)
    first = None
    for _ in range(3):
        layer = make(kind, "fused", **layer_kwargs)  # the same dropout stream each time
        out, _ = layer(x, lengths=lengths)
        g = np.random.default_rng(4).standard_normal(out.shape).astype(np.float32)
        layer = make(kind, "fused", **layer_kwargs)
        result = forward_backward(layer, x, lengths, g)
        if first is None:
            first = result
        for i, (a, b) in enumerate(zip(result, first)):
            assert np.array_equal(a, b), f"result {i} differs between identical calls"
