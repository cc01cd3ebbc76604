"""Recurrent dropout in the fused kernels against the reference (whose oracles are in
reference/test_regularizers_reference.py): every cell, every path (the pool's, the
direct one of few rows, the short backward), projection, lengths, both directions, 1
and 2 threads, every SIMD target."""

import numpy as np
import pytest

from helpers import BACKENDS, VARIANTS, Case, assert_close

pytestmark = pytest.mark.skipif("fused" not in BACKENDS, reason="the fused kernels are not built")

from lstmfast import _fused, reference  # noqa: E402

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU", "CTRNN_TANH", "CTRNN_RELU", "LN_LSTM", "GRU_RESET_BEFORE")
SHAPES = {  # T, N, H: the pool's path, the direct path of few rows, a short call
    "pool": dict(T=7, N=9, H=13),
    "direct": dict(T=3, N=2, H=6),
    "short": dict(T=2, N=1, H=5),
}
OPTIONS = {
    "plain": dict(),
    "layers_bidirectional_lengths": dict(L=2, bidirectional=True, lengths="random", dropout=True),
}


def masked_case(mode, shape, options, p=0.4, seed=0):
    dtype, cell_options = VARIANTS.get(mode, (np.float32, None))
    config = dict(SHAPES[shape], **options)
    rng = np.random.default_rng(seed)
    if config.get("lengths") == "random":
        config["lengths"] = list(rng.integers(1, config["T"] + 1, config["N"]))
    case = Case(mode, dtype, seed=seed, cell_options=cell_options, **config)
    D = 2 if config.get("bidirectional") else 1
    H_out = config.get("P") or config["H"]
    keep = rng.random((config.get("L", 1) * D, config["N"], H_out)) >= p
    case.kwargs["recurrent_dropout_masks"] = (keep / (1 - p)).astype(dtype)
    return case


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("threads", [1, 2])
def test_recurrent_dropout_matches_the_reference(simd_target, threads_restored, mode, shape,
                                                  options, threads):
    import lstmfast

    lstmfast.set_num_threads(threads)
    masked_case(mode, shape, OPTIONS[options]).check()


@pytest.mark.parametrize("P", [2, 4])
def test_recurrent_dropout_with_projection(simd_target, P):
    case = masked_case("LSTM", "pool", dict(L=2, bidirectional=True, P=P, lengths="random"))
    case.check()


def test_masks_matter_and_all_ones_is_no_mask():
    case = masked_case("LSTM", "pool", dict())
    masked = case.run(_fused)
    case.kwargs["recurrent_dropout_masks"] = np.ones_like(case.kwargs["recurrent_dropout_masks"])
    ones = case.run(_fused)
    del case.kwargs["recurrent_dropout_masks"]
    plain = case.run(_fused)
    assert not np.allclose(masked[0][0], plain[0][0])
    np.testing.assert_array_equal(ones[0][0], plain[0][0])
    for name in plain[1][3]:
        np.testing.assert_array_equal(ones[1][3][name], plain[1][3][name])


def test_masks_are_checked():
    case = masked_case("GRU", "pool", dict())
    mask = case.kwargs.pop("recurrent_dropout_masks")
    with pytest.raises(ValueError, match=r"recurrent_dropout_masks: expected shape \(1, 9, 13\)"):
        _fused.forward(case.mode, case.x, case.hx, case.params, training=True,
                       recurrent_dropout_masks=mask[:, :5], **case.kwargs)
    # masks apply whenever given, in inference too (the caller decides: training mode)
    for backend in (_fused, reference):
        for training in (False, True):
            out = backend.forward(case.mode, case.x, case.hx, case.params, training=training,
                                  recurrent_dropout_masks=mask, **case.kwargs)[0]
            expected = reference.forward(case.mode, case.x, case.hx, case.params,
                                         recurrent_dropout_masks=mask, **case.kwargs)[0]
            assert_close(out, expected, name="output")


def test_weight_gradient_uses_the_masked_h():
    """dW_hh = sum of dG^T (h * M): a mask of zeros on a unit leaves its column of dW_hh 0."""
    case = masked_case("RNN_TANH", "pool", dict())
    mask = np.ones_like(case.kwargs["recurrent_dropout_masks"])
    mask[..., 3] = 0
    case.kwargs["recurrent_dropout_masks"] = mask
    grads = case.run(_fused)[1][3]
    assert np.all(grads["weight_hh_l0"][:, 3] == 0)
    assert np.all(grads["weight_hh_l0"][:, 2] != 0)
    assert_close(grads["weight_hh_l0"], case.run(reference)[1][3]["weight_hh_l0"], name="dW_hh")


# --- zoneout ---------------------------------------------------------------------------

