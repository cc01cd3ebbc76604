"""Recurrent dropout in the fused kernels against the reference (whose oracles are in
test_regularizers_reference.py): every cell, every path (the pool's, the direct one of
few rows, the short backward), projection, lengths, both directions, 1 and 2 threads,
every SIMD target."""

import numpy as np
import pytest

from conftest import BACKENDS
from test_fused import VARIANTS, Case, assert_close

pytestmark = pytest.mark.skipif("fused" not in BACKENDS, reason="the fused kernels are not built")

from lstmfast import _fused, reference  # noqa: E402

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU", "CTRNN_TANH", "CTRNN_RELU", "LN_LSTM")
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
    with pytest.raises(ValueError, match="recurrent dropout is for training"):
        _fused.forward(case.mode, case.x, case.hx, case.params, training=False,
                       recurrent_dropout_masks=mask, **case.kwargs)
    # the reference applies masks whenever given; the kernels take them in training only
    reference.forward(case.mode, case.x, case.hx, case.params, recurrent_dropout_masks=mask,
                      **case.kwargs)


def test_weight_gradient_uses_the_masked_h():
    """dW_hh = sum of dG^T (h * M): a mask of zeros on a unit leaves its column of dW_hh 0."""
    case = masked_case("RNN_TANH", "pool", dict())
    mask = np.ones_like(case.kwargs["recurrent_dropout_masks"])
    mask[..., 3] = 0
    case.kwargs["recurrent_dropout_masks"] = mask
    grads = case.run(_fused)[1][3]
    assert np.all(grads["weight_hh_l0"][:, 3] == 0)
    assert np.all(grads["weight_hh_l0"][:, 2] != 0)
    assert_close(grads["weight_hh_l0"], case.run(reference)[1][3]["weight_hh_l0"], "dW_hh")
