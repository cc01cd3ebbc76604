"""lstmfast.torch.freeze: an inference copy of a model whose recurrent layers and cells
have their weights packed once.

Oracles: the unfrozen lstmfast.torch module with the same weights (itself held to
torch.nn in test_torch_adapter.py), and torch.nn where it has the module, at the
project's tolerance. That the frozen module really runs on packed weights is read
off the cache the calls use (a PackedWeight for each weight_ih and weight_hh).
"""

import copy
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import lstmfast.torch as lt  # noqa: E402
from lstmfast.torch import _backend as lt_backend  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402

from helpers import assert_close, fused_available, run_all  # noqa: E402

pytestmark = pytest.mark.skipif(not fused_available(), reason="the fused kernels are not built")

# name, constructor, whether the kernels read packed weights for it
MODULES = [
    ("LSTM", lambda: lt.LSTM(6, 9), True),
    ("LSTM-stack", lambda: lt.LSTM(6, 9, num_layers=2, bidirectional=True, batch_first=True), True),
    ("LSTM-proj", lambda: lt.LSTM(6, 9, proj_size=4), False),
    ("LSTM-hard-sigmoid", lambda: lt.LSTM(6, 9, activations=["HardSigmoid", "Tanh", "Tanh"],
                                          clip=3.0), True),
    ("LSTM-elu", lambda: lt.LSTM(6, 9, activations=["Sigmoid", "Elu", "Tanh"]), False),
    ("GRU", lambda: lt.GRU(6, 9, bias=False), True),
    ("GRU-reset-before", lambda: lt.GRU(6, 9, linear_before_reset=False), True),
    ("RNN-relu", lambda: lt.RNN(6, 9, nonlinearity="relu", num_layers=2), True),
    ("PeepholeLSTM", lambda: lt.PeepholeLSTM(6, 9), True),
    ("LayerNormLSTM", lambda: lt.LayerNormLSTM(6, 9), True),
    ("CTRNN", lambda: lt.CTRNN(6, 9, alpha=0.3), True),
    ("LSTMCell", lambda: lt.LSTMCell(6, 9), True),
    ("GRUCell", lambda: lt.GRUCell(6, 9), True),
    ("RNNCell", lambda: lt.RNNCell(6, 9), True),
]
IDS = [name for name, _, _ in MODULES]
DTYPES = [torch.float32, torch.float64]


def is_cell(module):
    return isinstance(module, torch.nn.RNNCellBase)


def inputs(module, g, T, N, dtype):
    if is_cell(module):
        return torch.randn(N, module.input_size, generator=g, dtype=dtype)
    shape = (N, T, module.input_size) if module.batch_first else (T, N, module.input_size)
    return torch.randn(shape, generator=g, dtype=dtype)


def initial_state(module, g, N, dtype):
    if is_cell(module):
        h = torch.randn(N, module.hidden_size, generator=g, dtype=dtype)
        return (h, torch.randn_like(h)) if isinstance(module, torch.nn.LSTMCell) else h
    D = 2 if module.bidirectional else 1
    H_out = module.proj_size or module.hidden_size
    h = torch.randn(D * module.num_layers, N, H_out, generator=g, dtype=dtype)
    if module.mode == "LSTM":
        return h, torch.randn(D * module.num_layers, N, module.hidden_size, generator=g,
                              dtype=dtype)
    return h


def flat(result):
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for part in result for t in flat(part)]


def assert_same_function(got, want):
    for a, b in zip(flat(got), flat(want), strict=True):
        assert_close(a.detach().numpy(), b.detach().numpy())


def cached_arrays(module):
    entry = lt_backend._weight_views.get(module)
    return None if entry is None else entry[1][0]


def weight_names(module):
    if is_cell(module):
        return ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    return module._lstmfast_weights()[1]


def assert_packed(module, packs):
    """The arrays the frozen module's calls take: weight_ih and weight_hh packed
    (holding the module's current values) exactly where its kernels read them packed."""
    arrays = cached_arrays(module)
    assert arrays is not None
    packed_type = lt_backend._backend("fused")._core.PackedWeight
    for name, array in zip(weight_names(module), arrays, strict=True):
        is_gate_weight = name.startswith(("weight_ih", "weight_hh"))
        assert isinstance(array, packed_type) == (packs and is_gate_weight), name
        if isinstance(array, packed_type):
            np.testing.assert_array_equal(array.weight, getattr(module, name).detach().numpy())


