"""The per-step work on the persistent thread pool: every thread count and row count.

The forward and backward split a step's work over unit blocks of the packed
recurrent weights, with register tiles of a few batch rows; these shapes reach
every tile remainder (N = 1..8, 13), hidden sizes that are not a multiple of any
vector width, more threads than unit blocks, and thread counts changing between
calls. Results must match the reference on every SIMD target, and be identical
from one call to the next at a fixed thread count.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import lstmfast
from lstmfast import _core, reference
from helpers import Case, assert_close, run_all

_fused = pytest.importorskip("lstmfast._fused")
pytestmark = pytest.mark.skipif(not _fused.available, reason="fused kernels not built")

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU", "GRU_RESET_BEFORE")


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


# At one thread count set, a call whose jobs get fewer threads (others hold the cores,
# and the pool fits its jobs to the cores left) gives the very same numbers: what
# a thread computes may move, how each sum runs may not (H=40: three unit blocks,
# cut 1 + 2 on two threads).
@pytest.mark.parametrize("mode,P,bidirectional", [
    ("LSTM", 0, False), ("LSTM", 0, True), ("LSTM", 13, False), ("GRU", 0, True),
    ("RNN_TANH", 0, True), ("GRU_RESET_BEFORE", 0, True), ("LN_LSTM", 0, True),
    ("CTRNN_TANH", 0, True)])
def test_the_threads_a_job_gets_leave_the_bits(threads_restored, mode, P, bidirectional):
    lstmfast.set_num_threads(2)
    case = Case(mode, np.float32, T=24, N=6, I=9, H=40, P=P, L=2, bidirectional=bidirectional)
    results = []
    for busy in (0, os.cpu_count()):  # every thread the call asks for, then none
        _core._pool_set_use_openmp(0)  # (the OpenMP team would take the job whole)
        _core._pool_set_others_running(busy)
        try:
            (y, h_n, _), (dx, dh0, _, grads) = case.run(_fused)
        finally:
            _core._pool_set_others_running(-1)
            _core._pool_set_use_openmp(1)
        results.append([y, h_n, dx, dh0] + [grads[k] for k in sorted(grads)])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


# The LSTM with a projection runs its steps on the pool too: each thread's units of
# the gates, then its columns of h' = m W_hr^T (P not a multiple of the vector width,
# fewer unit blocks of P than threads at P=13), lengths, both directions, two layers.
@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_projected_lstm_on_the_pool(simd_target, threads_restored, pool_always_threaded, dtype,
                                    threads):
    lstmfast.set_num_threads(threads)
    _core._pool_set_wake_cost_ns(0)  # no call is too short for sleeping workers here
    Case("LSTM", dtype, T=9, N=5, I=7, H=37, P=13, seed=threads).check()
    Case("LSTM", dtype, T=30, N=1, I=5, H=40, P=17, seed=threads).check()
    Case("LSTM", dtype, T=7, N=7, I=6, H=37, P=21, L=2, bidirectional=True,
         lengths=[7, 1, 4, 7, 2, 3, 5], seed=threads).check()
    if threads > 1:  # a job each way, where OpenBLAS had run each step's products
        case = Case("LSTM", dtype, T=9, N=5, I=7, H=37, P=13)
        jobs = []
        for run in (lambda: case.forward(_fused, training=False),
                    lambda: _fused.backward(case.forward(_fused)[3], case.d_output, input_grad=False)):
            _core._pool_set_counting(False)
            _core._pool_set_counting(True)
            run()
            counts = _core._pool_counts()
            jobs.append(counts["jobs"] + counts["jobs_openmp"])
        _core._pool_set_counting(False)
        assert jobs == [1, 2], jobs  # the backward's forward, then its own job


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


# ------------------------------------------------------------------------------------------
# Short calls (a cell step, a few frames) use the weights in place, and cut each product
# whose weight matrix has 2**20 elements or more over the pool by rows of W; these hidden
# sizes (input size the same) reach that for W_ih and W_hh of each cell.

BIG_HIDDEN = {"LSTM": 520, "GRU": 600, "RNN_TANH": 1030, "RNN_RELU": 1030, "GRU_RESET_BEFORE": 600}


def _check_inference(case):
    got = case.forward(_fused, training=False)
    want = case.forward(reference, training=False)
    for name, a, b in zip(("output", "h_n", "c_n"), got[:3], want[:3]):
        if b is not None:
            assert_close(a, b, name=name)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_short_calls_with_big_weights_on_the_pool(simd_target, threads_restored,
                                                  pool_always_threaded, mode, threads):
    lstmfast.set_num_threads(threads)
    for T, N, lengths in ((1, 4, None), (3, 2, [3, 1])):
        case = Case(mode, np.float32, T=T, N=N, I=BIG_HIDDEN[mode], H=BIG_HIDDEN[mode],
                    lengths=lengths, scale=0.05)
        case.check()
        _check_inference(case)


@pytest.mark.parametrize("threads", [2, 3])
def test_short_projected_lstm_with_big_weights_on_the_pool(simd_target, threads_restored,
                                                           pool_always_threaded, threads):
    lstmfast.set_num_threads(threads)
    # W_hr is 900 x 1200: above 2**20 as W_hh (4800 x 900) is
    case = Case("LSTM", np.float64, T=2, N=3, I=30, H=1200, P=900, scale=0.05)
    case.check()
    _check_inference(case)


# ------------------------------------------------------------------------------------------
# Waiting: the pool's threads spin briefly, then sleep on a futex (Linux). These force
# every wait to sleep at once, so the sleep and wake-up path runs at every barrier, at
# the end of every job and between jobs; a lost wake-up would hang, so each check runs
# in a child process with a time limit.

_SLEEPING_POOL = """
from lstmfast import _core
_core._pool_set_never_spin(True)
before = _core._pool_sleeps()
for threads, steps in ((2, 3000), (3, 500), (8, 200)):
    ran, violations = _core._pool_check_barriers(threads, steps)
    assert ran == threads, (threads, ran)
    assert violations == 0, (threads, violations)
