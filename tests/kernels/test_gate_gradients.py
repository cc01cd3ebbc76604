"""A backward that hands back its gate gradients (``_fused.gate_gradients_backward``)
and the weight gradients made from them over many steps at once
(``_fused.gate_weight_gradients``): what a cell stepped in a loop uses in training.

Oracle: the NumPy reference's backward of the same forward, at the project's
tolerances; the steps of a loop are checked against the reference's whole sequence.
"""

import numpy as np
import pytest

from lstmfast import reference

from helpers import Case, assert_close

_fused = pytest.importorskip("lstmfast._fused")
pytestmark = pytest.mark.skipif(not _fused.available, reason="fused kernels not built")

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
SHAPES = {
    "T5_N3": dict(),
    "T1_N1": dict(T=1, N=1),
    "no_bias": dict(bias=False),
    "H17_I9": dict(H=17, I=9, T=3, N=2),
    # enough rows and gate rows for two threads and OpenBLAS's GEMM
    "T20_N8_H40": dict(T=20, N=8, I=24, H=40),
}
CELL_NAMES = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


def weight_gradients(case, gates, xs, assign=True, start=None):
    """The parameter gradients from gate gradients (dG_x, dG_h, h_prev) of one or more
    calls (``gates`` and their inputs ``xs`` stacked by rows), as the anchor makes them;
    ``start``: arrays to add into (assign=False)."""
    dG_x = np.concatenate([g[0].reshape(-1, g[0].shape[-1]) for g in gates])
    dG_h = (dG_x if gates[0][1] is None
            else np.concatenate([g[1].reshape(-1, g[1].shape[-1]) for g in gates]))
    h_prev = np.concatenate([g[2].reshape(-1, g[2].shape[-1]) for g in gates])
    x = np.concatenate([x.reshape(-1, x.shape[-1]) for x in xs])
    grads = start if start is not None else {
        name: np.full(np.shape(value), np.nan, case.dtype) for name, value in case.params.items()}
    for weight, bias, dG, inputs in (("weight_ih_l0", "bias_ih_l0", dG_x, x),
                                     ("weight_hh_l0", "bias_hh_l0", dG_h, h_prev)):
        _fused.gate_weight_gradients(grads[weight], grads.get(bias), dG, inputs, assign)
    return grads


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", (np.float32, np.float64), ids=["float32", "float64"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("threads", [1, 2])
def test_gate_gradients_give_the_references_gradients(simd_target, threads_restored, mode, dtype,
                                                      shape, threads):
    import lstmfast

    lstmfast.set_num_threads(threads)
    case = Case(mode, dtype, **SHAPES[shape])
    cache = case.forward(_fused)[3]
    assert cache.hands_back_gate_grads
    dx, dh0, dc0, gates = _fused.gate_gradients_backward(cache, case.d_output, case.d_h_n,
                                                         case.d_c_n)
    T, N = case.x.shape[:2]
    G = {"LSTM": 4, "GRU": 3}.get(mode, 1)
    H = case.hx[0].shape[-1] if case.cell_state else case.hx.shape[-1]
    assert gates[0].shape == (T, N, G * H) and gates[2].shape == (T, N, H)
    assert (gates[1] is not None) == (mode == "GRU")  # only the GRU's recurrent side differs
    _, (rdx, rdh0, rdc0, rgrads) = case.run(reference)
    assert_close(dx, rdx, name="dx")
    assert_close(dh0, rdh0, name="dh0")
    if case.cell_state:
        assert_close(dc0, rdc0, name="dc0")
    grads = weight_gradients(case, [gates], [case.x])
    assert sorted(grads) == sorted(rgrads)
    for name in rgrads:
        assert_close(grads[name], rgrads[name], name=f"grads[{name!r}]")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", (np.float32, np.float64), ids=["float32", "float64"])
