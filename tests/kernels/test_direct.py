"""Short calls of few rows: the weights used in place, and the cells' lean path.

A forward of a few steps of at most 4 rows multiplies by W_ih, W_hh (and W_hr)
as they lie, on the calling thread, or, with large weights and several threads, as
one pool job whose threads each own a range of units; longer ones pack the weights
for the pool.
These shapes sit on both sides of that choice (N = 1..4, T from 1 to past the
point where packing pays), with sizes that are not a multiple of any vector
width, and must match the reference on every SIMD target. The cells (one step
per call, through their lean path) must match the NumPy backend, forward and
backward, batched and not.
"""

import numpy as np
import pytest

import lstmfast
from lstmfast import _core, reference
from helpers import VARIANTS, Case, assert_close

_fused = pytest.importorskip("lstmfast._fused")
pytestmark = pytest.mark.skipif(not _fused.available, reason="fused kernels not built")

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU", "GRU_RESET_BEFORE")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("T", [1, 2, 5, 6, 17, 21])
@pytest.mark.parametrize("N", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", MODES)
def test_few_steps_few_rows_match_reference(simd_target, threads_restored, mode, N, T, threads):
    lstmfast.set_num_threads(threads)
    Case(mode, np.float32, T=T, N=N, I=37, H=19, seed=T * 5 + N).check()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("config", [
    dict(bidirectional=True, lengths=[2, 1, 2]),
    dict(L=2, P=7, H=13, N=2, lengths=[1, 2]),
    dict(bias=False, N=4),
])
def test_short_calls_with_lengths_layers_projection(simd_target, dtype, config):
    Case("LSTM", dtype, T=2, I=9, **{"H": 11, "N": 3, **config}).check()


CELLS = {"LSTMCell": lstmfast.LSTMCell, "GRUCell": lstmfast.GRUCell, "RNNCell": lstmfast.RNNCell}


@pytest.mark.parametrize("batched", [False, True], ids=["unbatched", "batched"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(CELLS))
def test_cell_steps_match_the_numpy_backend(simd_target, name, dtype, batched):
    fused = CELLS[name](21, 13, dtype=dtype, seed=3)
    numpy = CELLS[name](21, 13, dtype=dtype, seed=3, backend="numpy")
    rng = np.random.default_rng(7)
    lead = (3,) if batched else ()
    x = rng.standard_normal(lead + (21,)).astype(dtype)
    h = rng.standard_normal(lead + (13,)).astype(dtype)
    c = rng.standard_normal(lead + (13,)).astype(dtype)
    hx = (h, c) if name == "LSTMCell" else h
    for training in (False, True):
        outs = [cell.train(training)(x, hx) for cell in (fused, numpy)]
        for _ in range(3):  # a few steps, each from the state of the one before
            outs = [cell(x, out) for cell, out in zip((fused, numpy), outs)]
        for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in outs)):
            assert_close(a, b, name=f"{name} {'train' if training else 'eval'} state")
    g = rng.standard_normal(lead + (13,)).astype(dtype)
    backs = [cell.backward(g) for cell in (fused, numpy)]
    dx, dx_ref = backs[0][0], backs[1][0]
    assert_close(dx, dx_ref, name=f"{name} grad_x")
    for key in fused.grad:
        assert_close(fused.grad[key], numpy.grad[key], name=f"{name} grad[{key!r}]")


def test_cell_sees_parameters_changed_in_place():
    cell = lstmfast.LSTMCell(8, 5, seed=0).eval()
    x = np.ones(8, np.float32)
    before = cell(x)[0]
    cell.weight_ih[...] *= 2  # a live array: the next call must use the new values
    after = cell(x)[0]
    expected = lstmfast.LSTMCell(8, 5, seed=0, backend="numpy").eval()
    expected.weight_ih[...] *= 2
    assert_close(after, expected(x)[0], name="h after an in-place update")
    assert not np.allclose(before, after)


STEP_MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU", "GRU_RESET_BEFORE")
STEP_NAMES = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


