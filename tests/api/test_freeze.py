"""lstmfast.freeze: inference-only copies of a layer or cell with weights packed once.

Oracles: the layer it was frozen from (same backend), and that layer's state in
the NumPy reference backend, at the project's tolerance. What the kernels do with
packed weights is in kernels/test_packed_weights.py.
"""

import pickle

import numpy as np
import pytest

import lstmfast
from helpers import BACKENDS, assert_close, assert_tree_close, run_all

needs_fused = pytest.mark.skipif("fused" not in BACKENDS, reason="the fused kernels are not built")

# name, constructor, whether the fused kernels read panels for it
LAYERS = [
    ("LSTM", lambda **kw: lstmfast.LSTM(6, 9, **kw), True),
    ("LSTM-stack", lambda **kw: lstmfast.LSTM(6, 9, num_layers=2, bidirectional=True,
                                              batch_first=True, **kw), True),
    ("LSTM-peephole", lambda **kw: lstmfast.LSTM(6, 9, peephole=True, **kw), True),
    ("LSTM-proj", lambda **kw: lstmfast.LSTM(6, 9, proj_size=4, **kw), False),
    ("LSTM-hard-sigmoid", lambda **kw: lstmfast.LSTM(
        6, 9, activations=["HardSigmoid", "Tanh", "Tanh"], clip=3.0, **kw), True),
    ("LSTM-elu", lambda **kw: lstmfast.LSTM(  # ONNX options the kernels lack: the reference
        6, 9, activations=["Sigmoid", "Elu", "Tanh"], **kw), False),
    ("GRU", lambda **kw: lstmfast.GRU(6, 9, bias=False, **kw), True),
    ("GRU-reset-before", lambda **kw: lstmfast.GRU(6, 9, linear_before_reset=False, **kw), True),
    ("RNN-relu", lambda **kw: lstmfast.RNN(6, 9, nonlinearity="relu", num_layers=2, **kw), True),
    ("CTRNN", lambda **kw: lstmfast.CTRNN(6, 9, alpha=0.3, **kw), True),
    ("LayerNormLSTM", lambda **kw: lstmfast.LayerNormLSTM(6, 9, **kw), True),
    ("LSTMCell", lambda **kw: lstmfast.LSTMCell(6, 9, **kw), True),
    ("GRUCell", lambda **kw: lstmfast.GRUCell(6, 9, **kw), True),
    ("RNNCell", lambda **kw: lstmfast.RNNCell(6, 9, **kw), True),
]
IDS = [name for name, _, _ in LAYERS]
DTYPES = [np.float32, np.float64]


def is_cell(layer):
    return type(layer).__name__.endswith("Cell")


def inputs(layer, rng, T, N, dtype):
    """x of a call: (N, I) for a cell, else (T, N, I) in the layer's layout."""
    if is_cell(layer):
        return rng.standard_normal((N, layer.input_size)).astype(dtype)
    x = rng.standard_normal((T, N, layer.input_size)).astype(dtype)
    return x.transpose(1, 0, 2).copy() if layer.batch_first else x


def reference_twin(layer, make):
    twin = make(dtype=layer.dtype, backend="numpy").eval()
    twin.load_state_dict(layer.state_dict())
    return twin


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, make, packs", LAYERS, ids=IDS)
def test_a_frozen_layer_computes_what_its_layer_does(name, make, packs, dtype, backend):
    rng = np.random.default_rng(0)
    layer = make(dtype=dtype, backend=backend).eval()
    frozen = lstmfast.freeze(layer)
    assert type(frozen) is type(layer) and frozen.frozen and not frozen.training
    assert not layer.frozen and layer.training is False
    twin = reference_twin(layer, make)
    # a frame of one row (the short path), a few steps, a long call; then unbatched
    for T, N in ((1, 1), (3, 2), (30, 3)):
        x = inputs(layer, rng, T, N, dtype)
        assert_tree_close(frozen(x), twin(x), name=f"{name} T={T} N={N}")
        assert_tree_close(frozen(x), layer(x), name=f"{name} T={T} N={N} vs layer")
    x = inputs(layer, rng, 4, 1, dtype)[..., 0, :] if not is_cell(layer) else inputs(layer, rng, 1, 1, dtype)[0]
    assert_tree_close(frozen(x), twin(x), name=f"{name} unbatched")
    packed = frozen._forward_params()
    weights = [n for n in packed if n.startswith(("weight_ih", "weight_hh"))]
    expect_packed = packs and backend == "fused"
    for n in weights:
        assert isinstance(packed[n], lstmfast._core.PackedWeight) == expect_packed, n
        if expect_packed:  # the layer's parameter is a view of the packed weight's own copy
            assert getattr(frozen, n).base is packed[n].weight