def test_the_steps_of_a_loop_multiplied_at_once_give_the_sequences_gradients(simd_target, mode,
                                                                             dtype):
    # A cell stepped T times (cell_forward, as the torch cells call it), each step's
    # backward handing back its gate gradients, the weight gradients multiplied once
    # over all steps: those of the whole sequence in the reference.
    case = Case(mode, dtype, T=6, N=2, I=5, H=7)
    weights = [case.params.get(name) for name in CELL_NAMES]
    state, caches = case.hx, []
    for t in range(case.x.shape[0]):
        h, c, cache = _fused.cell_forward(mode, case.x[t:t + 1], state, weights, training=True)
        caches.append(cache)
        state = (h, c) if case.cell_state else h
    dh = case.d_h_n + case.d_output[-1]
    dc = case.d_c_n
    gates = []
    for t in reversed(range(case.x.shape[0])):
        dx, dh0, dc0, step_gates = _fused.gate_gradients_backward(
            caches[t], dh[None] if dh.ndim == 2 else dh, None, dc)
        gates.insert(0, step_gates)
        dh = dh0 + (case.d_output[t - 1] if t > 0 else 0)
        dc = dc0
    grads = weight_gradients(case, gates, [case.x[t] for t in range(case.x.shape[0])])
    _, (_, rdh0, _, rgrads) = case.run(reference)
    assert_close(dh0, rdh0, name="dh0")
    for name in rgrads:
        assert_close(grads[name], rgrads[name], name=f"grads[{name!r}]")


def test_gate_weight_gradients_add_or_write_over():
    rng = np.random.default_rng(3)
    dG, inputs = rng.standard_normal((9, 12)), rng.standard_normal((9, 5))
    dW, db = rng.standard_normal((12, 5)), rng.standard_normal(12)
    expected_W, expected_b = dW + dG.T @ inputs, db + dG.sum(axis=0)
    _fused.gate_weight_gradients(dW, db, dG, inputs, assign=False)
    assert_close(dW, expected_W, name="dW added")
    assert_close(db, expected_b, name="db added")
    dW[...] = np.nan
    _fused.gate_weight_gradients(dW, None, dG, inputs, assign=True)
    assert_close(dW, dG.T @ inputs, name="dW written")


def test_gate_weight_gradients_reject_bad_arrays():
    dG, inputs = np.zeros((4, 6)), np.zeros((4, 3))
    dW, db = np.zeros((6, 3)), np.zeros(6)
    with pytest.raises(TypeError, match=r"inputs: expected dtype float64"):
        _fused.gate_weight_gradients(dW, db, dG, inputs.astype(np.float32), False)
    with pytest.raises(ValueError, match=r"inputs: expected shape \(4, 3\)"):
        _fused.gate_weight_gradients(dW, db, dG, np.zeros((5, 3)), False)
    with pytest.raises(ValueError, match=r"inputs: expected 2 dimensions"):
        _fused.gate_weight_gradients(dW, db, dG, np.zeros(4), False)
    with pytest.raises(ValueError, match=r"dW: expected shape \(6, 3\), got \(3, 6\)"):
        _fused.gate_weight_gradients(np.zeros((3, 6)), db, dG, inputs, False)
    with pytest.raises(ValueError, match=r"db: expected shape \(6,\), got \(5,\)"):
        _fused.gate_weight_gradients(dW, np.zeros(5), dG, inputs, False)
    with pytest.raises(ValueError, match=r"dW: must be a writeable C-contiguous array"):
        _fused.gate_weight_gradients(np.zeros((3, 6)).T, db, dG, inputs, False)
    read_only = np.zeros((6, 3))
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match=r"dW: must be a writeable"):
        _fused.gate_weight_gradients(read_only, db, dG, inputs, False)
    with pytest.raises(TypeError, match=r"dG: expected a numpy array, got list"):
        _fused.gate_weight_gradients(dW, db, [[0.0]], inputs, False)


def _peephole(case):
    H = case.hx[0].shape[-1]
    for name in ("weight_ci_l0", "weight_cf_l0", "weight_co_l0"):
        case.params[name] = np.full(H, 0.1, case.dtype)


def _recurrent_dropout(case):
    case.kwargs["recurrent_dropout_masks"] = np.ones((1, 3, 6), case.dtype)


def _zoneout(case):
    case.kwargs["zoneout_masks"] = (0.2, 0.1)
    case.kwargs["zoneout_seed"] = 1