ZONEOUT_MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU", "GRU_RESET_BEFORE")


def zoned_case(mode, shape, options, zoneout=(0.3, 0.4), eval_form=False, recurrent_dropout=0.0,
               seed=0):
    """A Case with zoneout masks (fresh each step, 1 keeps the old value) or, with
    eval_form, the probabilities themselves; c's only for the LSTM."""
    case = masked_case(mode, shape, options, p=recurrent_dropout or 0.4, seed=seed)
    if not recurrent_dropout:
        del case.kwargs["recurrent_dropout_masks"]
    p_h, p_c = zoneout if mode == "LSTM" else (zoneout[0], None)
    if eval_form:
        case.kwargs["zoneout_masks"] = (p_h, p_c)
        return case
    rng = np.random.default_rng(seed + 1)
    T, N, _ = case.x.shape
    LD = case.kwargs["num_layers"] * (2 if case.kwargs["bidirectional"] else 1)
    H_out = case.d_h_n.shape[2]
    H = case.d_c_n.shape[2] if case.d_c_n is not None else H_out

    def draw(p, width):
        return None if p is None else (rng.random((LD, T, N, width)) < p).astype(case.dtype)

    case.kwargs["zoneout_masks"] = (draw(p_h, H_out), draw(p_c, H))
    return case


@pytest.mark.parametrize("mode", ZONEOUT_MODES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("form", ["masks", "eval", "masks_and_recurrent_dropout"])
@pytest.mark.parametrize("threads", [1, 2])
def test_zoneout_matches_the_reference(simd_target, threads_restored, mode, shape, options, form,
                                       threads):
    import lstmfast

    lstmfast.set_num_threads(threads)
    zoned_case(mode, shape, OPTIONS[options], eval_form=form == "eval",
               recurrent_dropout=0.25 if form == "masks_and_recurrent_dropout" else 0.0).check()


@pytest.mark.parametrize("mode", ZONEOUT_MODES)
@pytest.mark.parametrize("shape", ["pool", "direct"])
@pytest.mark.parametrize("threads", [1, 2])
def test_zoneout_with_onnx_clip(simd_target, threads_restored, mode, shape, threads):
    """Training with a clip keeps pre-activations where the cells keep their gates (and
    the RNN where it keeps h~ for zoneout): zoneout and recurrent dropout read them."""
    import lstmfast

    lstmfast.set_num_threads(threads)
    case = zoned_case(mode, shape, OPTIONS["layers_bidirectional_lengths"], recurrent_dropout=0.25)
    case.x *= 2  # the clip then bounds many pre-activations
    case.kwargs["clip"] = 0.6
    assert _fused.kernel_gate_options(mode, clip=0.6) is not None
    case.check()


@pytest.mark.parametrize("form", ["masks", "eval"])
@pytest.mark.parametrize("zoneout", [(0.3, 0.4), (0.3, None), (None, 0.4)])
def test_zoneout_of_a_projected_lstm(simd_target, form, zoneout):
    zoned_case("LSTM", "pool", dict(L=2, bidirectional=True, P=4, lengths="random"),
               zoneout=zoneout, eval_form=form == "eval").check()


@pytest.mark.parametrize("threads", [1, 2])
def test_zoneout_fresh_gradients_overwrite_whatever_their_memory_held(threads_restored, threads):
    import lstmfast

    lstmfast.set_num_threads(threads)
    for mode in ZONEOUT_MODES:
        case = zoned_case(mode, "pool", OPTIONS["layers_bidirectional_lengths"], recurrent_dropout=0.3)
        cache = case.forward(_fused)[3]
        back = _fused.fresh_gradients_backward(
            cache, case.d_output, case.d_h_n, case.d_c_n,
            empty=lambda shape, dtype: np.full(shape, np.nan, dtype))
        _, rback = case.run(reference)
        for name in rback[3]:
            assert_close(back[3][name], rback[3][name], name=f"{mode} grads[{name!r}]")


def test_zoneout_is_refused_where_the_kernels_lack_it():
    case = zoned_case("LSTM", "pool", dict())
    gru = reference.init_params("GRU", 4, 13, 1, True, False, 0, np.float32, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"zoneout_masks\[1\]: only an LSTM has a cell state"):
        _fused.forward("GRU", case.x, case.hx[0], gru, num_layers=1, bidirectional=False,
                       zoneout_masks=(None, 0.1))
    ctrnn = reference.init_params("CTRNN_TANH", 4, 13, 1, True, False, 0, np.float32,
                                  np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"zoneout is supported for LSTM, GRU, RNN_TANH, RNN_RELU.*, not CTRNN_TANH"):
        _fused.forward("CTRNN_TANH", case.x, case.hx[0], ctrnn, num_layers=1, bidirectional=False,
                       zoneout_masks=(0.1, None))
    with pytest.raises(ValueError, match="probability must be in"):
        _fused.forward("LSTM", case.x, case.hx, case.params, num_layers=1, bidirectional=False,
                       zoneout_masks=(1.5, None))


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("backend", ["fused", "numpy"])
def test_numpy_cells_zone_out_as_espnet_zoneout_cell(kind, backend):
    """lstmfast's cells with zoneout against the same cell without it and ESPnet's
    formula, new = m old + (1 - m) new, forward and backward; eval's expectation."""
    import lstmfast

    is_lstm = kind == "LSTMCell"
    ours = getattr(lstmfast, kind)(3, 4, zoneout=(0.2, 0.3) if is_lstm else 0.2,
                                   dtype="float64", backend=backend, seed=1)
    plain = getattr(lstmfast, kind)(3, 4, dtype="float64", backend="numpy", seed=1)
    plain.load_state_dict(ours.state_dict())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3))
    old = (rng.standard_normal((2, 4)), rng.standard_normal((2, 4)))
    masks = ((rng.random((2, 4)) < 0.3) * 1.0, (rng.random((2, 4)) < 0.3) * 1.0)
    if not is_lstm:
        old, masks = old[:1], (masks[0], None)
    got = ours(x, old if is_lstm else old[0], zoneout_mask=masks)
    new = plain(x, old if is_lstm else old[0])
    got, new = (got, new) if is_lstm else ((got,), (new,))
    for g, n, o, m in zip(got, new, old, masks):
        assert_close(g, m * o + (1 - m) * n, name="zoned state")
    # backward: (1 - m) of the gradient through the cell, m of it straight to the old state
    grads = [rng.standard_normal((2, 4)) for _ in got]
    back = ours.backward(*grads) if is_lstm else ours.backward(grads[0])
    plain_back = plain.backward(*[(1 - m) * g for g, m in zip(grads, masks)]) if is_lstm else \
        plain.backward((1 - masks[0]) * grads[0])
    assert_close(back[0], plain_back[0], name="grad x")
    d_old = back[1] if is_lstm else (back[1],)
    d_plain = plain_back[1] if is_lstm else (plain_back[1],)
    for d, dp, g, m in zip(d_old, d_plain, grads, masks):
        assert_close(d, dp + m * g, name="grad of the old state")
    for name in plain.grad:
        assert_close(ours.grad[name], plain.grad[name], name=name)
    ours.eval()
    plain.eval()
    got = ours(x, old if is_lstm else old[0])
    new = plain(x, old if is_lstm else old[0])
    got, new = (got, new) if is_lstm else ((got,), (new,))
    for g, n, o, p in zip(got, new, old, ours.zoneout):
        assert_close(g, p * o + (1 - p) * n, name="eval expectation")


