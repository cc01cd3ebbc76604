"""Float weights packed once (_core.pack_gates, what lstmfast.freeze gives the kernels).

Oracles: the reference forward (every cell, both dtypes, at the project's
tolerance) and the kernels' own per-call packing: a call long enough to take the
fused path packs W itself at its start, and panels packed beforehand must give
exactly its bits. The frozen layers of the NumPy API are in api/test_freeze.py.
"""

import numpy as np
import pytest

from lstmfast import _core, _fused, reference

from helpers import BACKENDS, assert_close, make_problem, run_forward

pytestmark = pytest.mark.skipif("fused" not in BACKENDS, reason="the fused kernels are not built")

# mode, make_problem options: every cell, and what changes the panels' reader
CELLS = [
    ("LSTM", {}),
    ("LSTM", {"peephole": True}),
    ("LSTM", {"options": {"input_forget": True, "clip": 2.0}}),
    ("GRU", {}),
    ("GRU_RESET_BEFORE", {}),
    ("RNN_TANH", {"options": {"reverse": True}}),
    ("RNN_RELU", {}),
    ("CTRNN_TANH", {"alpha": 0.4}),
    ("CTRNN_RELU", {"leak": "inside"}),
    ("LN_LSTM", {}),
]
# T, N, I, H, layers, bidirectional, lengths: one frame of one row (the call a
# stream makes, which without panels reads W in place), a few steps, odd sizes
# across vector widths, stacks, both directions, lengths (one direction too).
SHAPES = [
    (1, 1, 5, 16, 1, False, None),
    (4, 2, 7, 9, 1, False, None),
    (6, 3, 5, 33, 2, True, [6, 2, 4]),
    (30, 1, 20, 24, 1, False, None),
    (8, 3, 5, 20, 1, False, [8, 3, 5]),  # reverse with lengths projects W_ih as stored
]


def packed(params, mode):
    return {name: (_core.pack_gates(mode, value, name.startswith("weight_hh"))
                   if name.startswith(("weight_ih", "weight_hh")) else value)
            for name, value in params.items()}


def fused_forward(p, params, training=False):
    hx = (p["h0"], p["c0"]) if p["mode"] in reference.CELL_STATE_MODES else p["h0"]
    return _fused.forward(
        p["mode"], p["x"], hx, params, num_layers=p["num_layers"],
        bidirectional=p["bidirectional"], lengths=p["lengths"], training=training,
        **p["ctrnn"], **p["options"])


def reference_cases():
    for mode, options in CELLS:
        for T, N, I, H, layers, bidirectional, lengths in SHAPES:
            if options.get("options", {}).get("reverse") and bidirectional:
                continue  # reverse is one direction
            yield pytest.param(mode, options, T, N, I, H, layers, bidirectional, lengths,
                               id=f"{mode}-{options}-T{T}-N{N}-H{H}-L{layers}")


@pytest.mark.parametrize("mode, options, T, N, I, H, layers, bidirectional, lengths",
                         list(reference_cases()))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_packed_weights_give_the_reference_forward(simd_target, mode, options, T, N, I, H, layers,
                                                   bidirectional, lengths, dtype):
    p = make_problem(mode, T=T, N=N, I=I, H=H, num_layers=layers, bidirectional=bidirectional,
                     lengths=lengths, dtype=dtype, **options)
    expected = run_forward(p)[:3]
    got = fused_forward(p, packed(p["params"], mode))[:3]
    for name, a, e in zip(("output", "h_n", "c_n"), got, expected):
        if e is not None:
            assert_close(a, e, name=name)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "GRU_RESET_BEFORE", "RNN_TANH", "LN_LSTM"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_panels_packed_once_are_those_a_call_packs(simd_target, mode, dtype):
    # T*N past the few steps that read W in place: both calls take the fused path,
    # one packing at its start, one reading what pack_gates made: the same bits.
    p = make_problem(mode, T=40, N=2, I=19, H=37, num_layers=2, bidirectional=True,
                     dtype=dtype)
    own = fused_forward(p, p["params"])[:3]
    given = fused_forward(p, packed(p["params"], mode))[:3]
    for a, e in zip(given, own):
        if e is not None:
            np.testing.assert_array_equal(a, e)


