"""lstmfast.quantize: int8 and bfloat16 inference layers (NumPy API).

Oracles: the reference's reduced products (lstmfast.reference, "Reduced
precision"), themselves checked against exact integer and float64 arithmetic
here, and the float32 layer for the accuracy contract. The torch side
(quantize_dynamic, autocast, torch's own int8 error) is in
torch_adapter/test_torch_quantized.py.
"""

import pickle

import numpy as np
import pytest

import lstmfast
from lstmfast import _core, reference
from lstmfast._fused import pack_weight

from helpers import BACKENDS, assert_close, run_all

PRECISIONS = ("int8", "bfloat16")
needs_fused = pytest.mark.skipif("fused" not in BACKENDS, reason="the fused kernels are not built")


def random_weight(rng, M, K):
    return (rng.standard_normal((M, K)) / np.sqrt(K)).astype(np.float32)


def reduced(W, precision):
    if precision == "int8":
        return reference.Int8Weight(*reference.quantize_int8(W))
    return reference.BFloat16Weight(reference.to_bfloat16_bits(W))


# ----------------------------------------------------------------------------------
# the reference's reduced arithmetic


def test_int8_weights_round_each_row_to_its_own_scale():
    rng = np.random.default_rng(0)
    W = random_weight(rng, 37, 29)
    W[5] = 0  # a row of zeros keeps a usable scale
    W[6] *= 1000  # one large row does not coarsen the others
    q, scale = reference.quantize_int8(W)
    assert q.dtype == np.int8 and scale.dtype == np.float32
    assert np.abs(q).max() == 127
    assert scale[5] == 1 and not q[5].any()
    err = np.abs(W - scale[:, None] * q.astype(np.float32))
    assert np.all(err <= scale[:, None] / 2 * (1 + 1e-6))
    with pytest.raises(ValueError, match="not finite"):
        reference.quantize_int8(np.array([[1.0, np.inf]], dtype=np.float32))


def test_activations_quantize_to_seven_bits_with_an_exact_zero():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((9, 40)).astype(np.float32)
    a[0] = np.abs(a[0])  # positive only: the range still includes 0
    a[1] = 0
    a[2, ::2] = 0
    q, scale, zero = reference.quantize_activations(a)
    assert q.min() >= 0 and q.max() <= 127
    assert scale[1] == 1 and zero[1] == 0 and not q[1].any()
    assert zero[0] == 0
    back = scale[:, None] * (q - zero[:, None])
    assert np.all(np.abs(back - a) <= scale[:, None] / 2 * (1 + 1e-5))
    assert np.all(back[2, ::2] == 0)


def test_bfloat16_rounds_to_nearest_even():
    # Oracle: the two bfloat16 neighbours of each value, computed in float64.
    rng = np.random.default_rng(2)
    W = np.concatenate([rng.standard_normal(2000).astype(np.float32),
                        np.float32([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 0.0, -0.0, np.inf])])
    got = reference.from_bfloat16_bits(reference.to_bfloat16_bits(W)).astype(np.float64)
    finite = np.isfinite(W) & (W != 0)
    bits = W[finite].view(np.uint32)
    down = (bits & np.uint32(0xFFFF0000)).view(np.float32).astype(np.float64)
    up = ((bits & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32).astype(np.float64)
    w = W[finite].astype(np.float64)
    nearest = np.where(np.abs(w - down) < np.abs(up - w), down, up)
    tie = np.abs(w - down) == np.abs(up - w)
    even = np.where(((bits >> 16) & 1) == 0, down, up)
    np.testing.assert_array_equal(got[finite], np.where(tie, even, nearest))
    assert got[-1] == np.inf and got[-3] == 0 and got[-2] == 0
    assert got[-6] == 1.0 and got[-4] == -1.0 and got[-5] == 1 + 2**-6  # ties go to even
    assert np.isnan(reference.from_bfloat16_bits(reference.to_bfloat16_bits(np.float32([np.nan]))))[0]


def test_the_reference_int8_product_is_the_exact_integer_sum_scaled():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 45)).astype(np.float32)
    W = reduced(random_weight(rng, 20, 45), "int8")
    qx, sx, zx = reference.quantize_activations(x)
    exact = (qx - zx[:, None]) @ W.q.astype(np.int64).T  # int64: exact by construction
    expected = exact.astype(np.float32) * (sx[:, None] * W.scale[None, :])
    np.testing.assert_array_equal(reference.times_transposed(x, W), expected)