# 5400 waits in all (threads - 1 per barrier). Not each one sleeps: a waiter whose
# partner arrives before it reads the word again goes on at once. Half of them slept
# on a fresh 4-core machine; a fifth is the floor asserted.
assert _core._pool_sleeps() - before >= 1000, _core._pool_sleeps() - before
print("ok")
"""


# A child starts as the suite does: a call of small steps on the threads it asks for
# (conftest.py).
_CHILD_START = "from lstmfast import _core as _c; _c._set_serial_step_work(0); del _c\n"


def _run_child(code, timeout=120):
    try:
        out = subprocess.run([sys.executable, "-c", _CHILD_START + code], capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the child did not finish within {timeout} s: a wait was never woken")
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_barriers_hold_when_every_wait_sleeps():
    _run_child(_SLEEPING_POOL)


def test_barriers_hold_with_spinning():
    ran, violations = _core._pool_check_barriers(2, 2000)
    assert (ran, violations) == (2, 0)


# ------------------------------------------------------------------------------------------
# The waiting policy's decisions (runtime/thread_pool.cpp), checked without timing where they can
# be: on the policy itself, on counts of what the pool did, and with margins far beyond
# any scheduling delay where threads must run.


def test_a_wait_inside_a_job_spins_as_long_whatever_came_before():
    # Learned down from long waits, as the idle spin is, the barrier spin fell below a
    # VM's wake-up latency after a gap between calls, and every step of the next call
    # slept: the limit inside a job is fixed, and longer than such a wake-up.
    limits = _core._pool_spin_limits([5_000_000] * 40)
    assert limits["job_ns"] >= 1_000_000
    assert _core._pool_spin_limits([])["job_ns"] == limits["job_ns"]


def test_the_idle_spin_follows_short_waits_and_drops_after_long_ones():
    floor, ceiling = (_core._pool_spin_limits([])[k] for k in ("idle_floor_ns", "idle_ceiling_ns"))
    short = _core._pool_spin_limits([20_000] * 64)["idle_limits_ns"]
    # four times the typical wait (an average over about the last 16, from 0 at first)
    assert short[-1] == pytest.approx(4 * 20_000 + floor, rel=0.02)
    late = _core._pool_spin_limits([20_000] * 64 + [10 * ceiling] * 64)["idle_limits_ns"]
    assert late[-1] < 1.05 * floor  # gaps between calls: soon asleep, the call wakes it early
    assert all(floor <= v <= ceiling for v in short + late)


@pytest.mark.parametrize("tid, my_cpu, cpus, allowed, action", [
    (1, 0, [0, 0], [0, 1], "move"),    # a worker woken onto the caller's CPU leaves it
    (0, 0, [0, 0], [0, 1], "yield"),   # the caller's CPU is the user's: it lets the worker run
    (1, 0, [1, 0], [0, 1], "spin"),    # each on its own CPU
    (1, 0, [0, 0], [0], "yield"),      # nowhere to move to
    (1, 2, [2, 2, 1], [1, 2], "move"),
    (2, 1, [0, 1, 1], [0, 1], "move"),
    (1, -1, [0, 0], [0, 1], "spin"),   # CPU unknown
])
def test_a_thread_sharing_a_cpu_with_another_of_its_job_stops_spinning_on_it(
        tid, my_cpu, cpus, allowed, action):
    assert _core._pool_colocation_action(tid, my_cpu, cpus, allowed) == action


def test_a_partner_late_by_a_few_hundred_microseconds_is_not_slept_on():
    # The last thread of the job is busy 300 us before every barrier (a VM's wake-up
    # takes that long): the others spin through it. A barrier spin learned from such
    # waits slept at every one (50 us ceiling). 300 us against a 2 ms spin: a sleep
    # here needs a thread kept from its core for over 1.7 ms.
    _core._pool_set_use_openmp(0)  # the pool's own threads, even where torch is loaded
    _core._pool_set_fit_to_cores(False)  # both threads, whatever else the machine runs
    _core._pool_set_counting(True)
    try:
        ran, violations = _core._pool_check_barriers(2, 40, late_ns=300_000)
        counts = _core._pool_counts()
    finally:
        _core._pool_set_counting(False)
        _core._pool_set_fit_to_cores(True)
        _core._pool_set_use_openmp(1)
    assert (ran, violations) == (2, 0)
    # A loaded machine holds a thread off its core now and then, and the partner then
    # sleeps, as it should (seen: up to 10 of 40 with another test suite on both
    # cores); a spin learned down below the 300 us sleeps at every one of them.
    assert counts["barrier_waits"] >= 40 and counts["barrier_sleeps"] < 20, counts


# Whether a job gets the cores, from the machine's running threads (/proc/loadavg, here
# given in its place): others seen by one read alone are passing through (a kernel
# thread that woke while the job's threads held every core), seen by two reads in a
# row they hold the cores; a read with none before it for long is believed alone.
# Where torch's OpenMP runtime is loaded, others are most likely its team, spinning
# after torch's last op: every read is believed, and the job runs on that team.
_JOB_AFTER_A_READ = """
import time
import numpy as np
import lstmfast
from lstmfast import _core
lstmfast.set_num_threads(2)
_core._pool_set_wake_cost_ns(0.0)  # no call is too short to wake the workers
layer = lstmfast.LSTM(16, 64, seed=0).eval()
x = np.ones((20, 4, 16), np.float32)
busy = 64  # running threads, far more than the pool's