# --- zoneout masks drawn inside the kernels ---------------------------------------------


@pytest.mark.parametrize("mode", ZONEOUT_MODES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_masks_drawn_from_a_seed_are_the_references_on_every_target_and_thread_count(
        simd_target, threads_restored, mode, shape, threads):
    """The counter-based generator: the kernels draw in forward, and again in backward,
    exactly reference.zoneout_masks_from_seed's masks, whatever the instruction set and
    the thread count (the check would fail on a single differing mask)."""
    import lstmfast

    lstmfast.set_num_threads(threads)
    case = zoned_case(mode, shape, OPTIONS["layers_bidirectional_lengths"], recurrent_dropout=0.3)
    case.kwargs["zoneout_masks"] = (0.3, 0.2 if mode == "LSTM" else None)
    case.kwargs["zoneout_seed"] = 2**63 + 12345
    case.check()


def test_seeded_masks_have_the_probability_and_differ_by_seed_layer_state_and_step():
    masks = reference.zoneout_masks_from_seed(7, (0.3, 0.1), 2, 60, 16, (64, 32))
    assert masks[0].shape == (2, 60, 16, 64) and masks[1].shape == (2, 60, 16, 32)
    assert abs(masks[0].mean() - 0.3) < 0.01 and abs(masks[1].mean() - 0.1) < 0.01
    assert not np.array_equal(masks[0][0], masks[0][1])          # layer-directions
    assert not np.array_equal(masks[0][0, 0], masks[0][0, 1])    # steps
    assert not np.array_equal(masks[0][0, 0, 0, :32], masks[1][0, 0, 0] > 0.5)  # h and c
    other = reference.zoneout_masks_from_seed(8, (0.3, None), 2, 60, 16, (64, 32))
    assert other[1] is None and not np.array_equal(other[0], masks[0])
    ones = reference.zoneout_masks_from_seed(7, (1.0, 0.0), 1, 2, 2, (3, 3))
    assert ones[0].min() == 1 and ones[1].max() == 0


def test_layers_draw_zoneout_masks_from_their_seed_in_both_backends():
    import lstmfast

    x = np.random.default_rng(0).standard_normal((20, 4, 3)).astype(np.float64)
    results = []
    for backend in ("fused", "numpy"):
        layer = lstmfast.LSTM(3, 6, num_layers=2, zoneout=(0.2, 0.3), recurrent_dropout=0.2,
                              dtype="float64", backend=backend, seed=5)
        out, _ = layer(x)
        layer.backward(np.ones_like(out))
        results.append((out, layer.grad["weight_hh_l1"]))
    for a, b in zip(*results):
        assert_close(a, b, name="same seed, same masks")


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("backend", ["fused", "numpy"])
def test_cells_recurrent_dropout_is_the_layers_for_one_step(kind, backend):
    """A cell step with a recurrent dropout mask is the reference's one-step layer with it,
    forward and backward; the mask of a sequence is kept from step to step until
    reset_recurrent_dropout_mask()."""
    import lstmfast

    mode = {"LSTMCell": "LSTM", "GRUCell": "GRU", "RNNCell": "RNN_TANH"}[kind]
    cell = getattr(lstmfast, kind)(3, 4, dtype="float64", backend=backend, seed=2,
                                   recurrent_dropout=0.4)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3))
    h, c = rng.standard_normal((2, 4)), rng.standard_normal((2, 4))
    mask = ((rng.random((2, 4)) >= 0.4) / 0.6)
    state = (h, c) if mode == "LSTM" else h
    got = cell(x, state, recurrent_dropout_mask=mask)
    params = {k + "_l0": v for k, v in cell.state_dict().items()}
    hx = (h[None], c[None]) if mode == "LSTM" else h[None]
    out, h_n, c_n, cache = reference.forward(mode, x[None], hx, params, num_layers=1,
                                             bidirectional=False, recurrent_dropout_masks=mask[None],
                                             training=True)
    got = got if mode == "LSTM" else (got,)
    for g, e in zip(got, (h_n[0], c_n[0]) if mode == "LSTM" else (h_n[0],)):
        assert_close(g, e, name="state")
    dh = rng.standard_normal((2, 4))
    back = cell.backward(dh, np.zeros((2, 4))) if mode == "LSTM" else cell.backward(dh)
    dx, dh0, dc0, grads = reference.backward(cache, dh[None], None,
                                             np.zeros((1, 2, 4)) if mode == "LSTM" else None)
    assert_close(back[0], dx[0], name="grad x")
    assert_close(back[1][0] if mode == "LSTM" else back[1], dh0[0], name="grad h0")
    for name, g in cell.grad.items():
        assert_close(g, grads[name + "_l0"], name=name)
    # drawn: kept for the steps of a sequence, new after a reset
    first = cell(x, state)
    again = cell(x, state)
    for a, b in zip(*((first, again) if mode == "LSTM" else ((first,), (again,)))):
        np.testing.assert_array_equal(a, b)
    cell.reset_recurrent_dropout_mask()
    other = cell(x, state)
    assert not np.allclose(other[0] if mode == "LSTM" else other, first[0] if mode == "LSTM" else first)