@needs_fused
@pytest.mark.parametrize("name, make, packs", [c for c in LAYERS if c[2]], ids=[c[0] for c in LAYERS if c[2]])
def test_a_frozen_layer_takes_initial_states(name, make, packs):
    rng = np.random.default_rng(1)
    layer = make().eval()
    frozen, twin = lstmfast.freeze(layer), reference_twin(layer, make)
    for T, N in ((1, 1), (5, 2)):
        x = inputs(layer, rng, T, N, np.float32)
        out = twin(x)  # a state of the right shapes, for the next call
        state = out if is_cell(layer) else out[1]
        assert_tree_close(frozen(x, state), twin(x, state), name=name)


@needs_fused
@pytest.mark.parametrize("name, make, packs", [c for c in LAYERS if c[2] and not c[0].endswith("Cell")],
                         ids=[c[0] for c in LAYERS if c[2] and not c[0].endswith("Cell")])
def test_a_frozen_layer_takes_lengths(name, make, packs):
    rng = np.random.default_rng(7)
    layer = make().eval()
    frozen, twin = lstmfast.freeze(layer), reference_twin(layer, make)
    x = inputs(layer, rng, 9, 4, np.float32)
    lengths = [9, 3, 6, 1]
    assert_tree_close(frozen(x, lengths=lengths), twin(x, lengths=lengths), name=name)


@needs_fused
def test_freezing_copies_the_layer_which_stays_as_it_was():
    layer = lstmfast.GRU(5, 8)
    frozen = lstmfast.freeze(layer)
    x = np.random.default_rng(2).standard_normal((7, 2, 5)).astype(np.float32)
    before = frozen(x)[0]
    layer.weight_hh_l0[...] = 0  # the original trains on; the frozen copy does not see it
    layer.bias_ih_l0 = np.ones(24)
    np.testing.assert_array_equal(frozen(x)[0], before)
    assert layer.training  # freeze left its mode alone
    out, h_n = layer(x)
    layer.backward(np.ones_like(out))  # and it trains
    assert np.abs(layer.grad["weight_ih_l0"]).sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("copy_of", ["freeze", "int8", "bfloat16"])
def test_a_copy_draws_its_noise_apart_from_its_layer(copy_of, backend):
    # A CTRNN's noise (drawn in eval mode too) comes from the layer's random stream:
    # the frozen or quantized copy has its own from the layer's state on, so that
    # calling the original does not change what the copy computes, nor the reverse.
    import copy

    layer = lstmfast.CTRNN(3, 5, seed=1, noise_std=0.5, alpha=0.5, backend=backend).eval()
    other = lstmfast.freeze(layer) if copy_of == "freeze" else lstmfast.quantize(layer, copy_of)
    x = np.random.default_rng(0).standard_normal((4, 2, 3)).astype(np.float32)
    other_next = copy.deepcopy(other)(x)[0]
    layer(x), layer(x)
    np.testing.assert_array_equal(other(x)[0], other_next)
    layer_next = copy.deepcopy(layer)(x)[0]
    other(x), other(x)
    np.testing.assert_array_equal(layer(x)[0], layer_next)


@needs_fused
def test_a_frozen_layer_is_read_only_and_inference_only():
    frozen = lstmfast.freeze(lstmfast.LSTM(4, 6))
    assert repr(frozen) == "LSTM(4, 6, frozen=True)"
    with pytest.raises(AttributeError, match="weight_hh_l0: the parameters of a frozen layer are "
                                             "read-only"):
        frozen.weight_hh_l0 = np.zeros((24, 6))
    for name in ("weight_hh_l0", "bias_ih_l0"):
        with pytest.raises(ValueError, match="read-only"):
            getattr(frozen, name)[...] = 0
    x = np.ones((3, 2, 4), np.float32)
    frozen.train()  # a forward keeps nothing for backward, in either mode
    out, _ = frozen(x)
    with pytest.raises(RuntimeError, match=r"LSTM.backward: this layer was made by "
                                           r"lstmfast.freeze, for inference only"):
        frozen.backward(np.ones_like(out))
    cell = lstmfast.freeze(lstmfast.GRUCell(4, 6))
    h = cell(np.ones((2, 4), np.float32))
    with pytest.raises(RuntimeError, match="made by lstmfast.freeze"):
        cell.backward(np.ones_like(h))