def job_after(running):
    time.sleep(0.003)  # past the pool's next read (one a millisecond at most)
    _core._pool_set_runnable_reading(running)
    _core._pool_set_counting(False)
    _core._pool_set_counting(True)  # counts from zero
    layer(x)
    counts = _core._pool_counts()
    where = [k for k in ("jobs", "jobs_alone", "jobs_openmp") if counts[k]]
    assert len(where) == 1 and counts[where[0]] == 1, counts  # one job, after one read
    return {"jobs": "pool", "jobs_alone": "alone", "jobs_openmp": "openmp"}[where[0]]

def jobs_after(steps, tries=5):
    # (running, expected, why) in turn; each read counts on the one before it being
    # recent (kConfirmWithin, 100 ms). A process held off its core for that long (a
    # loaded CI machine) makes a step's answer the other one: such a run says nothing
    # and is run again, and only a run whose gaps all stayed short is judged.
    for _ in range(tries):
        answers, started, longest_gap = [], None, 0.0
        for running, _, _ in steps:
            before = time.monotonic()
            answers.append(job_after(running))
            after = time.monotonic()
            if started is not None:  # the two reads lay within [started, after]
                longest_gap = max(longest_gap, after - started)
            started = before
        if longest_gap < 0.08:
            for answer, (running, expected, why) in zip(answers, steps):
                assert answer == expected, (why, answers)
            return
    raise AssertionError(f"no run in {tries} kept its reads within 80 ms of each other")
