"""Long runs do not grow memory: workspaces are reused or freed.

Resident memory (``/proc/self/statm``) is read after a warm-up and again after the
run; the difference must stay under a small bound. Linux only.
"""

import ctypes
import ctypes.util
import gc
import os
import threading

import numpy as np
import pytest

import lstmfast
from helpers import BACKENDS

STATM = "/proc/self/statm"
pytestmark = [
    pytest.mark.skipif("fused" not in BACKENDS, reason="the fused kernels are not built"),
    pytest.mark.skipif(not os.path.exists(STATM), reason="needs /proc/self/statm (Linux)"),
]
MiB = 2**20


def _malloc_trim():
    """glibc's malloc_trim, or a no-op: gives freed memory of every arena back to the OS,
    so that what is measured is memory in use, not what the allocator keeps for reuse."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return lambda pad: 0


malloc_trim = _malloc_trim()


def resident_bytes():
    gc.collect()
    malloc_trim(0)
    with open(STATM) as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def training_steps(seed=0):
    """Callables, each one forward and backward of a small fused layer or cell."""
    rng = np.random.default_rng(seed)
    layers = [
        (lstmfast.LSTM(5, 8, num_layers=2, bidirectional=True, proj_size=4, seed=1), True),
        (lstmfast.GRU(5, 8, num_layers=2, dropout=0.3, seed=2), True),
        (lstmfast.RNN(5, 8, nonlinearity="relu", batch_first=True, seed=3), False),
    ]
    cell = lstmfast.LSTMCell(5, 8, seed=4)

    def layer_step(layer, with_lengths):
        def step():
            x = rng.standard_normal((6, 3, 5)).astype(np.float32)
            lengths = rng.integers(1, 7, 3) if with_lengths else None
            out, _ = layer(x, lengths=lengths)
            layer.zero_grad()
            layer.backward(np.ones_like(out))
        return step

    def cell_step():
        h, c = cell(rng.standard_normal((3, 5)).astype(np.float32))
        cell.backward(np.ones_like(h), np.ones_like(c))

    return [layer_step(layer, n) for layer, n in layers] + [cell_step]


@pytest.fixture
def num_threads():
    before = lstmfast.get_num_threads()
    yield lstmfast.set_num_threads
    lstmfast.set_num_threads(before)


# 2 threads: fewer steps, each pays for waking threads (the directions run concurrently).
@pytest.mark.parametrize("threads, count", [(1, 10_000), (2, 2_000)])
def test_training_steps_keep_resident_memory_flat(num_threads, threads, count):
    num_threads(threads)
    steps = training_steps()
    for i in range(400):  # warm-up: workspaces, numpy's caches, the allocator's arenas
        steps[i % len(steps)]()
    before = resident_bytes()
    for i in range(count):
        steps[i % len(steps)]()
    grown = resident_bytes() - before
    assert grown < 4 * MiB, f"resident memory grew by {grown / MiB:.1f} MiB over {count} steps"


def test_10000_inference_calls_keep_resident_memory_flat(num_threads):
    num_threads(1)
    layer = lstmfast.GRU(5, 8, num_layers=2, bidirectional=True, seed=0).eval()
    x = np.ones((6, 3, 5), np.float32)
    for _ in range(400):
        layer(x)
    before = resident_bytes()
    for _ in range(10_000):
        layer(x)
    grown = resident_bytes() - before
    assert grown < 4 * MiB, f"resident memory grew by {grown / MiB:.1f} MiB over 10,000 calls"


def test_layers_and_their_caches_are_freed():
    """A pending forward keeps its inputs alive; dropping the layer frees everything."""
    def one():
        layer = lstmfast.LSTM(64, 64, num_layers=2, seed=0)  # ~0.5 MB of parameters
        layer(np.ones((50, 8, 64), np.float32))  # a pending training forward (~1 MB)

    for _ in range(20):
        one()
    before = resident_bytes()
    for _ in range(300):  # would be ~450 MB if nothing were freed
        one()
    grown = resident_bytes() - before
    assert grown < 8 * MiB, f"resident memory grew by {grown / MiB:.1f} MiB over 300 layers"


def test_scratch_of_finished_threads_is_freed():
    """Each thread's scratch block (here ~12 MB) goes away when the thread ends.

    The bound leaves room for what glibc keeps on purpose: the stacks of finished
    threads, cached for reuse up to 40 MB, with the pages they touched."""
    layer = lstmfast.GRU(64, 256, seed=0).eval()
    x = np.ones((200, 16, 64), np.float32)  # x W_ih^T for all steps: 200*16*768 floats

    def in_a_thread():
        t = threading.Thread(target=layer, args=(x,))
        t.start()
        t.join()

    for _ in range(3):
        in_a_thread()
    before = resident_bytes()
    for _ in range(60):  # would be ~700 MB if the blocks outlived their threads
        in_a_thread()
    grown = resident_bytes() - before
    assert grown < 64 * MiB, f"resident memory grew by {grown / MiB:.1f} MiB over 60 threads"