def made(make, dtype):
    torch.manual_seed(0)
    return make().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, make, packs", MODULES, ids=IDS)
def test_frozen_computes_the_same_function_on_packed_weights(name, make, packs, dtype):
    module = made(make, dtype).eval()
    frozen = lt.freeze(module)
    assert type(frozen) is type(module) and frozen is not module
    assert frozen._lstmfast_frozen and not frozen.training
    assert_packed(frozen, packs)  # packed by freeze, before any call
    packed_at_freeze = cached_arrays(frozen)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # (a cell takes one step whatever T is: its cases differ by N and states)
        for T, N, with_state in [(1, 1, False), (1, 3, True), (7, 3, True), (40, 2, False)]:
            x = inputs(module, g, T, N, dtype)
            hx = initial_state(module, g, N, dtype) if with_state else None
            assert_same_function(frozen(x, hx), module(x, hx))
    # the calls took the weights packed by freeze, not packed again
    assert all(a is b for a, b in zip(cached_arrays(frozen), packed_at_freeze, strict=True))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_frozen_matches_torch_nn(kind):
    torch.manual_seed(0)
    theirs = getattr(torch.nn, kind)(5, 7, num_layers=2).eval()
    frozen = lt.freeze(theirs)  # a torch module: accelerated in the copy
    assert type(frozen) is getattr(lt, kind) and type(theirs) is getattr(torch.nn, kind)
    assert_packed(frozen, True)
    x = torch.randn(12, 3, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_same_function(frozen(x), theirs(x))


def test_the_model_given_is_left_as_it_was():
    model = torch.nn.Sequential(lt.LSTM(4, 6), lt.GRU(6, 5)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = lt.freeze(model)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert not any(m._lstmfast_frozen for m in model)
    assert cached_arrays(model[0]) is None or not any(
        isinstance(a, lt_backend._backend("fused")._core.PackedWeight) for a in cached_arrays(model[0]))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_a_whole_model_is_copied_accelerated_and_frozen():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"rnn": torch.nn.GRU(4, 6, batch_first=True),
                                 "cell": torch.nn.LSTMCell(6, 5),
                                 "head": torch.nn.Linear(5, 2)})
    frozen = lt.freeze(model)
    assert type(frozen["rnn"]) is lt.GRU and type(frozen["cell"]) is lt.LSTMCell
    assert type(frozen["head"]) is torch.nn.Linear and not frozen["head"].training
    assert frozen["head"].weight.requires_grad  # only the recurrent modules are frozen
    x = torch.randn(2, 9, 4, generator=torch.Generator().manual_seed(1))

    def run(m):
        out, _ = m["rnn"](x)
        h = m["cell"](out[:, -1])
        return m["head"](h[0])

    with torch.no_grad():
        assert_same_function(run(frozen), run(model))


def test_packed_sequences():
    module = made(lambda: lt.LSTM(5, 8, num_layers=2, bidirectional=True), torch.float32).eval()
    frozen = lt.freeze(module)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 4, 5, generator=g)
    packed = pack_padded_sequence(x, [9, 3, 6, 1], enforce_sorted=False)
    with torch.no_grad():
        out_f, states_f = frozen(packed)
        out_m, states_m = module(packed)
    assert_same_function((out_f.data, states_f), (out_m.data, states_m))