"""

_PASSING_THREADS = _JOB_AFTER_A_READ + """
_core._pool_set_use_openmp(0)
jobs_after([
    (0, "pool", "no others"),
    (busy, "pool", "a thread seen once took a core from the job"),
    (busy, "alone", "threads seen twice in a row left the job its cores"),
    (busy, "alone", "threads still there gave the cores back"),
    (0, "pool", "the cores, free again, were not taken at once"),
])
time.sleep(0.3)  # longer than a read vouches for the next
assert job_after(busy) == "alone", "a read with none recent before it was not believed"
print("ok")
"""

_PASSING_THREADS_WITH_OPENMP = _JOB_AFTER_A_READ + """
import torch
torch.set_num_threads(2)
torch.ones(64, 64) @ torch.ones(64, 64)
deadline = time.monotonic() + 5
while not _core._pool_openmp_found():  # looked for at most every 100 ms
    assert time.monotonic() < deadline, "torch's OpenMP runtime was not found"
    time.sleep(0.05)
assert job_after(0) == "pool"
assert job_after(busy) == "openmp", "a read of torch's team spinning was not believed"
assert job_after(0) == "pool"
print("ok")
"""


def test_threads_seen_once_leave_a_job_its_cores():
    _run_child(_PASSING_THREADS)


def test_with_openmp_loaded_one_read_of_others_sends_the_job_to_its_team():
    pytest.importorskip("torch")
    _run_child(_PASSING_THREADS_WITH_OPENMP)


_PREPARED_POOL = """
import time
from lstmfast import _core
_core._pool_set_never_spin(True)  # idle workers sleep at once after a job
_core._pool_set_others_running(0)  # the machine's load must not decide the wake-ups here
assert _core._pool_check_barriers(2, 3) == (2, 0)
deadline = time.monotonic() + 60
while _core._pool_sleeping_workers() != 1:
    assert time.monotonic() < deadline, "the worker never went to sleep"
    time.sleep(0.001)
_core._pool_set_counting(True)
_core._pool_prepare(1)           # a call of one thread wakes nobody
assert _core._pool_counts()["prewakes"] == 0
_core._pool_prepare(2)           # a call of two wakes the sleeping worker as it starts
assert _core._pool_counts()["prewakes"] == 1, _core._pool_counts()
assert _core._pool_check_barriers(2, 3) == (2, 0)
print("ok")
"""


def test_a_call_wakes_the_sleeping_workers_as_it_starts():
    _run_child(_PREPARED_POOL)


# A worker woken by a call's start (pool_prepare) may look for work while the call
# is publishing its first job: it must take the job together with the job's
# generation, or, once done, it takes the same job again, on the caller's dead stack
# frame, and the next job waits for it forever. The publishing is slowed here so
# that the woken worker surely looks inside that window.
_WOKEN_WORKER_TAKES_A_JOB_ONCE = """
import time
from lstmfast import _core
_core._pool_set_use_openmp(0)
_core._pool_set_never_spin(True)  # idle workers sleep at once after a job
_core._pool_set_others_running(0)  # the machine's load must not decide the wake-ups here
assert _core._pool_check_barriers(2, 3) == (2, 0)
_core._pool_set_publish_delay_ns(5_000_000)
for _ in range(5):
    deadline = time.monotonic() + 60
    while _core._pool_sleeping_workers() != 1:
        assert time.monotonic() < deadline, "the worker never went to sleep"
        time.sleep(0.001)
    _core._pool_prepare(2)  # the wake-up is under way while the job is published
    assert _core._pool_check_barriers(2, 20) == (2, 0)