def test_panels_of_other_kernels_are_not_read():
    # Packed with the best kernels, called with each other target's: W is read as
    # stored, and the results are that target's own, bit for bit.
    targets = _core.simd_targets()
    if len(targets) < 2:
        pytest.skip(f"this CPU runs one SIMD target only ({targets[0]})")
    p = make_problem("LSTM", T=40, N=2, I=19, H=37, dtype=np.float32)
    best = targets[-1]
    _core.set_simd_target(best)
    params = packed(p["params"], "LSTM")
    assert params["weight_hh_l0"].target == _core.simd_target_builds(best)[0]
    try:
        for target in targets:
            _core.set_simd_target(target)
            own = fused_forward(p, p["params"])[0]
            np.testing.assert_array_equal(fused_forward(p, params)[0], own, err_msg=target)
    finally:
        _core.set_simd_target(best)


@pytest.mark.parametrize("mode", ["LSTM", "GRU_RESET_BEFORE", "CTRNN_TANH"])
def test_a_training_call_with_packed_weights_has_the_same_gradients(mode):
    # The kernels take packed weights in training too (the NumPy layers never do:
    # a frozen layer is for inference); backward reads W as stored.
    p = make_problem(mode, T=25, N=3, I=6, H=11, num_layers=2, dtype=np.float64)
    hx = (p["h0"], p["c0"]) if mode in reference.CELL_STATE_MODES else p["h0"]
    results = []
    for params in (p["params"], packed(p["params"], mode)):
        y, h_n, c_n, cache = _core.rnn_forward(
            mode, p["x"], hx[0] if isinstance(hx, tuple) else hx,
            hx[1] if isinstance(hx, tuple) else None, params, num_layers=2, bidirectional=False,
            training=True, cell_options=p["ctrnn"] and {k: v for k, v in p["ctrnn"].items()
                                                         if k in ("alpha", "leak", "noise")})
        grads = {name: np.zeros_like(value) for name, value in p["params"].items()}
        dx, dh0, dc0 = _core.rnn_backward(cache, p["R1"], p["R2"],
                                          p["R3"] if mode == "LSTM" else None, grads)
        results.append((y, h_n, dx, dh0, grads))
    for a, e in zip(results[1], results[0]):
        if isinstance(e, dict):
            for name in e:
                np.testing.assert_array_equal(a[name], e[name], err_msg=name)
        else:
            np.testing.assert_array_equal(a, e)


def test_a_packed_weight_is_a_read_only_copy():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((12, 5)).astype(np.float32)
    w = _core.pack_gates("GRU", W, recurrent=False)
    assert w.shape == (12, 5) and w.dtype == np.float32 and w.mode == "GRU" and not w.recurrent
    assert w.target == _core.simd_target_builds(_core.simd_target())[0]
    assert w.nbytes >= 12 * 5 * 4
    np.testing.assert_array_equal(w.weight, W)
    assert not np.shares_memory(w.weight, W)
    with pytest.raises(ValueError, match="read-only"):
        w.weight[0, 0] = 1
    # writing the array given afterwards changes nothing packed
    p = make_problem("GRU", T=30, N=1, I=5, H=4, dtype=np.float32)
    params = packed(p["params"], "GRU")
    before = fused_forward(p, params)[0]
    p["params"]["weight_hh_l0"][...] = 0
    p["params"]["weight_ih_l0"][...] = 0
    np.testing.assert_array_equal(fused_forward(p, params)[0], before)