@pytest.mark.parametrize("how", ["load_state_dict", "copy_"])
def test_a_counted_change_of_the_weights_packs_them_again(how):
    module = made(lambda: lt.LSTM(5, 8), torch.float32).eval()
    frozen = lt.freeze(module)
    other = made(lambda: lt.LSTM(5, 8), torch.float32).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-0.5)
    x = torch.randn(6, 2, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        frozen(x)
        if how == "load_state_dict":
            frozen.load_state_dict(other.state_dict())
        else:
            for name, p in frozen.named_parameters():
                p.copy_(getattr(other, name))
        assert_same_function(frozen(x), other(x))
    assert_packed(frozen, True)


@pytest.mark.parametrize("name, make, packs", [m for m in MODULES if m[0] in
                                               ("LSTM-stack", "GRU", "LSTMCell")], ids=
                         ["LSTM-stack", "GRU", "LSTMCell"])
def test_gradients_reach_the_input_and_parameters_asked_for_again(name, make, packs):
    module = made(make, torch.float64).eval()
    frozen = lt.freeze(module)
    g = torch.Generator().manual_seed(1)
    x = inputs(module, g, 5, 3, torch.float64)

    def grads(m, with_params):
        xx = x.clone().requires_grad_(True)
        params = list(m.parameters()) if with_params else []
        loss = sum((t * t).sum() for t in flat(m(xx)))
        return torch.autograd.grad(loss, [xx] + params)

    for a, b in zip(grads(frozen, False), grads(module, False), strict=True):
        assert_close(a.numpy(), b.numpy())
    for p in frozen.parameters():
        p.requires_grad_(True)
    for a, b in zip(grads(frozen, True), grads(module, True), strict=True):
        assert_close(a.numpy(), b.numpy())
    assert_packed(frozen, packs)


def test_a_parametrized_weight_is_packed_as_computed():
    from torch.nn.utils import parametrizations

    module = made(lambda: lt.LSTM(5, 8), torch.float32).eval()
    parametrizations.weight_norm(module, "weight_hh_l0")
    frozen = lt.freeze(module)
    x = torch.randn(7, 2, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        frozen.parametrizations.weight_hh_l0.original0.mul_(2.0)  # a counted change
        module.parametrizations.weight_hh_l0.original0.mul_(2.0)
        for _ in range(2):
            assert_same_function(frozen(x), module(x))
    assert_packed(frozen, True)


def test_copies_and_pickles_pack_again_at_their_first_call():
    module = made(lambda: lt.GRU(5, 8, num_layers=2), torch.float32).eval()
    frozen = lt.freeze(module)
    buffer = io.BytesIO()
    torch.save(frozen, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(frozen), torch.load(buffer, weights_only=False)]
    x = torch.randn(6, 2, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = module(x)
        for c in copies:
            assert c._lstmfast_frozen and cached_arrays(c) is None
            assert_same_function(c(x), want)
            assert_packed(c, True)


@pytest.mark.filterwarnings("ignore::DeprecationWarning",
                            "ignore::UserWarning")  # torch.ao's migration notes
def test_int8_layers_are_left_as_they_are():
    torch.manual_seed(0)
    model = lt.quantize_dynamic(torch.nn.Sequential(torch.nn.LSTM(5, 8)))
    frozen = lt.freeze(model)
    assert type(frozen[0]) is lt.QuantizedLSTM and not frozen[0]._lstmfast_frozen
    x = torch.randn(6, 2, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_same_function(frozen(x), model(x))


def test_bfloat16_autocast_runs_as_unfrozen():
    module = made(lambda: lt.LSTM(5, 8), torch.float32).eval()
    frozen = lt.freeze(module)
    x = torch.randn(6, 2, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = frozen(x), module(x)
    for a, b in zip(flat(got), flat(want), strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_threads_share_a_frozen_model():
    module = made(lambda: lt.LSTM(16, 32, num_layers=2), torch.float32).eval()
    frozen = lt.freeze(module)
    xs = [torch.randn(5, 2, 16, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with torch.no_grad():
        want = [module(x)[0] for x in xs]

    def run(x):
        with torch.no_grad():
            return [frozen(x)[0] for _ in range(20)][-1]

    got = run_all([lambda x=x: run(x) for x in xs])
    for a, b in zip(got, want, strict=True):
        assert_close(a.numpy(), b.numpy())


def test_weights_the_kernels_do_not_take_are_left_to_torch_unpacked():
    frozen = lt.freeze(lt.LSTM(4, 5).to(torch.float16))  # torch's implementation runs it
    assert frozen._lstmfast_frozen and cached_arrays(frozen) is None


@pytest.mark.parametrize("model", [lt.LSTM(2, 3).state_dict(), "model", None])
def test_not_a_module(model):
    with pytest.raises(TypeError, match="freeze: model must be a torch.nn.Module, got"):
        lt.freeze(model)