_core._pool_set_publish_delay_ns(0)
assert _core._pool_check_barriers(2, 20) == (2, 0)
print("ok")
"""


def test_a_worker_woken_as_a_call_starts_runs_its_job_once():
    _run_child(_WOKEN_WORKER_TAKES_A_JOB_ONCE, timeout=60)


# A call of sleeping workers that would be done before one could start runs alone;
# a longer one wakes them and runs on them. The learned wake-up cost is set here.
_SHORT_CALLS_ALONE = """
import time
import numpy as np
import lstmfast
from lstmfast import _core
lstmfast.set_num_threads(2)
_core._pool_set_use_openmp(0)
_core._pool_set_fit_to_cores(False)  # other processes' load must not decide the jobs here
_core._pool_set_never_spin(True)  # idle workers sleep at once after a job
assert _core._pool_check_barriers(2, 3) == (2, 0)
deadline = time.monotonic() + 60
while _core._pool_sleeping_workers() != 1:
    assert time.monotonic() < deadline, "the worker never went to sleep"
    time.sleep(0.001)
short = lstmfast.LSTM(16, 32, seed=0).eval()  # T=40 N=4: about 1 M multiply-adds
long = lstmfast.LSTM(256, 256, seed=0).eval()  # T=40 N=32: 268 M
x_short = np.ones((40, 4, 16), np.float32)  # 24576 a step: above the floor of small steps
x_long = np.ones((40, 32, 256), np.float32)
expected = short(x_short)[0]
for wake_cost_ns, short_jobs in ((1e9, 0), (0.0, 1)):
    _core._pool_set_wake_cost_ns(wake_cost_ns)
    _core._pool_set_counting(False)
    _core._pool_set_counting(True)
    np.testing.assert_array_equal(short(x_short)[0], expected)
    counts = _core._pool_counts()
    assert (counts["jobs"], counts["prewakes"]) == (short_jobs, short_jobs), (wake_cost_ns, counts)
    assert _core._pool_wake_cost_ns() == wake_cost_ns  # fixed: the call's wake-up taught nothing
    while _core._pool_sleeping_workers() != 1:
        time.sleep(0.001)
_core._pool_set_wake_cost_ns(200e3)  # a virtual machine's: the long call still wakes them
_core._pool_set_counting(False)
_core._pool_set_counting(True)
long(x_long)
counts = _core._pool_counts()
assert counts["prewakes"] == 1 and counts["jobs"] >= 1, counts
_core._pool_set_wake_cost_ns(-1)  # learned again, from zero, at the next wake-up
assert _core._pool_wake_cost_ns() == 0
while _core._pool_sleeping_workers() != 1:
    time.sleep(0.001)