# Calls whose weight gradients are not products of gate gradients with x and h alone,
# or whose steps are not x's rows in order: they refuse to hand back gate gradients.
REFUSED = {
    "bidirectional": ("LSTM", dict(bidirectional=True), None),
    "two_layers": ("GRU", dict(L=2), None),
    "lengths": ("LSTM", dict(lengths=[5, 2, 4]), None),
    "projection": ("LSTM", dict(H=8, P=3), None),
    "reverse": ("RNN_TANH", dict(cell_options={"reverse": True}), None),
    "gru_reset_before": ("GRU_RESET_BEFORE", dict(), None),
    "ln_lstm": ("LN_LSTM", dict(bias=False), None),
    "ctrnn": ("CTRNN_TANH", dict(cell_options={"alpha": 0.5, "leak": "inside"}), None),
    "peepholes": ("LSTM", dict(), _peephole),
    "recurrent_dropout": ("GRU", dict(), _recurrent_dropout),
    "zoneout": ("LSTM", dict(), _zoneout),
}


@pytest.mark.parametrize("what", REFUSED)
def test_calls_that_cannot_hand_back_gate_gradients_say_so(what):
    mode, config, amend = REFUSED[what]
    case = Case(mode, np.float64, **config)
    if amend:
        amend(case)
    cache = case.forward(_fused)[3]
    assert not cache.hands_back_gate_grads
    with pytest.raises(ValueError, match="cannot hand back gate gradients"):
        _fused.gate_gradients_backward(cache, case.d_output, case.d_h_n, case.d_c_n)
    # and its ordinary backward still serves
    _, back = case.run(_fused)
    _, rback = case.run(reference)
    assert_close(back[0], rback[0], name="dx")


def test_gate_gradients_take_no_parameter_gradients_and_do_not_consume():
    from lstmfast._native import _core

    case = Case("LSTM", np.float64)
    cache = case.forward(_fused)[3]
    grads = {name: np.zeros(np.shape(v)) for name, v in case.params.items()}
    with pytest.raises(ValueError, match=r"grads: must be None with gate_grads=True"):
        _core.rnn_backward(cache.core, case.d_output, case.d_h_n, case.d_c_n, grads,
                           gate_grads=True)
    with pytest.raises(ValueError, match=r"consume: must be False with gate_grads=True"):
        _core.rnn_backward(cache.core, case.d_output, case.d_h_n, case.d_c_n, None,
                           consume=True, gate_grads=True)
    # the cache still serves both kinds of backward, as often as asked
    first = _fused.gate_gradients_backward(cache, case.d_output, case.d_h_n, case.d_c_n)
    _fused.backward(cache, case.d_output, case.d_h_n, case.d_c_n)
    again = _fused.gate_gradients_backward(cache, case.d_output, case.d_h_n, case.d_c_n)
    for a, b in zip(first[3], again[3]):
        if a is not None:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", (np.float32, np.float64), ids=["float32", "float64"])
def test_gate_weight_gradients_on_two_threads(simd_target, threads_restored, pool_always_threaded,
                                              dtype):
    # Each thread takes its share of the gate rows (an odd count here): the same
    # result as one thread's, and NumPy's.
    import lstmfast
    from lstmfast._native import _core

    rng = np.random.default_rng(4)
    dG = rng.standard_normal((150, 301)).astype(dtype)
    inputs = rng.standard_normal((150, 77)).astype(dtype)
    start_W, start_b = rng.standard_normal((301, 77)).astype(dtype), rng.standard_normal(301).astype(dtype)
    results = []
    for threads in (1, 2):
        lstmfast.set_num_threads(threads)
        _core._pool_set_wake_cost_ns(0.0)  # never too short to wake the workers for
        _core._pool_set_counting(True)
        dW, db = start_W.copy(), start_b.copy()
        _fused.gate_weight_gradients(dW, db, dG, inputs, assign=False)
        jobs = _core._pool_counts()
        _core._pool_set_counting(False)
        results.append((dW, db))
        if threads == 2:
            assert jobs["jobs"] + jobs["jobs_openmp"] >= 1, "ran on the calling thread alone"
    for dW, db in results:
        assert_close(dW, start_W + dG.T @ inputs, name="dW")
        assert_close(db, start_b + dG.sum(axis=0), name="db")