def test_quantize_refuses_zoneout_but_takes_recurrent_dropout():
    import lstmfast

    with pytest.raises(ValueError, match="zoneout"):
        lstmfast.quantize(lstmfast.LSTM(3, 4, zoneout=0.1), "int8")
    layer = lstmfast.LSTM(3, 4, recurrent_dropout=0.3)  # no mask in eval: nothing to refuse
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    assert lstmfast.quantize(layer, "int8")(x)[0].shape == (5, 2, 4)


@pytest.mark.parametrize("threads", [1, 2])
def test_peephole_lstm_with_both_regularizers_matches_the_reference(simd_target, threads_restored,
                                                                    threads):
    import lstmfast

    lstmfast.set_num_threads(threads)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((20, 9, 4))
    layers = [lstmfast.LSTM(4, 13, num_layers=2, bidirectional=True, peephole=True,
                            recurrent_dropout=0.3, zoneout=(0.2, 0.3), dtype="float64",
                            backend=backend, seed=4) for backend in ("fused", "numpy")]
    lengths = rng.integers(1, 21, 9)
    results = []
    for layer in layers:
        out, (h, c) = layer(x, lengths=lengths)
        back = layer.backward(np.ones_like(out), (np.ones_like(h), np.ones_like(c)))
        results.append([out, h, c, back[0]] + [layer.grad[k] for k in sorted(layer.grad)])
    for a, b in zip(*results):
        assert_close(a, b, name="peephole with recurrent dropout and zoneout")