long(x_long)
assert _core._pool_wake_cost_ns() > 0
print("ok")
"""


def test_a_short_call_of_sleeping_workers_runs_alone():
    _run_child(_SHORT_CALLS_ALONE)


# A call whose steps are small runs on the calling thread, however many threads are
# set: a barrier per step would cost more than the half of a step it saves. The floor
# is 16384 multiply-adds a step of the widest layer-direction, N x gates x H x (its
# input + H); the suite runs with it at 0 (conftest.py), this test at its default.
SMALL_STEPS = [  # (mode, N, I, H, L, bidirectional, pooled)
    ("GRU", 1, 32, 32, 1, False, False),  # 6144 a step
    ("RNN_TANH", 8, 32, 32, 1, False, False),  # 16384: at the floor
    ("RNN_TANH", 8, 33, 32, 1, False, True),  # 16640
    ("LSTM", 2, 32, 32, 1, True, False),  # 16384 a direction: they run in turn
    ("LSTM", 2, 2, 32, 2, False, False),  # layer 0 8704, layer 1 16384
    ("RNN_TANH", 8, 1, 32, 2, True, True),  # layer 0 8448, layer 1 (64 inputs) 24576
]


@pytest.mark.parametrize("mode,N,I,H,L,bidirectional,pooled", SMALL_STEPS)
def test_small_steps_run_on_the_calling_thread(threads_restored, pool_always_threaded, mode, N,
                                               I, H, L, bidirectional, pooled):  # noqa: E741
    lstmfast.set_num_threads(2)
    _core._pool_set_wake_cost_ns(0)  # no call is too short for sleeping workers here
    _core._set_serial_step_work(-1)  # the default
    try:
        case = Case(mode, np.float32, T=6, N=N, I=I, H=H, L=L, bidirectional=bidirectional)
        _core._pool_set_counting(False)
        _core._pool_set_counting(True)
        case.check()  # forward and backward against the reference
        counts = _core._pool_counts()
    finally:
        _core._set_serial_step_work(0)
        _core._pool_set_counting(False)
    # a job on the pool, on torch's OpenMP team (torch loaded by an earlier test) or,
    # no core being free, on the caller: each asked for the threads
    asked = counts["jobs"] + counts["jobs_openmp"] + counts["jobs_alone"]
    assert (asked > 0) == pooled, counts


# The input gradient of a whole sequence (dG W_ih over every step, after the time
# loop) is a job of its own: each thread its rows, OpenBLAS single-threaded. On
# OpenBLAS's own threads it ran beside the threads that had just run the loop's job,
# still spinning (torch's OpenMP team in a torch process), at about half speed.
@pytest.mark.parametrize("mode,bidirectional", [("LSTM", False), ("GRU", True)])
def test_a_sequences_input_gradient_runs_on_the_pool(threads_restored, pool_always_threaded,
                                                     mode, bidirectional):
    lstmfast.set_num_threads(2)
    _core._pool_set_wake_cost_ns(0)  # no call is too short for sleeping workers here
    T, N, I, H = 24, 6, 9, 40  # 144 rows: two blocks of rows (kStoredProductBlockRows)
    case = Case(mode, np.float32, T=T, N=N, I=I, H=H, bidirectional=bidirectional)
    jobs = {}
    for input_grad in (False, True):
        cache = case.forward(_fused)[3]
        _core._pool_set_counting(False)
        _core._pool_set_counting(True)
        dx, *_ = _fused.backward(cache, case.d_output, case.d_h_n, case.d_c_n,
                                 input_grad=input_grad)
        counts = _core._pool_counts()
        jobs[input_grad] = counts["jobs"] + counts["jobs_openmp"] + counts["jobs_alone"]
    directions = 2 if bidirectional else 1
    assert jobs[True] - jobs[False] == directions, jobs  # a product per direction
    _, (dx_reference, _, _, _) = case.run(reference)
    assert_close(dx, dx_reference, name="dx")


# Jobs as parallel regions of torch's OpenMP runtime: in a child process that loads
# torch (its wheels bring libgomp), every job forced onto the runtime's team, the
# kernels against the reference and the barriers checked; then the default, which
# takes the team only when its threads hold the cores.
_OPENMP_POOL = """
import numpy as np
import torch
import lstmfast
from lstmfast import _core
from helpers import Case

torch.set_num_threads(2)
torch.ones(256, 256) @ torch.ones(256, 256)  # the runtime starts its threads
_core._pool_set_use_openmp(2)
assert _core._pool_openmp_found()
for threads in (2, 3):
    lstmfast.set_num_threads(threads)
    assert _core._pool_check_barriers(threads, 500) == (threads, 0)
    _core._pool_set_counting(False)
    _core._pool_set_counting(True)  # from zero
    for mode in ("LSTM", "GRU", "RNN_TANH"):
        Case(mode, np.float32, T=6, N=5, I=7, H=37, seed=threads).check()
        Case(mode, np.float64, T=5, N=3, I=4, H=20, L=2, bidirectional=True,
             lengths=[5, 2, 4], seed=threads).check()
    counts = _core._pool_counts()
    assert counts["jobs_openmp"] >= 6 and counts["jobs"] == 0, counts
