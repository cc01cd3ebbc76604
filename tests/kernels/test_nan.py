"""A NaN in the input, the initial state or a weight reaches the results as in the
reference (and in torch): the same entries NaN, the others equal. The activations
clamp their arguments (simd.h), and a clamp written the other way round turns NaN
into its bound: a model whose weights diverged would then go on with finite
outputs and losses. Every target's cell kernels, inference and training (outputs,
final states, every gradient), each cell and ONNX's options; the reduced
precisions and the peephole LSTM through the layers."""

import numpy as np
import pytest

import lstmfast
from lstmfast import reference

from helpers import VARIANTS, Case, assert_close

_fused = pytest.importorskip("lstmfast._fused")
pytestmark = pytest.mark.skipif(not _fused.available, reason="fused kernels not built")

HARD = [("hardsigmoid", 0.3, 0.45), "tanh", "tanh"]
CELLS = [
    ("LSTM", None, {}),
    ("GRU", None, {}),
    ("GRU_RESET_BEFORE", None, {}),
    ("RNN_TANH", None, {}),
    ("RNN_RELU", None, {}),
    ("CTRNN_RELU", *VARIANTS["CTRNN_RELU"]),
    ("CTRNN_TANH", *VARIANTS["CTRNN_TANH"]),
    ("LN_LSTM", *VARIANTS["LN_LSTM"]),
    ("LSTM", None, {"activations": HARD, "clip": 0.7}),
    ("GRU", None, {"activations": ["hardsigmoid", "tanh"], "clip": 1.3}),
    ("RNN_RELU", None, {"clip": 0.4}),
]
CELL_IDS = [f"{mode}{'-' + '-'.join(options) if options and mode[:3] not in ('CTR', 'LN_') else ''}"
            for mode, _, options in CELLS]
PLACES = ["x", "h0", "weight_hh"]


def assert_same_nans(actual, expected, name):
    """The same entries NaN in both, and the others equal to the dtype's tolerance."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan, err_msg=f"{name}: NaN in other entries")
    assert_close(np.where(nan, 0, actual), np.where(nan, 0, expected), name=name)


def nan_case(mode, dtype, options, place):
    case = Case(mode, dtype, T=5, N=3, I=4, H=6, cell_options=dict(options))
    if place == "x":  # row 1 from step 2 on
        case.x[2, 1, 0] = np.nan
    elif place == "h0":  # row 0 from the start
        (case.hx[0] if case.cell_state else case.hx)[0, 0, 1] = np.nan
    else:  # every row
        case.params["weight_hh_l0"][1, 2] = np.nan
    return case


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("mode, dtype, options", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("real", [np.float32, np.float64], ids=["float32", "float64"])
def test_nan_reaches_the_same_results_as_in_the_reference(simd_target, real, mode, dtype, options,
                                                          place, training):
    case = nan_case(mode, dtype or real, options, place)
    with np.errstate(invalid="ignore"):
        if training:
            (y, h_n, c_n), (dx, dh0, dc0, grads) = case.run(_fused)
            (ry, rh_n, rc_n), (rdx, rdh0, rdc0, rgrads) = case.run(reference)
        else:
            y, h_n, c_n, _ = case.forward(_fused, training=False)
            ry, rh_n, rc_n, _ = case.forward(reference, training=False)
    assert np.isnan(ry).any(), "the NaN reached no output of the reference"
    assert_same_nans(y, ry, "output")
    assert_same_nans(h_n, rh_n, "h_n")
    if rc_n is not None:
        assert_same_nans(c_n, rc_n, "c_n")
    if training:
        assert_same_nans(dx, rdx, "dx")
        assert_same_nans(dh0, rdh0, "dh0")
        if rdc0 is not None:
            assert_same_nans(dc0, rdc0, "dc0")
        assert sorted(grads) == sorted(rgrads)
        for name in rgrads:
            assert_same_nans(grads[name], rgrads[name], f"grads[{name!r}]")


LAYERS = {
    "LSTM": lambda **kw: lstmfast.LSTM(5, 7, **kw),
    "peephole": lambda **kw: lstmfast.LSTM(5, 7, peephole=True, **kw),
    "GRU": lambda **kw: lstmfast.GRU(5, 7, **kw),
    "RNN_relu": lambda **kw: lstmfast.RNN(5, 7, nonlinearity="relu", **kw),
    "CTRNN": lambda **kw: lstmfast.CTRNN(5, 7, **kw),
    "LayerNormLSTM": lambda **kw: lstmfast.LayerNormLSTM(5, 7, **kw),
}


@pytest.mark.parametrize("precision", ["float32", "int8", "bfloat16"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_nan_in_the_input_reaches_its_row_in_every_precision(reduced_simd_target, layer, precision):
    # int8: a row holding a NaN gets the scale NaN (reference.quantize_activations), so
    # that the product of that row is NaN, as in float32; bfloat16 keeps NaN as NaN.
    layers = [LAYERS[layer](seed=3, backend=backend).eval() for backend in ("fused", "numpy")]
    if precision != "float32":
        layers = [lstmfast.quantize(one, precision) for one in layers]
    x = np.random.default_rng(4).standard_normal((6, 4, 5)).astype(np.float32)
    x[2, 1, 3] = np.nan
    with np.errstate(invalid="ignore"):
        got, expected = (one(x)[0] for one in layers)
    rows_with_nan = np.isnan(got).any(axis=2)
    np.testing.assert_array_equal(rows_with_nan, (np.arange(6)[:, None] >= 2) & (np.arange(4)[None, :] == 1))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    clean = ~np.isnan(expected)
    # the other rows as the reference has them (the reduced ones to their contract)
    assert_close(got[clean], expected[clean], tol=1e-5 if precision == "float32" else 2e-3)