def test_packing_refuses_what_no_layer_has():
    with pytest.raises(ValueError, match=r"weight_hh: expected 4\*H rows .*LSTM.*\(6, 3\)"):
        _core.pack_gates("LSTM", np.zeros((6, 3), np.float32), True)
    with pytest.raises(ValueError, match=r"weight_ih: expected 3\*H rows"):
        _core.pack_gates("GRU", np.zeros((0, 3), np.float32), False)
    with pytest.raises(TypeError, match="weight_ih: expected a 2-D float32 or float64 array, got 2-D int32"):
        _core.pack_gates("RNN_TANH", np.zeros((4, 3), np.int32), False)
    with pytest.raises(TypeError, match="weight_hh: expected a numpy array, got list"):
        _core.pack_gates("RNN_TANH", [[1.0]], True)
    with pytest.raises(ValueError, match="mode must be one of"):
        _core.pack_gates("LSTMX", np.zeros((4, 3), np.float32), True)


def test_a_call_refuses_packed_weights_that_are_not_its_own():
    p = make_problem("GRU", T=3, N=2, I=5, H=4, dtype=np.float32)
    ok = packed(p["params"], "GRU")
    h0 = p["h0"]

    def call(mode, params, x=p["x"], h=h0):
        return _core.rnn_forward(mode, x, h, None, params, num_layers=1, bidirectional=False)

    swapped = dict(ok, weight_ih_l0=ok["weight_hh_l0"])
    with pytest.raises(ValueError, match=r"params\['weight_ih_l0'\]: expected weight_ih packed .* got "
                                         r"weight_hh"):
        call("GRU", swapped)
    # GRU_RESET_BEFORE packs W_hh's gates in two products: GRU's panels are not its own
    with pytest.raises(ValueError, match=r"params\['weight_hh_l0'\]: packed for a GRU layer"):
        call("GRU_RESET_BEFORE", ok)
    # W_ih's panels are the same for both
    mixed = dict(ok, weight_hh_l0=_core.pack_gates("GRU_RESET_BEFORE", p["params"]["weight_hh_l0"],
                                                   True))
    expected = call("GRU_RESET_BEFORE", p["params"])[0]
    assert_close(call("GRU_RESET_BEFORE", mixed)[0], expected)
    with pytest.raises(TypeError, match=r"params\['weight_ih_l0'\] \(packed\): expected dtype "
                                        r"float64 \(that of x\), got float32"):
        call("GRU", ok, x=p["x"].astype(np.float64), h=h0.astype(np.float64))
    with pytest.raises(ValueError, match=r"params\['weight_ih_l0'\] \(packed\): expected shape "
                                         r"\(12, 6\), got \(12, 5\)"):
        call("GRU", ok, x=np.zeros((3, 2, 6), np.float32))
    rnn = _core.pack_gates("RNN_TANH", np.zeros((4, 5), np.float32), False)
    with pytest.raises(ValueError, match=r"params\['weight_ih_l0'\]: packed for a RNN_TANH layer"):
        call("GRU", dict(ok, weight_ih_l0=rnn))


def test_a_short_call_reads_weights_that_fit_in_l1_in_place():
    # Packed once or not, a frame of a layer whose weights fit in L1 (32 KB: LSTM
    # H=I=32 in float32) takes the in-place path (cell_driver.h,
    # in_place_beats_panels): the same bits as the layer's own call. Past it the
    # panels are read, and the sums run in their order.
    small = make_problem("LSTM", T=1, N=1, I=32, H=32, dtype=np.float32, seed=7)
    np.testing.assert_array_equal(fused_forward(small, packed(small["params"], "LSTM"))[0],
                                  fused_forward(small, small["params"])[0])
    large = make_problem("LSTM", T=1, N=1, I=48, H=48, dtype=np.float32, seed=7)
    assert not np.array_equal(fused_forward(large, packed(large["params"], "LSTM"))[0],
                              fused_forward(large, large["params"])[0])