_core._pool_set_use_openmp(0)
_core._pool_set_counting(False)
_core._pool_set_counting(True)
assert _core._pool_check_barriers(2, 100) == (2, 0)
assert _core._pool_counts()["jobs_openmp"] == 0
print("ok")
"""


def test_jobs_run_as_regions_of_torchs_openmp_runtime():
    pytest.importorskip("torch")
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, with helpers.py
    _run_child(f"import sys; sys.path.insert(0, {tests!r})\n" + _OPENMP_POOL)


# The start of the children below: the pool with its one worker asleep, the pool's
# counts from zero, and a wait for the number of sleeping workers.
_SLEEPING_WORKER = """
import time
from lstmfast import _core

def wait_for_sleepers(n, within):
    deadline = time.monotonic() + within
    while _core._pool_sleeping_workers() != n:
        assert time.monotonic() < deadline, f"{_core._pool_sleeping_workers()} workers asleep, not {n}"
        time.sleep(0.001)

def start_a_sleeping_worker():
    _core._pool_set_never_spin(True)
    assert _core._pool_check_barriers(2, 3) == (2, 0)  # the pool starts its worker
    wait_for_sleepers(1, 60)
    _core._pool_set_never_spin(False)
    _core._pool_set_counting(True)
"""


# A job bound for torch's OpenMP team must leave the cores to that team: the call's
# start wakes none of the pool's workers for it, and a worker woken before the job
# went to the team (the cores looked free then) goes back to sleep at once instead
# of spinning out its wait for a job that never comes. Spinning, it held a core the
# team's thread needed: LSTM int8 T=100 N=8 H=256 on 2 threads took 3.6 ms a call
# in a process with torch, 1.7 without.
_OPENMP_JOBS_LEAVE_THE_CORES = """
import torch

torch.set_num_threads(2)
torch.ones(256, 256) @ torch.ones(256, 256)  # the runtime starts its threads
_core._pool_set_use_openmp(0)
_core._pool_set_others_running(0)  # the machine's load must not decide the wake-ups here
start_a_sleeping_worker()
_core._pool_set_use_openmp(2)
_core._pool_prepare(2)                             # bound for the team: nobody woken
assert _core._pool_counts()["prewakes"] == 0, _core._pool_counts()
assert _core._pool_sleeping_workers() == 1
_core._pool_set_use_openmp(0)
_core._pool_set_prewake_spin_ns(60_000_000_000)    # woken, the worker would spin for a minute
_core._pool_prepare(2)
assert _core._pool_counts()["prewakes"] == 1, _core._pool_counts()
wait_for_sleepers(0, 60)                           # it is up, spinning
_core._pool_set_use_openmp(2)
assert _core._pool_check_barriers(2, 3) == (2, 0)  # the job runs on the team ...
assert _core._pool_counts()["jobs_openmp"] == 1, _core._pool_counts()
wait_for_sleepers(1, 20)                           # ... and the worker sleeps again
print("ok")
"""


def test_jobs_on_torchs_openmp_team_leave_the_cores_to_it():
    pytest.importorskip("torch")
    _run_child(_SLEEPING_WORKER + _OPENMP_JOBS_LEAVE_THE_CORES, timeout=120)


# The same when the cores are busy: a job that will run on the caller alone wakes no
# worker at the call's start, and a worker woken before the job ran alone sleeps
# again at once rather than spin on a core the machine's other threads are using.
_ALONE_JOBS_LEAVE_THE_CORES = """
import os
import numpy as np
import lstmfast

