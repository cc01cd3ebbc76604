"""The per-step work on the persistent thread pool: every thread count and row count.

The forward and backward split a step's work over unit blocks of the packed
recurrent weights, with register tiles of a few batch rows; these shapes reach
every tile remainder (N = 1..8, 13), hidden sizes that are not a multiple of any
vector width, more threads than unit blocks, and thread counts changing between
calls. Results must match the reference on every SIMD target, and be identical
from one call to the next at a fixed thread count.
"""

import numpy as np
import pytest

import lstmfast
from lstmfast import _core
from test_fused import Case, _fused

pytestmark = pytest.mark.skipif(not _fused.available, reason="fused kernels not built")

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("N", [1, 2, 3, 4, 5, 6, 7, 8, 13])
@pytest.mark.parametrize("mode", MODES)
def test_rows_and_threads_match_reference(simd_target, threads_restored, mode, N, threads):
    lstmfast.set_num_threads(threads)
    H = 37 if N % 2 else 24  # 37: a partial last unit block of every width
    Case(mode, np.float32, T=4, N=N, I=5, H=H, seed=N).check()


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_lengths_bidirectional_layers_on_the_pool(simd_target, threads_restored, mode, threads):
    lstmfast.set_num_threads(threads)
    Case(mode, np.float64, T=6, N=7, I=3, H=21, L=2, bidirectional=True,
         lengths=[6, 1, 4, 6, 2, 3, 5]).check()


@pytest.mark.parametrize("mode", MODES)
def test_same_threads_same_bits_and_counts_may_change(threads_restored, mode):
    case = Case(mode, np.float32, T=5, N=6, I=7, H=40, lengths=[5, 2, 5, 3, 1, 4])
    results = {}
    for threads in (2, 1, 4, 2, 1, 4):
        lstmfast.set_num_threads(threads)
        (y, h_n, _), (dx, dh0, _, grads) = case.run(_fused)
        got = [y, h_n, dx, dh0] + [grads[k] for k in sorted(grads)]
        if threads in results:  # the same count again: the very same numbers
            for a, b in zip(got, results[threads]):
                np.testing.assert_array_equal(a, b)
        results[threads] = got
    for a, b in zip(results[1], results[4]):  # any count: equal within rounding
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_many_rows_on_one_thread(simd_target, threads_restored, mode):
    lstmfast.set_num_threads(1)  # whole register tiles of rows and remainders, finishing rows
    Case(mode, np.float32, T=4, N=21, I=5, H=19, lengths=[4] * 11 + [3, 1] * 5).check()