def bfloat16_product_exactly(x, W):
    """x W^T for a BFloat16Weight in float64: both operands rounded to bfloat16 (the
    contract), every product and sum exact but for the float64 rounding."""
    x16 = reference.from_bfloat16_bits(reference.to_bfloat16_bits(x)).astype(np.float64)
    return x16 @ reference.from_bfloat16_bits(W.bits).astype(np.float64).T


def test_the_reference_bfloat16_product_rounds_both_operands():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 45)).astype(np.float32)
    W = reduced(random_weight(rng, 20, 45), "bfloat16")
    got = reference.times_transposed(x, W)
    assert got.dtype == np.float32
    assert_close(got, bfloat16_product_exactly(x, W).astype(np.float32), tol=1e-6)
    # against the weights alone rounded, the activations' rounding shows
    weights_only = x.astype(np.float64) @ reference.from_bfloat16_bits(W.bits).astype(np.float64).T
    assert np.abs(got - weights_only).max() > 1e-4


# ----------------------------------------------------------------------------------
# the kernels' products against the reference's, on every instruction set


# Row counts 1-7 and 70 reach the register tiles of every target (1-6 rows, with
# more panels for fewer rows); M = 200 gives 13 panels, so that one and two rows run
# whole groups of panels and the smaller ones of the remainder. AMX's tiles take 16
# rows and 64 bytes of k: 20 and 70 rows end in a shorter tile, K = 256 fills whole
# steps of k, the others end in a shorter one.
@needs_fused
@pytest.mark.parametrize("n, K, M", [(1, 5, 3), (3, 17, 33), (4, 64, 16), (7, 130, 100),
                                     (70, 33, 50), (1, 70, 200), (2, 40, 200), (5, 24, 72),
                                     (20, 256, 40)])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_int8_products_equal_the_reference_exactly(reduced_simd_target, n, K, M, threads):
    # Integer sums are exact on every path, and the scaling is the same float32
    # operations in the same order: the results are identical, not just close.
    rng = np.random.default_rng(n * 1000 + K)
    x = rng.standard_normal((n, K)).astype(np.float32) * 3
    x[0, : K // 2] = 0
    W = reduced(random_weight(rng, M, K), "int8")
    got = _core._reduced_matmul(x, pack_weight(W), threads)
    np.testing.assert_array_equal(got, reference.times_transposed(x, W))


@needs_fused
@pytest.mark.parametrize("n, K, M", [(1, 5, 3), (3, 17, 33), (7, 130, 100), (70, 33, 50),
                                     (20, 256, 40)])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_bfloat16_products_match_the_exact_products(reduced_simd_target, n, K, M, threads):
    # Products of bfloat16 values are exact in float32: only the order of the
    # float32 sums differs from float64's.
    rng = np.random.default_rng(n * 1000 + K)
    x = rng.standard_normal((n, K)).astype(np.float32)
    W = reduced(random_weight(rng, M, K), "bfloat16")
    got = _core._reduced_matmul(x, pack_weight(W), threads)
    assert_close(got, bfloat16_product_exactly(x, W).astype(np.float32), tol=1e-5)


@needs_fused
def test_packing_rejects_what_it_cannot_hold():
    with pytest.raises(TypeError, match="q: expected a 2-D int8 array"):
        _core.pack_int8(np.zeros((2, 3), np.int16), np.ones(2, np.float32))
    with pytest.raises(ValueError, match="scale: expected shape"):
        _core.pack_int8(np.zeros((2, 3), np.int8), np.ones(3, np.float32))
    with pytest.raises(ValueError, match="positive finite"):
        _core.pack_int8(np.zeros((2, 3), np.int8), np.float32([1, 0]))
    with pytest.raises(TypeError, match="bits: expected a 2-D uint16"):
        _core.pack_bfloat16(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="non-empty"):
        _core.pack_bfloat16(np.zeros((0, 3), np.uint16))
    with pytest.raises(ValueError, match="would overflow the int32 sums"):
        _core.pack_int8(np.zeros((1, 140_000), np.int8), np.ones(1, np.float32))


# ----------------------------------------------------------------------------------
# whole layers: fused against the reference


CONFIGS = [
    ("LSTM", dict()),
    ("GRU", dict()),
    ("RNN", dict(nonlinearity="relu")),
    ("LSTM", dict(num_layers=2, bidirectional=True)),
    ("GRU", dict(num_layers=2, bidirectional=True, batch_first=True)),
    ("LSTM", dict(proj_size=7, num_layers=2, bidirectional=True)),
    ("LSTM", dict(bias=False)),
    ("CTRNN", dict(alpha=0.5)),
    ("CTRNN", dict(nonlinearity="tanh", leak="inside", alpha=0.2, num_layers=2, bidirectional=True)),
    ("LayerNormLSTM", dict()),
    ("LayerNormLSTM", dict(num_layers=2, bidirectional=True)),
    ("GRU", dict(linear_before_reset=False)),
    ("GRU", dict(linear_before_reset=False, num_layers=2, bidirectional=True)),
    ("LSTM", dict(reverse=True, num_layers=2)),
    ("GRU", dict(reverse=True)),
    ("RNN", dict(reverse=True, batch_first=True)),
    # ONNX's options the kernels compute at inference (docs/onnx.md)
    ("LSTM", dict(activations=["hardsigmoid", "tanh", "tanh"], clip=0.9, input_forget=True)),
    ("GRU", dict(activations=["hardsigmoid", "tanh"], clip=0.8, bidirectional=True)),
    ("GRU", dict(linear_before_reset=False, clip=0.7)),
    ("RNN", dict(clip=0.5, nonlinearity="relu")),
]
CELL_STATE = ("LSTM", "LayerNormLSTM")


def flatten(result):
    """output, h_n (and c_n) of a layer call as one array."""
    states = result[1] if isinstance(result[1], tuple) else (result[1],)
    return np.concatenate([a.ravel() for a in (result[0],) + states])


def assert_all_close(got, expected, tol):
    """output, and h_n (and c_n) of a layer call: each within tol."""
    assert_close(got[0], expected[0], tol=tol, name="output")
    states = zip(*(r[1] if isinstance(r[1], tuple) else (r[1],) for r in (got, expected)))
    for name, (g, e) in zip(("h_n", "c_n"), states):
        assert_close(g, e, tol=tol, name=name)


def layer_pair(cls_name, options, precision, I=11, H=16, seed=5):  # noqa: E741
    cls = getattr(lstmfast, cls_name)
    fused = lstmfast.quantize(cls(I, H, seed=seed, **options), precision)
    numpy = lstmfast.quantize(cls(I, H, seed=seed, backend="numpy", **options), precision)
    return fused, numpy


def initial_state(rng, layer, cls_name, N):
    h_shape = (layer.num_layers * (2 if layer.bidirectional else 1), N,
               getattr(layer, "proj_size", 0) or layer.hidden_size)
    h0 = rng.standard_normal(h_shape).astype(np.float32)
    if cls_name in CELL_STATE:
        return h0, rng.standard_normal(h_shape[:2] + (layer.hidden_size,)).astype(np.float32)
    return h0


@needs_fused
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("cls_name, options", CONFIGS)
@pytest.mark.parametrize("N", [6, 2], ids=["widened", "in-place"])  # drivers/stack.cpp: kBf16InPlaceBatch
def test_reduced_layers_match_the_reference_in_one_step(reduced_simd_target, precision, cls_name,
                                                        options, N):
    # One step from a given state: every operand a product prepares (x, h0) is the
    # same array in both, so the products are the same (int8: identical integers;
    # bfloat16: the same rounded operands, summed in another order) and the gate math
    # differs by ulps. Over many steps h differs by ulps too, and an ulp can move a
    # value across a rounding boundary of the next step's preparation: see the next test.
    fused, numpy = layer_pair(cls_name, options, precision)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((N, 1, 11) if fused.batch_first else (1, N, 11)).astype(np.float32)
    hx = initial_state(rng, fused, cls_name, N)
    # The second layer prepares the first one's output (and a projected LSTM its
    # m): computed values, so one step of one layer is the exact comparison.
    tol = 1e-5 if fused.num_layers == 1 and not getattr(fused, "proj_size", 0) else 2e-3
    assert_all_close(fused(x, hx), numpy(x, hx), tol)


@needs_fused
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("cls_name, options", CONFIGS)
@pytest.mark.parametrize("T, N", [(9, 5), (12, 3), (5, 2)],
                         ids=["widened", "input-widened", "in-place"])  # drivers/stack.cpp: kWidenBf16Rows
def test_reduced_layers_follow_the_reference_over_sequences(reduced_simd_target, precision,
                                                            cls_name, options, T, N):
    # Where an ulp of h flips one prepared value, that value moves by one step of
    # its grid (int8: its row's scale ~ range / 127; bfloat16: 2^-8 of itself) and
    # the next products by about that times |w|: a bound of a few such steps, far
    # below either precision's own error against float32 (test_accuracy_contract...).
    fused, numpy = layer_pair(cls_name, options, precision)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((N, T, 11) if fused.batch_first else (T, N, 11)).astype(np.float32)
    for lengths in (None, rng.integers(1, T + 1, N)):
        assert_all_close(fused(x, lengths=lengths), numpy(x, lengths=lengths), 2e-3)
    hx = initial_state(rng, fused, cls_name, N)
    assert_all_close(fused(x, hx), numpy(x, hx), 2e-3)


@needs_fused
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("H, N, threads", [(13, 5, 1), (24, 3, 1), (40, 6, 2), (300, 12, 2)])
def test_reduced_gru_reset_before_second_product_across_panels(reduced_simd_target,
                                                               threads_restored, precision, H, N,
                                                               threads):
    """The second product (u W_hn^T) starts at row 2H of W_hh, inside a panel of 16
    rows unless 2H is a multiple of 16: that panel is multiplied by h and then by u.
    (300, 12) has the pool share the panels (kReducedSerialWork)."""
    lstmfast.set_num_threads(threads)
    fused, numpy = layer_pair("GRU", dict(linear_before_reset=False), precision, H=H)
    rng = np.random.default_rng(H)
    x = rng.standard_normal((7, N, 11)).astype(np.float32)
    for lengths in (None, rng.integers(1, 8, N)):
        assert_all_close(fused(x, lengths=lengths), numpy(x, lengths=lengths), 2e-3)


def pool_jobs():
    counts = _core._pool_counts()
    return counts["jobs"] + counts["jobs_openmp"]


# Layers whose step product is big enough for the pool (drivers/layer_products.h:
# kReducedSerialWork, N * G * H * H >= 2^20 for every cell, the RNN's G = 1 too).
# N = 17 gives every one of 2 or 3 threads at least kReducedRowsPerThread rows
# (drivers.h): each runs the steps of its own rows, uneven shares, finishing rows
# among them; N = 7 on 2 threads leaves the threads sharing W_hh's panels instead.
@needs_fused
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("cls_name, options", [  # the GRU and CTRNN step as the LSTM does
    ("LSTM", dict(num_layers=2, bidirectional=True)),
    ("RNN", dict(nonlinearity="relu")),
    ("GRU", dict(linear_before_reset=False)),  # a second product per step
    ("LayerNormLSTM", dict()),  # its own rows' math
    ("GRU", dict(reverse=True)),
])
def test_reduced_layers_give_the_same_bits_on_any_number_of_threads(
        reduced_simd_target, threads_restored, pool_always_threaded, precision, cls_name,
        options):
    rng = np.random.default_rng(12)
    # Each product's element is computed the same way whichever thread computes it:
    # int8 sums are exact, bfloat16 ones run in the same order. Without vdpbf16ps or
    # AMX a bfloat16 layer of many rows multiplies widened weights with OpenBLAS, whose
    # results may depend on its own thread count.
    exact = precision == "int8" or _core.simd_target() in ("avx512_bf16", "avx512_amx")
    for N, H in ((17, 256), (7, 400)):
        fused, numpy = layer_pair(cls_name, options, precision, H=H)
        x = rng.standard_normal((6, N, 11)).astype(np.float32)
        lengths = rng.integers(1, 7, N)
        hx = initial_state(rng, fused, cls_name, N)
        results = {}
        for threads in (1, 2, 3):
            lstmfast.set_num_threads(threads)
            fused(x)  # a pool of more threads starts them, and its counts, now
            _core._pool_set_wake_cost_ns(0.0)  # short calls too wake the workers
            _core._pool_set_counting(False)
            _core._pool_set_counting(True)  # from zero
            results[threads] = [fused(x), fused(x, lengths=lengths), fused(x, hx)]
            if exact:  # the reduced steps, on the pool or not (torch's team, once loaded)
                assert (pool_jobs() > 0) == (threads > 1), (threads, _core._pool_counts())
        for threads in (2, 3):
            for got, want in zip(results[threads], results[1]):
                if exact:
                    np.testing.assert_array_equal(flatten(got), flatten(want))
                else:
                    assert_close(flatten(got), flatten(want), tol=1e-5)
        if N == 17:  # the rows' own steps against the reference
            lstmfast.set_num_threads(2)
            assert_all_close(results[2][1], numpy(x, lengths=lengths), 2e-3)


# A call of one int8 row carries its input projection along where the kernels can
# (AVX512_VNNI; cpp/drivers/drivers.h, reduced_steps): each chunk of 8 steps projects
# the next chunk's rows in the loops of its own products. Every sum is an exact
# integer whoever computes it, so the row gives the same bits as in a batch of two,
# which never carries. W_hh of about 64 KB (where it carries), outputs that fill no
# panel of 16; whole and short chunks (T=21: the first projected before, the second
# carried, the last short one projected apart), more inputs than units and fewer
# (another count of groups of 4 in the two products), lengths, both directions, two
# layers (the second's inputs prepared from the first's outputs). The GRU without
# linear_before_reset (two products) never carries, nor does a bfloat16 row of the
# same W_hh bytes (the carrying tiles read int8 weights: such a call once crashed).
CARRIED_INT8 = {
    "T21_I3": dict(T=21, I=3),
    "T40_I200_bidirectional": dict(T=40, I=200, options=dict(bidirectional=True)),
    "lengths": dict(T=30, I=37, lengths=27),
    "reverse_two_layers": dict(T=26, I=12, options=dict(reverse=True, num_layers=2)),
}
CARRIED_INT8_CELLS = {"LSTM": ({}, 4), "GRU": ({}, 3), "RNN": (dict(nonlinearity="relu"), 1),
                      "CTRNN": (dict(alpha=0.5), 1),
                      "GRU_reset_before": (dict(linear_before_reset=False), 3)}


@needs_fused
@pytest.mark.parametrize("precision", PRECISIONS)  # bfloat16 rows of that size never carry
@pytest.mark.parametrize("cell, config", [
    (cell, config) for cell in CARRIED_INT8_CELLS for config in CARRIED_INT8
    if not (cell == "CTRNN" and config.startswith("reverse"))])  # the CTRNN runs forwards only
def test_one_int8_row_carries_the_input_projection(reduced_simd_target, threads_restored, cell,
                                                   config, precision):
    lstmfast.set_num_threads(1)
    cell_options, gates = CARRIED_INT8_CELLS[cell]
    cfg = CARRIED_INT8[config]
    options = {**cell_options, **cfg.get("options", {})}
    weight_bytes = 1 if precision == "int8" else 2
    H = int((64 * 1024 / (gates * weight_bytes)) ** 0.5) + 3  # W_hh of about 64 KB
    fused, numpy = layer_pair(cell.split("_")[0], options, precision, I=cfg["I"], H=H)
    rng = np.random.default_rng(13)
    T = cfg["T"]
    x = rng.standard_normal((T, 2, cfg["I"])).astype(np.float32)
    row, batch = {}, {}
    if "lengths" in cfg:
        row["lengths"], batch["lengths"] = np.array([cfg["lengths"]]), np.array([cfg["lengths"], T])
    alone = fused(x[:, :1], **row)
    if precision == "int8":
        in_a_batch = fused(x, **batch)
        np.testing.assert_array_equal(flatten(alone), flatten(first_row(in_a_batch)))
    assert_all_close(alone, numpy(x[:, :1], **row), 2e-3)


def first_row(result):
    """A layer call's output, h_n (and c_n), of its first row of the batch alone."""
    states = result[1] if isinstance(result[1], tuple) else (result[1],)
    states = tuple(s[:, :1] for s in states)
    return result[0][:, :1], states if isinstance(result[1], tuple) else states[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision, bound", [("int8", 3e-2), ("bfloat16", 1e-2)])
@pytest.mark.parametrize("cls_name", ["LSTM", "GRU", "CTRNN"])  # LayerNormLSTM: test_torch_quantized
def test_accuracy_contract_against_float32_on_random_weights(backend, precision, bound,
                                                             cls_name):
    # docs/guide.md "Reduced precision": bfloat16 relative error <= 1e-2 against float32
    # (relative to the largest output); int8's bound against torch's own int8 is in
    # torch_adapter/test_torch_quantized.py, this one keeps it from drifting without torch.
    cls = getattr(lstmfast, cls_name)
    layer = cls(64, 128, num_layers=2, seed=9, backend=backend).eval()
    x = np.random.default_rng(10).standard_normal((50, 8, 64)).astype(np.float32)
    expected = layer(x)[0]
    got = lstmfast.quantize(layer, precision)(x)[0]
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert error <= bound, f"{precision} relative error {error:.3g} > {bound}"
    assert error > 0  # the weights really are reduced


# ----------------------------------------------------------------------------------
# the layer object: state_dict, errors, pickling, threads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_state_dict_holds_the_reduced_weights_and_round_trips(backend, precision):
    layer = lstmfast.LSTM(6, 8, num_layers=2, proj_size=3, seed=1, backend=backend)
    q = lstmfast.quantize(layer, precision)
    assert type(q) is lstmfast.LSTM and q.precision == precision and not q.training
    assert "precision=" + precision in repr(q)
    state = q.state_dict()
    weights = [n for n in layer.state_dict() if n.startswith("weight")]
    for name in weights:
        if precision == "int8":
            assert state[name].dtype == np.int8
            assert state[name + "_scale"].dtype == np.float32
            assert state[name + "_scale"].shape == (layer.state_dict()[name].shape[0],)
        else:
            assert state[name].dtype == np.uint16
    assert state["bias_ih_l1"].dtype == np.float32
    other = lstmfast.quantize(lstmfast.LSTM(6, 8, num_layers=2, proj_size=3, seed=2,
                                            backend=backend), precision)
    x = np.random.default_rng(3).standard_normal((4, 2, 6)).astype(np.float32)
    assert not np.array_equal(other(x)[0], q(x)[0])
    other.load_state_dict(state)
    np.testing.assert_array_equal(other(x)[0], q(x)[0])
    restored = pickle.loads(pickle.dumps(q))
    np.testing.assert_array_equal(restored(x)[0], q(x)[0])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_reduced_layers_refuse_what_they_cannot_do(precision):
    q = lstmfast.quantize(lstmfast.GRU(4, 5, seed=0), precision)
    x = np.zeros((2, 1, 4), np.float32)
    q.train()
    q(x)  # runs, as inference
    with pytest.raises(RuntimeError, match="for inference only"):
        q.backward(np.zeros((2, 1, 5), np.float32))
    with pytest.raises(AttributeError, match="read-only"):
        q.weight_hh_l0 = np.zeros((15, 5))
    with pytest.raises(ValueError, match="assignment destination is read-only"):
        q.weight_hh_l0[0, 0] = 1
    with pytest.raises(ValueError, match="already " + precision):
        lstmfast.quantize(q, precision)
    state = q.state_dict()
    bad = dict(state, weight_hh_l0=state["weight_hh_l0"].astype(np.float32))
    with pytest.raises(TypeError, match="weight_hh_l0"):
        q.load_state_dict(bad)
    with pytest.raises(ValueError, match="weight_hh_l0.*shape"):
        q.load_state_dict(dict(state, weight_hh_l0=state["weight_hh_l0"][:3]))
    with pytest.raises(KeyError, match="missing"):
        q.load_state_dict({k: v for k, v in state.items() if k != "bias_hh_l0"})
    if precision == "int8":
        with pytest.raises(ValueError, match="positive and finite"):
            q.load_state_dict(dict(state, weight_ih_l0_scale=-state["weight_ih_l0_scale"]))
    with pytest.raises(TypeError, match="float64"):
        q(np.zeros((2, 1, 4), np.float64))


def test_quantize_checks_its_arguments():
    with pytest.raises(ValueError, match="precision must be one of"):
        lstmfast.quantize(lstmfast.LSTM(2, 3), "int4")
    with pytest.raises(TypeError, match="float32 layers, got a layer of dtype float64"):
        lstmfast.quantize(lstmfast.LSTM(2, 3, dtype="float64"), "int8")
    with pytest.raises(TypeError, match="expected an lstmfast LSTM, GRU, RNN, CTRNN or LayerNormLSTM "
                                        "layer, got LSTMCell"):
        lstmfast.quantize(lstmfast.LSTMCell(2, 3), "int8")


@needs_fused
def test_kernels_refuse_reduced_weights_for_training_or_float64():
    layer = lstmfast.quantize(lstmfast.LSTM(3, 4, seed=0), "int8")
    params = layer._forward_params()
    x = np.zeros((2, 1, 3), np.float32)
    hx = (np.zeros((1, 1, 4), np.float32),) * 2
    with pytest.raises(ValueError, match="weight_ih_l0.*inference only"):
        layer._backend.forward("LSTM", x, hx, params, num_layers=1, bidirectional=False,
                               training=True)
    with pytest.raises(TypeError, match="need float32 inputs"):
        layer._backend.forward("LSTM", x.astype(np.float64), tuple(h.astype(np.float64) for h in hx),
                               params, num_layers=1, bidirectional=False)
    mixed = dict(params, weight_hh_l0=np.zeros((16, 4), np.float32))
    with pytest.raises(TypeError, match="reduced-precision weight like the others"):
        layer._backend.forward("LSTM", x, hx, mixed, num_layers=1, bidirectional=False)


@needs_fused
@pytest.mark.parametrize("precision", PRECISIONS)
def test_reduced_layers_serve_several_threads_at_once(precision, threads_restored):
    lstmfast.set_num_threads(2)
    q = lstmfast.quantize(lstmfast.LSTM(32, 64, num_layers=2, seed=4), precision)
    rng = np.random.default_rng(5)
    inputs = [rng.standard_normal((40, n, 32)).astype(np.float32) for n in (1, 3, 8, 1, 5, 2)]
    expected = [q(x)[0] for x in inputs]
    results = run_all([lambda x=x: [q(x)[0] for _ in range(3)][-1] for x in inputs])
    for got, want in zip(results, expected):
        if precision == "int8":  # exact integer sums: identical however the work was cut
            np.testing.assert_array_equal(got, want)
        else:  # OpenBLAS may take another thread count when the cores are busy
            assert_close(got, want, tol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_non_finite_inputs_give_non_finite_rows_not_a_crash(backend, precision):
    # Garbage in (NaN, inf) must not reach undefined behaviour in the int8
    # quantization (a NaN cast to an integer); rows without it stay as they were.
    layer = lstmfast.quantize(lstmfast.GRU(6, 8, seed=1, backend=backend), precision)
    x = np.random.default_rng(2).standard_normal((3, 3, 6)).astype(np.float32)
    clean = layer(x)[0]
    x[1, 0, 2], x[0, 1, 4], x[2, 1, 0], x[2, 1, 1] = np.nan, np.inf, -3e38, 3e38
    with np.errstate(invalid="ignore", over="ignore"):
        got = layer(x)[0]
    assert got.shape == clean.shape
    np.testing.assert_array_equal(got[:, 2], clean[:, 2])
