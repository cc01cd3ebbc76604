"""ONNX's options in the kernels (hard sigmoid gates, clip, input_forget), inference
and training, against the reference, on every SIMD target, on one thread and on the
pool, with lengths, both directions and layers; and what the kernels leave to the
reference.
ONNX Runtime is the oracle of the options themselves (api/test_onnx_import.py)."""

import numpy as np
import pytest

from lstmfast import _core, reference

from helpers import Case, assert_close

_fused = pytest.importorskip("lstmfast._fused")
pytestmark = pytest.mark.skipif(not _fused.available, reason="fused kernels not built")

HARD = [("hardsigmoid", 0.3, 0.45), "tanh", "tanh"]
OPTIONS = [
    ("LSTM", {"clip": 0.7}),
    ("LSTM", {"input_forget": True}),
    ("LSTM", {"activations": HARD}),
    ("LSTM", {"activations": ["hardsigmoid", "tanh", "tanh"], "clip": 1.1, "input_forget": True}),
    ("GRU", {"clip": 0.6}),
    ("GRU", {"activations": ["hardsigmoid", "tanh"], "clip": 1.3}),
    ("GRU_RESET_BEFORE", {"activations": [("hardsigmoid", 0.25, 0.5), "tanh"], "clip": 0.9}),
    ("RNN_TANH", {"clip": 0.5}),
    ("RNN_RELU", {"clip": 0.4}),
]
CONFIGS = {
    "one_layer": dict(),
    "bidirectional_layers_lengths": dict(N=5, L=2, bidirectional=True, lengths=[3, 5, 1, 5, 2]),
    "reverse": dict(N=3, lengths=[2, 5, 4], cell_options={"reverse": True}),
    "every_row_count": dict(T=13, N=13, H=19, I=5, lengths=list(range(13, 0, -1))),
}


def check_inference(mode, options, config, dtype=np.float32, **extra):
    config = dict(config)
    case = Case(mode, dtype, cell_options={**options, **config.pop("cell_options", {})},
                scale=2.0, **config, **extra)  # x of scale 2: the clip bounds many values
    assert _fused.kernel_gate_options(mode, **options) is not None  # the kernels compute it
    y, h_n, c_n, cache = case.forward(_fused, training=False)
    ry, rh_n, rc_n, _ = case.forward(reference, training=False)
    assert cache is None
    assert_close(y, ry, name="output")
    assert_close(h_n, rh_n, name="h_n")
    if rc_n is not None:
        assert_close(c_n, rc_n, name="c_n")


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("mode, options", OPTIONS, ids=[f"{m}-{'-'.join(o)}" for m, o in OPTIONS])
def test_inference_matches_reference(simd_target, mode, options, config):
    check_inference(mode, options, CONFIGS[config])


@pytest.mark.parametrize("mode, options", OPTIONS, ids=[f"{m}-{'-'.join(o)}" for m, o in OPTIONS])
def test_float64_and_the_pool(mode, options, threads_restored):
    import lstmfast

    check_inference(mode, options, {}, dtype=np.float64)
    lstmfast.set_num_threads(2)  # a step large enough for the persistent pool
    check_inference(mode, options, dict(N=16, H=96, I=32, T=4, lengths=list(range(4, 0, -1)) * 4))


# What the kernels train with: every option, and each without the clip too.
TRAINING = OPTIONS + [
    ("LSTM", {"activations": ["hardsigmoid", "tanh", "tanh"], "input_forget": True}),
    ("LSTM", {"clip": 0.8, "input_forget": True}),
    ("GRU", {"activations": [("hardsigmoid", 0.3, 0.45), "tanh"]}),
    ("GRU_RESET_BEFORE", {"activations": ["hardsigmoid", "tanh"]}),
    ("GRU_RESET_BEFORE", {"clip": 0.7}),
]


@pytest.mark.parametrize("config", ["one_layer", "bidirectional_layers_lengths", "reverse"])
@pytest.mark.parametrize("mode, options", TRAINING, ids=[f"{m}-{'-'.join(o)}" for m, o in TRAINING])
def test_training_matches_reference(simd_target, mode, options, config):
    """Forward, backward and every gradient, against the reference's."""
    config = dict(CONFIGS[config])
    assert _fused.kernel_gate_options(mode, **options) is not None
    case = Case(mode, np.float64, cell_options={**options, **config.pop("cell_options", {})},
                scale=2.0, **config)
    case.check()
    assert not isinstance(case.forward(_fused)[3], dict)  # the kernels' cache, not the reference's


@pytest.mark.parametrize("mode, options", TRAINING, ids=[f"{m}-{'-'.join(o)}" for m, o in TRAINING])
def test_training_float32_on_the_pool(mode, options, threads_restored):
    import lstmfast

    lstmfast.set_num_threads(2)
    Case(mode, np.float32, cell_options=options, N=16, H=96, I=32, T=4,
         lengths=list(range(4, 0, -1)) * 4).check()


def test_projection_peepholes():
    check_inference("LSTM", {"activations": HARD, "clip": 0.8}, dict(P=3, H=7, L=2))
    case = Case("LSTM", np.float32, cell_options={"clip": 0.8, "input_forget": True})
    case.params.update({f"weight_c{g}_l0": np.full(6, 0.3, np.float32) for g in "ifo"})
    y, h_n, c_n, _ = case.forward(_fused, training=False)
    ry, rh_n, rc_n, _ = case.forward(reference, training=False)
    assert_close(y, ry, name="output")
    assert_close(c_n, rc_n, name="c_n")


def test_what_the_kernels_leave_to_the_reference():
    gate_options = _fused.kernel_gate_options
    assert gate_options("LSTM") == {}
    assert gate_options("LSTM", clip=1.0) == {"clip": 1.0, "input_forget": False,
                                               "hard_sigmoid": None}
    assert gate_options("LSTM", input_forget=True) == {
        "clip": None, "input_forget": True, "hard_sigmoid": None}
    assert gate_options("LSTM", activations=["softsign", "tanh", "tanh"]) is None
    assert gate_options("LSTM", activations=["hardsigmoid", "tanh", "relu"]) is None
    assert gate_options("RNN_TANH", activations=["hardsigmoid"]) is None
    assert gate_options("CTRNN_TANH") == {}
    assert gate_options("GRU", activations=["hardsigmoid", "tanh"]) == {
        "clip": None, "input_forget": False, "hard_sigmoid": (0.2, 0.5)}
    # and the binding refuses what the Python side never sends
    x = np.zeros((2, 1, 3), np.float32)
    case = Case("CTRNN_TANH", np.float32, T=2, N=1, I=3, H=4)
    with pytest.raises(ValueError, match="not in the kernels of CTRNN_TANH"):
        _core.rnn_forward("CTRNN_TANH", x, case.hx, None, case.params, num_layers=1,
                          bidirectional=False, cell_options={"clip": 1.0})
    with pytest.raises(ValueError, match="only the LSTM couples its gates"):
        _core.rnn_forward("GRU", x, Case("GRU", np.float32, T=2, N=1, I=3, H=4).hx, None,
                          Case("GRU", np.float32, T=2, N=1, I=3, H=4).params, num_layers=1,
                          bidirectional=False, cell_options={"input_forget": True})