@pytest.mark.parametrize("make", [
    lambda: lstmfast.freeze(lstmfast.LSTM(4, 6)),
    lambda: lstmfast.freeze(lstmfast.LSTM(4, 6, proj_size=3)),
    lambda: lstmfast.freeze(lstmfast.GRU(4, 6, backend="numpy")),
    lambda: lstmfast.quantize(lstmfast.GRU(4, 6), "int8"),
    lambda: lstmfast.quantize(lstmfast.LSTM(4, 6), "bfloat16"),
], ids=["frozen", "frozen_projected", "frozen_numpy", "int8", "bfloat16"])
def test_a_frozen_layers_arrays_cannot_be_made_writeable_again(make):
    # A write would reach the calls that read the array, not those that read the panels
    # packed from it: each parameter is a view of a read-only array, whose flag stays.
    import pickle

    for layer in (make(), pickle.loads(pickle.dumps(make()))):
        for name in layer.state_dict():
            with pytest.raises(ValueError):
                getattr(layer, name).flags.writeable = True


def test_freeze_refuses_what_it_cannot_freeze():
    with pytest.raises(TypeError, match="freeze: expected an lstmfast layer or cell .* got dict"):
        lstmfast.freeze({})
    if "fused" in BACKENDS:
        int8 = lstmfast.quantize(lstmfast.LSTM(4, 6), "int8")
        assert int8.frozen
        with pytest.raises(ValueError, match="freeze: the layer is int8, made by quantize"):
            lstmfast.freeze(int8)


@needs_fused
@pytest.mark.parametrize("precision", ["int8", "bfloat16"])
def test_a_frozen_layer_quantizes_as_its_layer(precision):
    layer = lstmfast.LSTM(5, 8, num_layers=2).eval()
    x = np.random.default_rng(3).standard_normal((6, 2, 5)).astype(np.float32)
    expected = lstmfast.quantize(layer, precision)(x)
    np.testing.assert_array_equal(lstmfast.quantize(lstmfast.freeze(layer), precision)(x)[0],
                                  expected[0])


@needs_fused
@pytest.mark.parametrize("name, make, packs", [LAYERS[0], LAYERS[6], LAYERS[11]],
                         ids=[LAYERS[0][0], LAYERS[6][0], LAYERS[11][0]])
def test_state_dict_pickle_and_load_state_dict_keep_a_frozen_layer_frozen(name, make, packs):
    rng = np.random.default_rng(4)
    layer = make().eval()
    frozen = lstmfast.freeze(layer)
    x = inputs(layer, rng, 12, 2, np.float32)
    assert_tree_close(frozen.state_dict(), layer.state_dict(), atol=0)
    back = pickle.loads(pickle.dumps(frozen))
    assert back.frozen and repr(back) == repr(frozen)
    assert all(not v.flags.writeable for v in back._params.values())
    assert_tree_close(back(x), frozen(x), atol=0)
    # load_state_dict replaces the parameters (read-only again) and packs them again
    other = make(seed=9).eval()
    frozen.load_state_dict(other.state_dict())
    assert all(not v.flags.writeable for v in frozen._params.values())
    assert_tree_close(frozen(x), reference_twin(other, make)(x), name=name)
    with pytest.raises(KeyError, match="missing key"):
        frozen.load_state_dict({})
    assert_tree_close(frozen(x), reference_twin(other, make)(x), name=name)


@needs_fused
def test_a_frozen_layer_serves_several_threads_at_once(threads_restored):
    lstmfast.set_num_threads(2)
    frozen = lstmfast.freeze(lstmfast.LSTM(16, 32, num_layers=2))
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((T, 2, 16)).astype(np.float32) for T in (1, 3, 40, 7)]
    expected = [frozen(x)[0] for x in xs]

    def work(i):
        for _ in range(20):
            np.testing.assert_array_equal(frozen(xs[i % 4])[0], expected[i % 4])

    run_all([lambda i=i: work(i) for i in range(8)])


@needs_fused
def test_a_layer_frozen_on_other_kernels_reads_its_weights_as_stored(simd_target):
    # Frozen with the kernels of one target and called on another's: the panels have
    # another layout and are not read; the results are still the layer's.
    layer = lstmfast.LSTM(7, 20, bidirectional=True).eval()
    x = np.random.default_rng(6).standard_normal((9, 3, 7)).astype(np.float32)
    frozen_here = lstmfast.freeze(layer)
    assert frozen_here._forward_params()["weight_hh_l0"].target == lstmfast._core.simd_target_builds(
        simd_target)[0]
    twin = reference_twin(layer, lambda **kw: lstmfast.LSTM(7, 20, bidirectional=True, **kw))
    for target in lstmfast._core.simd_targets():
        lstmfast._core.set_simd_target(target)
        assert_tree_close(frozen_here(x), twin(x), name=f"frozen on {simd_target}, run on {target}")
    lstmfast._core.set_simd_target(simd_target)


@needs_fused
def test_a_frozen_layer_exports_to_onnx_as_its_layer(tmp_path):
    pytest.importorskip("onnx")
    layer = lstmfast.GRU(4, 5, linear_before_reset=False).eval()
    assert lstmfast.freeze(layer).to_onnx() == layer.to_onnx()