busy = os.cpu_count()                              # every core taken by other threads
lstmfast.set_num_threads(2)
_core._pool_set_use_openmp(0)
_core._pool_set_wake_cost_ns(0.0)                  # no call is too short to wake the workers
start_a_sleeping_worker()
_core._pool_set_others_running(busy)
_core._pool_prepare(2)                             # bound for the caller alone: nobody woken
assert _core._pool_counts()["prewakes"] == 0, _core._pool_counts()
_core._pool_set_others_running(0)
_core._pool_set_prewake_spin_ns(60_000_000_000)    # woken, the worker would spin for a minute
_core._pool_prepare(2)
assert _core._pool_counts()["prewakes"] == 1, _core._pool_counts()
wait_for_sleepers(0, 60)                           # it is up, spinning
_core._pool_set_others_running(busy)
layer = lstmfast.LSTM(64, 256, seed=0).eval()
layer(np.ones((20, 16, 64), np.float32))           # its jobs run alone ...
counts = _core._pool_counts()
assert counts["jobs_alone"] >= 1 and counts["jobs"] == 0 and counts["prewakes"] == 1, counts
wait_for_sleepers(1, 20)                           # ... and the worker sleeps again
print("ok")
"""


def test_jobs_left_no_core_leave_the_cores_to_others():
    _run_child(_SLEEPING_WORKER + _ALONE_JOBS_LEAVE_THE_CORES, timeout=120)


@pytest.fixture
def never_spin():
    _core._pool_set_never_spin(True)
    yield
    _core._pool_set_never_spin(False)


@pytest.mark.parametrize("mode", MODES)
def test_kernels_match_reference_when_every_wait_sleeps(threads_restored, never_spin, mode):
    lstmfast.set_num_threads(2)
    Case(mode, np.float32, T=30, N=5, I=7, H=40, L=2, bidirectional=True,
         lengths=[30, 12, 30, 1, 25]).check()


# ------------------------------------------------------------------------------------------
# More threads than cores: set_num_threads far above the machine's cores, and several
# Python threads calling at once (one gets the pool, the others run on their own thread).


@pytest.mark.parametrize("threads", [4, 8, 64])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_more_threads_than_cores_match_reference(threads_restored, mode, threads):
    lstmfast.set_num_threads(threads)
    Case(mode, np.float32, T=40, N=8, I=32, H=64, L=2, bidirectional=True).check()
    Case(mode, np.float32, T=40, N=1, I=16, H=48).check()


def test_oversubscribed_from_several_python_threads(threads_restored):
    lstmfast.set_num_threads(8)
    cases = [Case("LSTM", np.float32, T=25, N=n, I=16, H=32, seed=n) for n in (1, 3, 8, 2)]
    expected = [c.run(reference) for c in cases]
    results = run_all([lambda c=c: [c.run(_fused) for _ in range(5)] for c in cases])
    for i, runs in enumerate(results):
        (ry, rh_n, _), (rdx, _, _, rgrads) = expected[i]
        for (y, h_n, _), (dx, _, _, grads) in runs:
            np.testing.assert_allclose(y, ry, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(h_n, rh_n, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(dx, rdx, rtol=1e-5, atol=1e-5)
            for k in rgrads:
                np.testing.assert_allclose(grads[k], rgrads[k], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
def test_with_a_busy_process_on_one_core(threads_restored):
    busy = subprocess.Popen([sys.executable, "-c",
                             "import os\nos.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
                             "while True: pass"])
    try:
        lstmfast.set_num_threads(max(2, len(os.sched_getaffinity(0))))
        for mode in MODES:
            Case(mode, np.float32, T=50, N=4, I=16, H=64, bidirectional=True).check()
    finally:
        busy.kill()
        busy.wait()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this system")
def test_a_forked_child_gets_a_pool_of_its_own(threads_restored):
    lstmfast.set_num_threads(2)
    case = Case("GRU", np.float32, T=20, N=3, I=8, H=40)
    case.check()  # the parent's pool has started its workers
    pid = os.fork()
    if pid == 0:  # the child: none of the parent's workers exist here
        code = 1
        try:
            case.check()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    case.check()
