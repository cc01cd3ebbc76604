"""The fused C++ kernels against the NumPy reference (the specification).

Every check runs on every SIMD target this build and CPU support: outputs, final
states, dx, dh0, dc0 and every parameter gradient, to 1e-5 (float32) / 1e-10
(float64) relative to the largest magnitude of the reference.
"""


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lstmfast import _core, reference

from helpers import VARIANTS, Case, assert_close, run_all

_fused = pytest.importorskip("lstmfast._fused")
pytestmark = pytest.mark.skipif(not _fused.available, reason="fused kernels not built")

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU", "GRU_RESET_BEFORE")
DTYPES = (np.float32, np.float64)
CONFIGS = {
    "one_layer": dict(),
    "bidirectional": dict(bidirectional=True),
    "three_layers_bidirectional": dict(L=3, bidirectional=True),
    "no_bias": dict(L=2, bias=False),
    "lengths_unsorted": dict(N=5, lengths=[3, 5, 1, 5, 2]),
    "lengths_sorted": dict(N=4, lengths=[5, 4, 4, 1]),
    "lengths_all_full": dict(N=3, lengths=[5, 5, 5]),
    "lengths_short_max": dict(N=3, lengths=[2, 3, 1]),
    "lengths_bidirectional_layers": dict(N=5, L=2, bidirectional=True, lengths=[2, 5, 3, 1, 5]),
    "dropout": dict(L=3, bidirectional=True, dropout=True),
    "dropout_lengths": dict(L=2, dropout=True, N=4, lengths=[1, 5, 3, 2]),
    "T1": dict(T=1, bidirectional=True),
    "N1": dict(N=1, L=2, bidirectional=True),
    "I1": dict(I=1),
    "H1": dict(H=1, bidirectional=True),
    "N9_lengths_bidirectional": dict(N=9, bidirectional=True, lengths=[5, 1, 4, 2, 5, 3, 3, 2, 1]),
    "H13": dict(H=13, L=2, bidirectional=True, lengths=[4, 5, 2]),
    "H17": dict(H=17, I=9),
    # 13 rows, one of them finishing at each step: the recurrent micro-kernel runs
    # every row count from 13 down to 1 (whole register tiles and each remainder),
    # over a partial last block of units.
    "every_row_count": dict(T=13, N=13, H=19, I=5, lengths=list(range(13, 0, -1))),
    # ONNX's direction="reverse": one direction from each sequence's end
    "reverse": dict(cell_options={"reverse": True}),
    "reverse_lengths_layers": dict(N=5, L=2, lengths=[3, 5, 1, 5, 2], cell_options={"reverse": True}),
    "reverse_dropout_no_bias": dict(L=3, dropout=True, bias=False, cell_options={"reverse": True}),
}
LSTM_CONFIGS = {
    "proj": dict(H=8, P=3),
    "proj_layers_bidirectional": dict(H=8, P=5, L=2, bidirectional=True, dropout=True),
    "proj_lengths_bidirectional": dict(H=13, P=7, N=4, bidirectional=True, lengths=[3, 5, 1, 4]),
    "proj_no_bias_P1": dict(H=5, P=1, bias=False, L=2),
    "proj_reverse_lengths": dict(H=8, P=3, N=3, lengths=[2, 5, 4], cell_options={"reverse": True}),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(simd_target, mode, dtype, config):
    Case(mode, dtype, **CONFIGS[config]).check()


@pytest.mark.parametrize("config", list(LSTM_CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_lstm_projection_matches_reference(simd_target, dtype, config):
    Case("LSTM", dtype, **LSTM_CONFIGS[config]).check()


# A backward that consumes the cache writes the gate gradients over the saved
# gates (LSTM, GRU) instead of into scratch: every layout of those must still
# give the reference's gradients.
@pytest.mark.parametrize("mode, config", [(mode, config) for mode in MODES for config in CONFIGS]
                         + [("LSTM", config) for config in LSTM_CONFIGS])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_consuming_backward_matches_reference(simd_target, mode, dtype, config):
    Case(mode, dtype, **{**CONFIGS, **LSTM_CONFIGS}[config]).check(consume=True)


@pytest.mark.parametrize("mode", MODES)
def test_consumed_cache_refuses_another_backward(mode):
    case = Case(mode, np.float32, N=6, T=7)
    cache = case.forward(_fused)[3]
    _fused.backward(cache, case.d_output, consume=True)
    for consume in (False, True):
        with pytest.raises(ValueError, match="used up by a backward that consumed it"):
            _fused.backward(cache, case.d_output, consume=consume)


@pytest.mark.parametrize("mode", MODES)
def test_state_gradients_default_to_zero(simd_target, mode):
    Case(mode, np.float64, L=2, bidirectional=True, lengths=[2, 5, 4]).check(
        with_state_grads=False)


@pytest.mark.parametrize("mode", MODES)
def test_without_d_output(mode):
    case = Case(mode, np.float64, L=2, bidirectional=True)
    _, _, _, cache = case.forward(_fused)
    _, _, _, rcache = case.forward(reference)
    got = _fused.backward(cache, None, case.d_h_n, case.d_c_n)
    want = reference.backward(rcache, np.zeros_like(case.d_output), case.d_h_n, case.d_c_n)
    for name, a, b in zip(("dx", "dh0", "dc0"), got[:3], want[:3]):
        if b is not None:
            assert_close(a, b, name=name)
    for name in want[3]:
        assert_close(got[3][name], want[3][name], name=name)


@pytest.mark.parametrize("mode", MODES)
def test_large_inputs_saturate_like_the_reference(simd_target, mode):
    Case(mode, np.float32, scale=30.0, H=9, bidirectional=True).check()


@pytest.mark.parametrize("mode", MODES)
def test_inference_keeps_nothing_and_matches_training(mode):
    case = Case(mode, np.float32, L=2, bidirectional=True, lengths=[5, 2, 3])
    y, h_n, c_n, cache = case.forward(_fused, training=False)
    ty, th_n, tc_n, tcache = case.forward(_fused, training=True)
    assert cache is None and tcache is not None and tcache.nbytes > 0
    np.testing.assert_array_equal(y, ty)
    np.testing.assert_array_equal(h_n, th_n)
    if mode == "LSTM":
        np.testing.assert_array_equal(c_n, tc_n)


def test_output_is_zero_past_each_length():
    case = Case("GRU", np.float32, N=4, bidirectional=True, lengths=[2, 5, 1, 3])
    y = case.forward(_fused)[0]
    for b, n in enumerate(case.kwargs["lengths"]):
        assert not y[n:, b].any()
        assert y[:n, b].all()


def test_training_caches_alive_together_keep_their_own_memory():
    """Freed training caches lend their memory to later ones; live ones never share it."""
    cases = [Case(mode, np.float32, T=9, N=7, H=11, seed=seed)
             for seed, mode in enumerate(["LSTM", "LSTM", "GRU", "LSTM"])]
    expected = [case.run(reference) for case in cases]

    def finish(i, cache):
        c = cases[i]
        back = _fused.backward(cache, c.d_output, c.d_h_n, c.d_c_n)
        (rdx, rdh0, _, rgrads) = expected[i][1]
        assert_close(back[0], rdx, name=f"case {i} dx")
        assert_close(back[1], rdh0, name=f"case {i} dh0")
        for name in rgrads:
            assert_close(back[3][name], rgrads[name], name=f"case {i} grads[{name!r}]")

    pending = {}
    for i in (0, 1):
        pending[i] = cases[i].forward(_fused)[3]
    finish(0, pending.pop(0))
    pending[2] = cases[2].forward(_fused)[3]  # may reuse case 0's memory
    pending[3] = cases[3].forward(_fused)[3]
    for i in (1, 3, 2):
        finish(i, pending.pop(i))


@pytest.mark.parametrize("mode, config", [(mode, config) for mode in MODES for config in CONFIGS]
                         + [("LSTM", config) for config in LSTM_CONFIGS]
                         + [(mode, config) for mode in VARIANTS for config in
                            ("bidirectional", "lengths_bidirectional_layers", "dropout", "N1")])
@pytest.mark.parametrize("threads", [1, 2])
def test_fresh_gradients_overwrite_whatever_their_memory_held(mode, config, threads, threads_restored):
    # The kernels write fresh gradient arrays without their being cleared: arrays
    # full of NaN must come back as the reference's gradients.
    import lstmfast

    lstmfast.set_num_threads(threads)
    dtype, options = VARIANTS.get(mode, (np.float32, None))
    config = dict({**CONFIGS, **LSTM_CONFIGS}[config])
    options = {**(options or {}), **config.pop("cell_options", {})}
    case = Case(mode, dtype, cell_options=options, **config)
    cache = case.forward(_fused)[3]
    back = _fused.fresh_gradients_backward(
        cache, case.d_output, case.d_h_n, case.d_c_n,
        empty=lambda shape, dtype: np.full(shape, np.nan, dtype))
    _, rback = case.run(reference)
    assert sorted(back[3]) == sorted(rback[3])
    for name in rback[3]:
        assert_close(back[3][name], rback[3][name], name=f"grads[{name!r}]")
    assert_close(back[0], rback[0], name="dx")


@pytest.mark.parametrize("config", ["one_layer", "three_layers_bidirectional", "lengths_unsorted",
                                    "lengths_bidirectional_layers", "dropout", "N1", "T1"])
@pytest.mark.parametrize("mode", MODES + tuple(VARIANTS))
@pytest.mark.parametrize("fresh", [False, True], ids=["adding", "fresh"])
def test_backward_without_input_gradient_gives_the_rest_unchanged(mode, config, fresh):
    # input_grad=False skips dx (the input is data): every other result must be
    # exactly that of the full backward, over every layer and direction, and the
    # gradients between layers (dx of the layers above) must still be made.
    dtype, options = VARIANTS.get(mode, (np.float64, None))
    case = Case(mode, dtype, cell_options=options, **CONFIGS[config])
    cache = case.forward(_fused)[3]
    run = _fused.fresh_gradients_backward if fresh else _fused.backward
    # the partial one first: the full one would leave its results in the scratch
    partial = run(cache, case.d_output, case.d_h_n, case.d_c_n, input_grad=False)
    full = run(cache, case.d_output, case.d_h_n, case.d_c_n)
    assert full[0] is not None and full[0].shape == case.x.shape
    assert partial[0] is None
    for name, a, b in zip(("dh0", "dc0"), full[1:3], partial[1:3]):
        if a is None:
            assert b is None, name
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert sorted(full[3]) == sorted(partial[3])
    for name in full[3]:
        np.testing.assert_array_equal(full[3][name], partial[3][name], err_msg=name)
    _, rback = case.run(reference)
    for name in rback[3]:
        assert_close(partial[3][name], rback[3][name], name=f"grads[{name!r}]")


def test_a_cell_step_backward_without_input_gradient():
    case = Case("LSTM", np.float32, T=1, N=3)
    h_n, c_n, cache = _fused.cell_forward(
        "LSTM", case.x, case.hx, [case.params[k] for k in
                                   ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")],
        training=True)
    dx, dh0, dc0, grads = _fused.fresh_gradients_backward(cache, case.d_output, case.d_h_n,
                                                          case.d_c_n, input_grad=False)
    _, rback = case.run(reference)
    assert dx is None
    assert_close(dh0, rback[1], name="dh0")
    assert_close(dc0, rback[2], name="dc0")
    for name in rback[3]:
        assert_close(grads[name], rback[3][name], name=f"grads[{name!r}]")


def test_backward_adds_into_grads_and_can_run_twice():
    case = Case("LSTM", np.float64, L=2, bidirectional=True, P=2)
    _, _, _, cache = case.forward(_fused)
    first = _fused.backward(cache, case.d_output, case.d_h_n, case.d_c_n)
    grads = {name: g.copy() for name, g in first[3].items()}
    # one gradient array that is not C-contiguous: still added into in place
    name = "weight_ih_l0"
    grads[name] = np.asfortranarray(grads[name])
    second = _fused.backward(cache, case.d_output, case.d_h_n, case.d_c_n, grads=grads)
    assert second[3] is grads
    for key in first[3]:
        assert_close(grads[key], 2 * first[3][key], name=key)
    for a, b in zip(first[:3], second[:3]):
        np.testing.assert_array_equal(a, b)


def test_any_memory_layout():
    case = Case("LSTM", np.float32, T=4, N=3, I=5, H=6, L=2, bidirectional=True)
    (y, h_n, c_n), back = case.run(_fused)
    inference = case.forward(_fused, training=False)[:3]
    # x as a transposed view, h0 and c0 Fortran-ordered, weights as strided views
    case.x = np.ascontiguousarray(case.x.transpose(1, 0, 2)).transpose(1, 0, 2)
    assert not case.x.flags.c_contiguous
    case.hx = tuple(np.asfortranarray(a) for a in case.hx)
    case.params = {k: np.asfortranarray(v) for k, v in case.params.items()}
    (y2, h_n2, c_n2), back2 = case.run(_fused)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(h_n, h_n2)
    np.testing.assert_array_equal(back[0], back2[0])
    # inference keeps no cache: the copies it makes must still live through the call
    for got, expected in zip(case.forward(_fused, training=False)[:3], inference):
        np.testing.assert_array_equal(got, expected)


def test_one_step_of_any_memory_layout():
    rng = np.random.default_rng(0)
    H, I = 6, 5
    weights = [rng.standard_normal(shape).astype(np.float32)
               for shape in ((3 * H, I), (3 * H, H), (3 * H,), (3 * H,))]
    x = rng.standard_normal((1, 2, I)).astype(np.float32)
    h0 = rng.standard_normal((1, 2, H)).astype(np.float32)
    expected = _core.cell_step("GRU", x, h0, None, *weights, False)
    strided = [np.repeat(w, 2, axis=-1)[..., ::2] for w in weights]
    assert not any(w.flags.c_contiguous for w in strided)
    got = _core.cell_step("GRU", np.asfortranarray(x), np.asfortranarray(h0), None, *strided, False)
    for a, b in zip(got[:2], expected[:2]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts_agree(threads):
    import lstmfast

    before = lstmfast.get_num_threads()
    try:
        lstmfast.set_num_threads(threads)
        Case("GRU", np.float64, L=2, bidirectional=True, lengths=[4, 5, 1]).check()
    finally:
        lstmfast.set_num_threads(before)


def test_concurrent_calls_from_python_threads():
    cases = [Case(mode, np.float64, L=2, bidirectional=True, N=4, lengths=[3, 5, 1, 2], seed=i)
             for i, mode in enumerate(MODES * 2)]
    expected = [c.run(reference) for c in cases]
    results = run_all([lambda c=c: [c.run(_fused) for _ in range(5)][-1] for c in cases])
    for (out, back), (rout, rback) in zip(results, expected):
        assert_close(out[0], rout[0], name="output")
        assert_close(back[0], rback[0], name="dx")
        for name in rback[3]:
            assert_close(back[3][name], rback[3][name], name=name)


# --- bad input: clear errors naming the argument --------------------------------


def test_rejects_integer_x():
    case = Case("GRU", np.float32)
    with pytest.raises(TypeError, match="x: expected dtype float32 or float64"):
        _fused.forward("GRU", case.x.astype(np.int64), case.hx, case.params, num_layers=1,
                       bidirectional=False)


def test_rejects_parameter_of_other_dtype():
    case = Case("GRU", np.float32)
    params = dict(case.params, weight_hh_l0=case.params["weight_hh_l0"].astype(np.float64))
    with pytest.raises(TypeError, match="weight_hh_l0"):
        _fused.forward("GRU", case.x, case.hx, params, num_layers=1, bidirectional=False)


def test_rejects_parameter_of_wrong_shape():
    case = Case("LSTM", np.float32, L=2, bidirectional=True)
    params = dict(case.params)
    params["weight_ih_l1_reverse"] = params["weight_ih_l1_reverse"][:, :-1]
    with pytest.raises(ValueError, match=r"weight_ih_l1_reverse.*expected shape \(24, 12\)"):
        _fused.forward("LSTM", case.x, case.hx, params, num_layers=2, bidirectional=True)


def test_rejects_missing_parameter():
    case = Case("RNN_TANH", np.float32)
    params = {k: v for k, v in case.params.items() if k != "weight_hh_l0"}
    with pytest.raises((ValueError, KeyError), match="weight_hh_l0"):
        _fused.forward("RNN_TANH", case.x, case.hx, params, num_layers=1, bidirectional=False)


@pytest.mark.parametrize("lengths", [[0, 5, 5], [5, 6, 1]])
def test_rejects_lengths_out_of_range(lengths):
    case = Case("GRU", np.float32, lengths=lengths)
    with pytest.raises(ValueError, match=r"lengths\[\d\] = \d is outside 1..T"):
        case.forward(_fused)


def test_rejects_wrong_state_shape():
    case = Case("LSTM", np.float32)
    with pytest.raises(ValueError, match=r"c0: expected shape \(1, 3, 6\)"):
        _fused.forward("LSTM", case.x, (case.hx[0], case.hx[1][:, :2]), case.params,
                       num_layers=1, bidirectional=False)


def test_rejects_unknown_mode_and_missing_cache():
    case = Case("GRU", np.float32)
    with pytest.raises(ValueError, match="mode must be one of"):
        _fused.forward("LSTMX", case.x, case.hx, case.params, num_layers=1, bidirectional=False)
    with pytest.raises(ValueError, match="needs the cache"):
        _fused.backward(None, case.d_output)


def test_simd_targets_and_forcing_one():
    targets = _core.simd_targets()
    assert targets[0] == "generic"
    assert _core.simd_target() in targets
    with pytest.raises(ValueError, match="unknown or unsupported SIMD target"):
        _core.set_simd_target("avx9000")


# --- property-based ---------------------------------------------------------------


@st.composite
def configs(draw):
    mode = draw(st.sampled_from(MODES))
    T = draw(st.integers(1, 6))
    N = draw(st.integers(1, 4))
    H = draw(st.integers(1, 12))
    P = draw(st.integers(0, H - 1)) if mode == "LSTM" and H > 1 and draw(st.booleans()) else 0
    L = draw(st.integers(1, 3))
    lengths = None
    if draw(st.booleans()):
        lengths = draw(st.lists(st.integers(1, T), min_size=N, max_size=N))
    direction = draw(st.sampled_from(["forward", "reverse", "bidirectional"]))
    return dict(mode=mode, dtype=draw(st.sampled_from(DTYPES)), T=T, N=N,
                I=draw(st.integers(1, 7)), H=H, P=P, L=L,
                bidirectional=direction == "bidirectional", bias=draw(st.booleans()),
                lengths=lengths, dropout=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
                cell_options={"reverse": True} if direction == "reverse" else None)


@st.composite
def variant_configs(draw):
    """The cells torch.nn lacks, on configurations as configs() draws them. The
    layer-normalized LSTM in float64 only: a float32 layer norm of a row of small
    variance is ill-conditioned, in the reference as much as in the kernels
    (test_ln_lstm.py compares float32 with the float64 reference instead)."""
    config = draw(configs())
    mode = draw(st.sampled_from(["CTRNN_TANH", "CTRNN_RELU", "LN_LSTM"]))
    if mode == "LN_LSTM":
        options = {"layer_norm_eps": draw(st.sampled_from([1e-5, 1e-3, 0.1]))}
        config["dtype"] = np.float64
    else:
        options = {"alpha": draw(st.sampled_from([1.0, 0.5, 0.1])),
                   "leak": draw(st.sampled_from(["outside", "inside"])),
                   "noise": draw(st.sampled_from([None, "draw"]))}
    options.update(config["cell_options"] or {})
    return dict(config, mode=mode, P=0, cell_options=options)


def check_on_target(config, target):
    """Case(**config).check() with the kernels of SIMD target ``target``."""
    before = _core.simd_target()
    _core.set_simd_target(target)
    try:
        Case(**config).check()
    finally:
        _core.set_simd_target(before)


# The targets with cell kernels of their own (conftest._compiled_simd_targets) that run here.
CELL_TARGETS = [t for t in _core.simd_targets() if _core.simd_target_builds(t)[0] == t]


@settings(max_examples=40, deadline=None)
@given(config=variant_configs(), target=st.sampled_from(CELL_TARGETS))
def test_random_variant_configurations_match_reference(config, target):
    check_on_target(config, target)


@settings(max_examples=30, deadline=None)
@given(config=configs(), target=st.sampled_from(CELL_TARGETS))
def test_random_configurations_match_reference(config, target):
    check_on_target(config, target)


# A call of one row adds a slice of the next 8 steps' input projection into xproj
# in the loop of each step's product (cpp/products/recurrent_product.h,
# recurrent_row_step_carrying) with the AVX-512 kernels, when a thread's share of
# W_hh is between 32 and 512 KB (cpp/drivers/drivers.h); the other targets run the
# same calls apart, checked here too. Calls long enough for the pool path (more than 20
# row-steps), whole and partial chunks of 8 steps, fewer inputs than a chunk has
# steps (slices of none), inputs and units that fill no vector, both directions,
# lengths, two layers; training (check) and inference. GRU_RESET_BEFORE (two
# products) never carries.
CARRIED_CONFIGS = {
    "T21": dict(T=21, I=4),
    "I3": dict(T=30, I=3),
    "I37_layers_bidirectional": dict(T=40, I=37, L=2, bidirectional=True, dropout=True),
    "lengths": dict(T=30, I=9, lengths=[27]),
    "reverse": dict(T=26, I=12, cell_options={"reverse": True}),  # (with lengths: projected apart)
}
FIRST_PRODUCT_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1, "GRU_RESET_BEFORE": 2,
                       "CTRNN_RELU": 1, "CTRNN_TANH": 1}


@pytest.mark.parametrize("config", list(CARRIED_CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("mode", MODES + ("CTRNN_RELU", "CTRNN_TANH"))
@pytest.mark.parametrize("threads", [1, 2])
def test_one_row_carries_the_input_projection(simd_target, threads_restored, mode, dtype, config,
                                              threads):
    import lstmfast

    lstmfast.set_num_threads(threads)
    # units that give each thread about 128 KB of W_hh, and fill no vector
    share = 128 * 1024 * threads / (FIRST_PRODUCT_GATES[mode] * np.dtype(dtype).itemsize)
    config = dict(CARRIED_CONFIGS[config])
    if mode in VARIANTS:
        config["cell_options"] = {**VARIANTS[mode][1], **config.get("cell_options", {})}
    case = Case(mode, dtype, N=1, H=int(share ** 0.5) + 3, **config)
    case.check()
    y, h_n, c_n = case.forward(_fused, training=False)[:3]
    ry, rh_n, rc_n = case.forward(reference, training=False)[:3]
    assert_close(y, ry, name="output")
    assert_close(h_n, rh_n, name="h_n")
    if c_n is not None:
        assert_close(c_n, rc_n, name="c_n")


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("threads", [1, 2])
def test_input_projection_in_chunks_of_rows(simd_target, threads_restored, mode, threads):
    # W_ih of more than 1 MiB a thread: the input is projected in chunks of at least
    # 256 rows (cpp/drivers/drivers.h, kProjectionChunkRows); N=2 and T=300 make two
    # whole chunks and a short last one. I and H, multiples of no vector width, leave
    # the packing's block transposes a part block of units and of columns.
    import lstmfast

    lstmfast.set_num_threads(threads)
    Case(mode, np.float32, T=300, N=2, I=410, H=403, lengths=[300, 171]).check()