@pytest.mark.parametrize("training", [False, True], ids=["eval", "training"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("mode", STEP_MODES)
def test_cell_step_is_the_stacks_one_step(mode, dtype, bias, training):
    """_core.cell_step (the cells' entry: parameters by position) computes what
    rnn_forward computes for T = 1 and one layer, to the bit, and its cache serves the
    same backward."""
    case = Case(mode, dtype, T=1, N=3, I=11, H=7, seed=5, bias=bias)
    x, params = case.x, case.params
    h0, c0 = case.hx if case.cell_state else (case.hx, None)
    weights = [params.get(name) for name in STEP_NAMES]
    step = _core.cell_step(mode, x, h0, c0, *weights, training)
    stack = _core.rnn_forward(mode, x, h0, c0, params, num_layers=1, bidirectional=False,
                              training=training)
    for got, want, name in zip(step[:3], stack[:3], ("y", "h_n", "c_n")):
        if want is None:
            assert got is None, name
        else:
            assert np.array_equal(got, want), name
    out_ref = reference.forward(mode, x, (h0, c0) if c0 is not None else h0, params,
                                num_layers=1, bidirectional=False)
    assert_close(step[1], out_ref[1], name="h_n against the reference")
    if not training:
        assert step[3] is None
        return
    grads = [{name: np.zeros_like(w) for name, w in params.items()} for _ in range(2)]
    backs = [_core.rnn_backward(cache, case.d_output, case.d_h_n, case.d_c_n, g)
             for cache, g in ((step[3], grads[0]), (stack[3], grads[1]))]
    for got, want in zip(backs[0], backs[1]):
        assert (got is None and want is None) or np.array_equal(got, want)
    for name in params:
        assert np.array_equal(grads[0][name], grads[1][name]), name


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("mode", STEP_MODES)
def test_one_step_of_one_layer_takes_the_cells_entry(mode, dtype, monkeypatch):
    """_fused.forward sends an inference call of one step of one layer (a stream fed a
    frame at a time) to _core.cell_step, and gives what rnn_forward gives, to the bit;
    any other call keeps rnn_forward."""
    steps = []
    cell_step = _core.cell_step
    monkeypatch.setattr(_core, "cell_step", lambda *args: steps.append(args[0]) or cell_step(*args))
    calls = [  # (Case arguments, forward's training, whether cell_step serves it)
        (dict(T=1), False, True),
        (dict(T=1, bias=False), False, True),
        (dict(T=1), True, False),
        (dict(T=2), False, False),
        (dict(T=1, L=2), False, False),
        (dict(T=1, bidirectional=True), False, False),
        (dict(T=1, lengths=[1, 1, 1]), False, False),
    ]
    for config, training, lean in calls:
        case = Case(mode, dtype, N=3, I=5, H=4, seed=2, **config)
        steps.clear()
        got = case.forward(_fused, training=training)
        assert bool(steps) == lean, config
        want = _core.rnn_forward(mode, case.x, *(case.hx if case.cell_state else (case.hx, None)),
                                 case.params, training=training, **case.kwargs)
        for g, w, name in zip(got[:3], want[:3], ("output", "h_n", "c_n")):
            assert (g is None and w is None) or np.array_equal(g, w), (config, name)
    # States of another dtype are converted to x's, as on the general path.
    case = Case(mode, dtype, T=1, N=2, I=5, H=4, seed=3)
    other = np.float64 if dtype == np.float32 else np.float32
    states = case.hx if case.cell_state else (case.hx,)
    converted = [h.astype(other) for h in states]
    for hx in (converted, [h.astype(dtype) for h in converted]):
        steps.clear()
        got = _fused.forward(mode, case.x, tuple(hx) if case.cell_state else hx[0], case.params,
                             num_layers=1, bidirectional=False)
        assert steps and got[1].dtype == dtype
        if hx is converted:
            first = got
    for g, w in zip(first[:3], got[:3]):
        assert (g is None and w is None) or np.array_equal(g, w)


def test_cell_step_refuses_bad_arguments_by_name():
    case = Case("LSTM", np.float32, T=1, N=2, I=5, H=4, seed=1)
    x, (h0, c0), params = case.x, case.hx, case.params
    weights = [params[name] for name in STEP_NAMES]
    with pytest.raises(TypeError, match=r"x: expected a numpy array, got list"):
        _core.cell_step("LSTM", x.tolist(), h0, c0, *weights, False)
    with pytest.raises(ValueError, match=r"x: expected shape \(1, N, I\) \(one step\), got \(2, 5\)"):
        _core.cell_step("LSTM", x[0], h0, c0, *weights, False)
    with pytest.raises(ValueError, match=r"got \(2, 2, 5\)"):
        _core.cell_step("LSTM", np.concatenate([x, x]), h0, c0, *weights, False)
    with pytest.raises(TypeError, match=r"x: expected dtype float32 or float64, got int64"):
        _core.cell_step("LSTM", x.astype(np.int64), h0, c0, *weights, False)
    bad = list(weights)
    bad[1] = weights[1].astype(np.float64)
    with pytest.raises(TypeError, match=r"weight_hh_l0.*expected dtype float32"):
        _core.cell_step("LSTM", x, h0, c0, *bad, False)
    bad[1] = weights[1][:, :3]
    with pytest.raises(ValueError, match=r"weight_hh_l0.*expected shape \(16, 4\), got \(16, 3\)"):
        _core.cell_step("LSTM", x, h0, c0, *bad, False)
    with pytest.raises(ValueError, match=r"weight_ih_l0.*missing"):
        _core.cell_step("LSTM", x, h0, c0, None, *weights[1:], False)
    with pytest.raises(ValueError, match=r"c0: expected shape \(1, 2, 4\)"):
        _core.cell_step("LSTM", x, h0, c0[:, :1], *weights, False)
    with pytest.raises(ValueError, match=r"mode must be one of"):
        _core.cell_step("LSTMX", x, h0, c0, *weights, False)


# Weights of 2^18 elements and more (W_ih and W_hh together: kDirectPoolWeights) take
# the direct path as one pool job: each thread multiplies x and h by its units' rows
# of every gate and does those units' math. H = 250 leaves a partial vector in the
# last thread's units; I brings each mode's weights just past the threshold. The
# GRU with the reset gate first (a second product) keeps the single-thread path.
POOL_INPUTS = {"LSTM": 70, "GRU": 110, "RNN_TANH": 800, "RNN_RELU": 800, "GRU_RESET_BEFORE": 110,
               "CTRNN_RELU": 800, "CTRNN_TANH": 800}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("config", [
    dict(T=1, N=1),
    dict(T=4, N=4, bidirectional=True, lengths=[4, 1, 3, 2]),
    dict(T=3, N=2, L=2),
], ids=["one_step", "bidirectional_lengths", "two_layers"])
@pytest.mark.parametrize("mode", list(POOL_INPUTS))
def test_direct_calls_of_large_weights_run_on_the_pool(simd_target, threads_restored,
                                                       pool_always_threaded, mode, config, dtype):
    lstmfast.set_num_threads(2)
    options = VARIANTS[mode][1] if mode in VARIANTS else None
    case = Case(mode, dtype, I=POOL_INPUTS[mode], H=250, seed=11, cell_options=options, **config)
    case.check()  # training: forward and backward
    _core._pool_set_wake_cost_ns(0.0)  # the call is never too short to wake the workers for
    _core._pool_set_counting(True)
    eval_out = case.forward(_fused, training=False)
    counts = _core._pool_counts()
    jobs = counts["jobs"] + counts["jobs_openmp"]  # torch's OpenMP team runs them once loaded
    for got, want, name in zip(eval_out[:3], case.forward(reference, training=False)[:3],
                               ("output", "h_n", "c_n")):
        if want is not None:
            assert_close(got, want, name=f"eval {name}")
    if mode != "GRU_RESET_BEFORE":
        assert jobs >= 1, "the eval forward ran on the calling thread alone"


# A short backward (at most 16 row-steps: a cell's step) of a weight of 2^20
# elements and more runs on every thread (stack.cpp: kShortBackwardSerialWeights):
# each multiplies dG by its share of W_hh's columns, and of W_ih's for dx when W_ih
# is that big too. (I, H) per mode: W_hh just past the threshold, W_ih past it with a
# partial cache line at its end.
SHORT_BACKWARD_SIZES = {"LSTM": (523, 512), "GRU": (601, 592), "RNN_TANH": (1031, 1024),
                        "RNN_RELU": (1031, 1024), "GRU_RESET_BEFORE": (601, 592),
                        "CTRNN_TANH": (1031, 1024), "LN_LSTM": (523, 512)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("config", [dict(T=1, N=3), dict(T=4, N=2), dict(T=2, N=2, L=2)],
                         ids=["one_step", "four_steps", "two_layers"])
@pytest.mark.parametrize("mode", list(SHORT_BACKWARD_SIZES))
def test_short_backwards_of_large_weights_run_on_the_pool(simd_target, threads_restored,
                                                          pool_always_threaded, mode, config,
                                                          dtype):
    lstmfast.set_num_threads(2)
    I, H = SHORT_BACKWARD_SIZES[mode]
    options = VARIANTS[mode][1] if mode in VARIANTS else None
    case = Case(mode, dtype, I=I, H=H, seed=12, cell_options=options, **config)
    cache = case.forward(_fused)[3]
    _core._pool_set_wake_cost_ns(0.0)  # the call is never too short to wake the workers for
    _core._pool_set_counting(True)
    dx, dh0, dc0, grads = _fused.backward(cache, case.d_output, case.d_h_n, case.d_c_n)
    counts = _core._pool_counts()
    _, (rdx, rdh0, rdc0, rgrads) = case.run(reference)
    assert_close(dx, rdx, name="dx")
    assert_close(dh0, rdh0, name="dh0")
    if dc0 is not None:
        assert_close(dc0, rdc0, name="dc0")
    for name in rgrads:
        assert_close(grads[name], rgrads[name], name=f"grads[{name!r}]")
    assert counts["jobs"] + counts["jobs_openmp"] >= 1, "the backward ran on the calling thread alone"
