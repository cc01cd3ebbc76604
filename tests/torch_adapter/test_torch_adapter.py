"""lstmfast.torch: the torch.nn subclasses and accelerate(), against torch.nn itself."""

import io
import pickle
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import lstmfast.torch as lt  # noqa: E402
from lstmfast.torch import _backend as lt_backend  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

from helpers import BACKENDS, assert_close, tolerance  # noqa: E402


@pytest.fixture(params=BACKENDS)
def adapter_backend(request):
    return request.param


CLASSES = {"LSTM": (lt.LSTM, torch.nn.LSTM), "GRU": (lt.GRU, torch.nn.GRU), "RNN": (lt.RNN, torch.nn.RNN)}


def make_pair(kind, backend, dtype, **kwargs):
    """(ours, torch's) with the same weights."""
    ours_cls, torch_cls = CLASSES[kind]
    torch.manual_seed(0)
    theirs = torch_cls(**kwargs).to(dtype)
    ours = ours_cls(**kwargs).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    ours._lstmfast_backend = backend
    return ours, theirs


def run_and_grads(module, x, hx, upstream):
    x = x.clone().requires_grad_(True)
    inputs = [x]
    if hx is not None:
        hx = tuple(h.clone().requires_grad_(True) for h in hx) if isinstance(hx, tuple) else hx.clone().requires_grad_(True)
        inputs += list(hx) if isinstance(hx, tuple) else [hx]
    out, h = module(x, hx)
    outs = [out] + (list(h) if isinstance(h, tuple) else [h])
    loss = sum((o * u).sum() for o, u in zip(outs, upstream))
    grads = torch.autograd.grad(loss, inputs + list(module.parameters()))
    return outs, grads


CONFIGS = [
    ("LSTM", dict(input_size=3, hidden_size=5)),
    ("LSTM", dict(input_size=3, hidden_size=5, num_layers=2, bidirectional=True, proj_size=2)),
    ("LSTM", dict(input_size=4, hidden_size=3, num_layers=3, batch_first=True, bias=False)),
    ("GRU", dict(input_size=3, hidden_size=5, num_layers=2, bidirectional=True)),
    ("GRU", dict(input_size=1, hidden_size=1)),
    ("RNN", dict(input_size=3, hidden_size=4, nonlinearity="relu", num_layers=2)),
    ("RNN", dict(input_size=3, hidden_size=4, bidirectional=True, batch_first=True)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind, kwargs", CONFIGS)
@pytest.mark.parametrize("with_hx", [False, True])
def test_outputs_and_gradients_match_torch(adapter_backend, kind, kwargs, dtype, with_hx):
    ours, theirs = make_pair(kind, adapter_backend, dtype, **kwargs)
    g = torch.Generator().manual_seed(1)
    T, N = 6, 3
    D = 2 if kwargs.get("bidirectional") else 1
    L = kwargs.get("num_layers", 1)
    H = kwargs["hidden_size"]
    H_out = kwargs.get("proj_size", 0) or H
    shape = (N, T, kwargs["input_size"]) if kwargs.get("batch_first") else (T, N, kwargs["input_size"])
    x = torch.randn(shape, generator=g, dtype=dtype)
    hx = None
    if with_hx:
        h0 = torch.randn(D * L, N, H_out, generator=g, dtype=dtype)
        hx = (h0, torch.randn(D * L, N, H, generator=g, dtype=dtype)) if kind == "LSTM" else h0
    out_shape = (N, T, D * H_out) if kwargs.get("batch_first") else (T, N, D * H_out)
    upstream = [torch.randn(out_shape, generator=g, dtype=dtype), torch.randn(D * L, N, H_out, generator=g, dtype=dtype)]
    if kind == "LSTM":
        upstream.append(torch.randn(D * L, N, H, generator=g, dtype=dtype))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LSTM with projections is not supported with oneDNN.*")
        outs, grads = run_and_grads(ours, x, hx, upstream)
        ref_outs, ref_grads = run_and_grads(theirs, x, hx, upstream)
    for i, (a, b) in enumerate(zip(outs, ref_outs)):
        assert_close(a, b, tol=tolerance(dtype), name=f"output {i}")
    names = ["x"] + (["h0", "c0"] if (with_hx and kind == "LSTM") else ["h0"] if with_hx else [])
    names += [n for n, _ in ours.named_parameters()]
    for name, a, b in zip(names, grads, ref_grads):
        assert_close(a, b, tol=tolerance(dtype), name=f"grad {name}")


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_gradcheck_float64(adapter_backend, kind):
    kwargs = dict(input_size=2, hidden_size=3, num_layers=2, bidirectional=True)
    if kind == "LSTM":
        kwargs["proj_size"] = 2
    ours, _ = make_pair(kind, adapter_backend, torch.float64, **kwargs)
    g = torch.Generator().manual_seed(2)
    H_out = kwargs.get("proj_size", 3)
    x = torch.randn(4, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, H_out, generator=g, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in ours.named_parameters()]
    weights = [p.detach().clone().requires_grad_(True) for p in ours.parameters()]

    def f(x, h0, c0, *ws):
        hx = (h0, c0) if kind == "LSTM" else h0
        out, h = torch.func.functional_call(ours, dict(zip(names, ws)), (x, hx))
        return (out, *h) if kind == "LSTM" else (out, h)

    assert torch.autograd.gradcheck(f, (x, h0, c0, *weights), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_sequence_any_order(adapter_backend, kind, bidirectional):
    dtype = torch.float64
    ours, theirs = make_pair(kind, adapter_backend, dtype, input_size=3, hidden_size=4, num_layers=2,
                             bidirectional=bidirectional)
    lengths = torch.tensor([3, 7, 1, 5])
    x = torch.randn(7, 4, 3, dtype=dtype)
    results = []
    for module in (ours, theirs):
        xi = x.clone().requires_grad_(True)
        packed = pack_padded_sequence(xi, lengths, enforce_sorted=False)
        out, h = module(packed)
        assert torch.equal(out.batch_sizes, packed.batch_sizes)
        assert torch.equal(out.sorted_indices, packed.sorted_indices)
        padded, out_lengths = pad_packed_sequence(out, total_length=7)
        assert torch.equal(out_lengths, lengths)
        hs = h if isinstance(h, tuple) else (h,)
        loss = (padded * torch.linspace(-1, 1, padded.numel(), dtype=dtype).view_as(padded)).sum() + sum(
            (t ** 2).sum() for t in hs)
        (gx,) = torch.autograd.grad(loss, [xi])
        results.append((padded, *hs, gx))
    for i, (a, b) in enumerate(zip(*results)):
        assert_close(a, b, tol=tolerance(dtype), name=f"packed result {i}")


def test_unbatched_input_matches_torch(adapter_backend):
    ours, theirs = make_pair("GRU", adapter_backend, torch.float64, input_size=3, hidden_size=4, num_layers=2)
    x = torch.randn(5, 3, dtype=torch.float64)
    h0 = torch.randn(2, 4, dtype=torch.float64)
    (o1, h1), (o2, h2) = ours(x, h0), theirs(x, h0)
    assert o1.shape == (5, 4) and h1.shape == (2, 4)
    assert_close(o1, o2, tol=1e-10, name="output")
    assert_close(h1, h2, tol=1e-10, name="h_n")


def test_no_grad_keeps_nothing_and_matches(adapter_backend):
    ours, theirs = make_pair("LSTM", adapter_backend, torch.float32, input_size=3, hidden_size=4)
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        out, _ = ours(x)
        ref, _ = theirs(x)
    assert out.grad_fn is None
    assert_close(out, ref, tol=1e-5, name="output")


def test_state_dict_keys_and_save_load_round_trip(adapter_backend):
    ours, theirs = make_pair("LSTM", adapter_backend, torch.float32, input_size=3, hidden_size=4, num_layers=2,
                             bidirectional=True, proj_size=2)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    fresh = lt.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2)
    fresh.load_state_dict(torch.load(buf))
    for (k, a), b in zip(ours.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    buf = io.BytesIO()
    torch.save(ours, buf)  # the whole module pickles too
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(4, 2, 3)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LSTM with projections is not supported with oneDNN.*")
        assert torch.equal(loaded(x)[0], ours(x)[0])


def test_public_names_live_in_lstmfast_torch_whichever_module_defines_them():
    # pickle and torch.save record a class by __module__ and __qualname__: with
    # lstmfast.torch recorded, a saved model loads across moves inside the package,
    # and models saved when lstmfast.torch was one file load now.
    for name in lt.__all__:
        obj = getattr(lt, name)
        assert obj.__module__ == "lstmfast.torch", name
        assert getattr(sys.modules[obj.__module__], obj.__qualname__) is obj, name
    saved = pickle.dumps(lt.PeepholeLSTM(2, 3), protocol=0)  # protocol 0 names classes as text
    assert b"clstmfast.torch\nPeepholeLSTM\n" in saved
    assert type(pickle.loads(saved)) is lt.PeepholeLSTM


class _Classifier(torch.nn.Module):
    def __init__(self, rnn_cls):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh())
        self.encoders = torch.nn.ModuleList([rnn_cls(3, 8, batch_first=True)])
        self.heads = torch.nn.ModuleDict({"out": torch.nn.Linear(8, 2)})

    def forward(self, x):
        out, _ = self.encoders[0](self.body(x))
        return self.heads["out"](out[:, -1])


@pytest.mark.parametrize("rnn_cls", [torch.nn.LSTM, torch.nn.GRU])
def test_training_with_adam_matches_torch(adapter_backend, rnn_cls):
    torch.manual_seed(0)
    reference = _Classifier(rnn_cls)
    model = _Classifier(rnn_cls)
    model.load_state_dict(reference.state_dict())
    model = lt.accelerate(model)
    model.encoders[0]._lstmfast_backend = adapter_backend
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 12, 2, generator=g)
    y = (x[:, :, 0].sum(1) > 0).long()
    losses = []
    for m in (model, reference):
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        trace = []
        for _ in range(20):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            trace.append(loss.item())
        losses.append(np.array(trace))
    rel = np.abs(losses[0] - losses[1]).max() / np.abs(losses[1]).max()
    assert rel <= 1e-5, f"losses differ by {rel:.3g} relative: {losses[0]} vs {losses[1]}"
    assert losses[1][-1] < losses[1][0]  # the task is learnable, so the comparison means something


def test_accelerate_swaps_nested_modules_in_place():
    model = torch.nn.Sequential(
        torch.nn.ModuleDict({"a": torch.nn.LSTM(2, 3), "b": torch.nn.ModuleList([torch.nn.GRU(3, 3)])}),
        torch.nn.RNN(3, 2, nonlinearity="relu"),
    )
    model.eval()
    params_before = [id(p) for p in model.parameters()]
    values_before = [p.detach().clone() for p in model.parameters()]
    assert lt.accelerate(model) is model
    assert type(model[0]["a"]) is lt.LSTM
    assert type(model[0]["b"][0]) is lt.GRU
    assert type(model[1]) is lt.RNN and model[1].nonlinearity == "relu"
    assert [id(p) for p in model.parameters()] == params_before
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), values_before))
    assert not model[1].training
    lone = torch.nn.LSTM(2, 2)
    assert type(lt.accelerate(lone)) is lt.LSTM
    with pytest.raises(TypeError, match="torch.nn.Module"):
        lt.accelerate("not a model")


def test_unsupported_dtype_falls_back_with_one_warning():
    lt_backend._warned.clear()
    m = lt.GRU(3, 4).to(torch.bfloat16)
    x = torch.randn(5, 2, 3, dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="bfloat16 is not supported"):
        out, _ = m(x)
    expected, _ = torch.nn.GRU.forward(m, x)
    assert torch.equal(out, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x)  # a second call does not warn again


def test_dropout_follows_training_flag(adapter_backend):
    m = lt.LSTM(3, 4, num_layers=2, dropout=0.5)
    m._lstmfast_backend = adapter_backend
    x = torch.randn(6, 2, 3)
    m.eval()
    a, b = m(x)[0], m(x)[0]
    assert torch.equal(a, b)
    m.train()
    torch.manual_seed(0)
    c = m(x)[0]
    torch.manual_seed(0)
    d = m(x)[0]
    torch.manual_seed(1)
    e = m(x)[0]
    assert torch.equal(c, d) and not torch.equal(c, e)


PLAIN_CONFIGS = [
    ("LSTM", dict(input_size=3, hidden_size=5)),
    ("LSTM", dict(input_size=3, hidden_size=5, num_layers=2, bidirectional=True, proj_size=2)),
    ("LSTM", dict(input_size=4, hidden_size=3, batch_first=True, bias=False)),
    ("GRU", dict(input_size=3, hidden_size=5, num_layers=2, bidirectional=True, batch_first=True)),
    ("GRU", dict(input_size=3, hidden_size=17, linear_before_reset=False)),
    ("RNN", dict(input_size=3, hidden_size=4, nonlinearity="relu", bias=False)),
    ("RNN", dict(input_size=3, hidden_size=4, num_layers=2)),
]


@pytest.mark.skipif("fused" not in BACKENDS, reason="the fused kernels are not built")
@pytest.mark.parametrize("kind, kwargs", PLAIN_CONFIGS)
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("with_hx", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "frozen"])
def test_plain_inference_calls_take_the_short_path_and_match_torch(kind, kwargs, T, with_hx, dtype,
                                                                    context, monkeypatch):
    # A stream's frames and a batch at inference skip the full path's steps
    # (layers._plain_inference_forward): the results must be torch's all the same.
    from lstmfast.torch import layers as lt_layers

    taken = []
    original = lt_layers._plain_inference_forward
    monkeypatch.setattr(lt_layers, "_plain_inference_forward",
                        lambda *a: taken.append(original(*a) is not None) or original(*a))
    torch_kwargs = {k: v for k, v in kwargs.items() if k != "linear_before_reset"}
    ours = CLASSES[kind][0](**kwargs).to(dtype).eval()
    if kwargs.get("linear_before_reset", True):
        theirs = CLASSES[kind][1](**torch_kwargs).to(dtype).eval()
        theirs.load_state_dict(ours.state_dict())
    else:  # torch has no such GRU: lstmfast's own loop of torch ops is the oracle
        theirs = CLASSES[kind][0](**kwargs).to(dtype).eval()
        theirs.load_state_dict(ours.state_dict())
        theirs._lstmfast_backend = "numpy"
    g = torch.Generator().manual_seed(11)
    N, D = 3, 2 if kwargs.get("bidirectional") else 1
    L, H = kwargs.get("num_layers", 1), kwargs["hidden_size"]
    H_out = kwargs.get("proj_size", 0) or H
    shape = (N, T, kwargs["input_size"]) if kwargs.get("batch_first") else (T, N, kwargs["input_size"])
    x = torch.randn(shape, generator=g, dtype=dtype)
    hx = None
    if with_hx:
        h0 = torch.randn(D * L, N, H_out, generator=g, dtype=dtype)
        hx = (h0, torch.randn(D * L, N, H, generator=g, dtype=dtype)) if kind == "LSTM" else h0
    if context == "frozen":
        for module in (ours, theirs):
            module.requires_grad_(False)
        manager = torch.enable_grad()
    else:
        manager = getattr(torch, context)()
    with manager, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LSTM with projections is not supported with oneDNN.*")
        got, expected = ours(x, hx), theirs(x, hx)
    assert taken and taken[0], "the short path did not take the call"
    flat = lambda r: [r[0]] + (list(r[1]) if isinstance(r[1], tuple) else [r[1]])  # noqa: E731
    for i, (a, b) in enumerate(zip(flat(got), flat(expected))):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        assert_close(a, b, tol=tolerance(dtype), name=f"result {i}")


@pytest.mark.skipif("fused" not in BACKENDS, reason="the fused kernels are not built")
@pytest.mark.parametrize("case", ["packed", "unbatched", "hx_wrong_shape", "hx_wrong_dtype",
                                  "input_wrong_size", "dropout_training", "recurrent_dropout",
                                  "needs_grad", "autocast", "numpy_backend"])
def test_calls_the_short_path_leaves_to_the_full_one(case, monkeypatch):
    # Everything but the plain call goes the full way, which gives torch's results
    # and raises torch's errors.
    from lstmfast.torch import layers as lt_layers

    taken = []
    original = lt_layers._plain_inference_forward
    monkeypatch.setattr(lt_layers, "_plain_inference_forward",
                        lambda *a: taken.append(original(*a) is not None) or original(*a))
    kwargs = dict(input_size=3, hidden_size=4, num_layers=2)
    if case == "recurrent_dropout":
        kwargs["recurrent_dropout"] = 0.5
    if case == "dropout_training":
        kwargs["dropout"] = 0.5
    ours = lt.LSTM(**kwargs).train(case in ("dropout_training", "recurrent_dropout"))
    theirs = torch.nn.LSTM(**{k: v for k, v in kwargs.items() if k != "recurrent_dropout"})
    theirs.load_state_dict(ours.state_dict())
    theirs.train(ours.training)
    if case == "numpy_backend":
        ours._lstmfast_backend = "numpy"
    x = torch.randn(5, 2, 3)
    hx = None
    if case == "packed":
        x = pack_padded_sequence(x, torch.tensor([5, 3]))
    elif case == "unbatched":
        x = x[:, 0]
    elif case == "hx_wrong_shape":
        hx = (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    elif case == "hx_wrong_dtype":
        hx = (torch.zeros(2, 2, 4, dtype=torch.float64), torch.zeros(2, 2, 4, dtype=torch.float64))
    elif case == "input_wrong_size":
        x = torch.randn(5, 2, 4)
    with torch.enable_grad() if case == "needs_grad" else torch.no_grad():
        if case == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ours(x, hx)
        else:
            try:
                expected = theirs(x, hx)
            except Exception as e:  # noqa: BLE001  (torch's error is the oracle)
                with pytest.raises(type(e)) as raised:
                    ours(x, hx)
                assert str(raised.value) == str(e)
            else:
                if case not in ("dropout_training", "recurrent_dropout"):
                    got = ours(x, hx)
                    a, b = (got[0].data, expected[0].data) if case == "packed" else (got[0], expected[0])
                    assert_close(a, b, tol=1e-5, name="output")
                else:
                    ours(x, hx)
    assert taken and not any(taken), taken


NAN_CASES = [("LSTM", {}), ("GRU", {}), ("RNN", {}), ("RNN", {"nonlinearity": "relu"})]


@pytest.mark.parametrize("place", ["input", "weight_hh"])
@pytest.mark.parametrize("kind, options", NAN_CASES, ids=["LSTM", "GRU", "RNN_tanh", "RNN_relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_nan_reaches_the_entries_torch_gives_nan(kind, options, dtype, place, adapter_backend):
    # A diverged model must not look finite: NaN in the input or a weight gives NaN in
    # the same outputs and gradients as torch's, the other entries equal.
    ours, theirs = make_pair(kind, adapter_backend, dtype, input_size=3, hidden_size=4, **options)
    x = torch.randn(5, 3, 3, dtype=dtype, generator=torch.Generator().manual_seed(1))
    if place == "input":
        x[2, 1, 0] = float("nan")
    results = []
    for module in (ours, theirs):
        if place == "weight_hh":
            with torch.no_grad():
                module.weight_hh_l0[1, 2] = float("nan")
        xx = x.clone().requires_grad_(True)
        y, _ = module(xx)
        y.sum().backward()
        results.append({"output": y.detach(), "input grad": xx.grad,
                        **{name: p.grad for name, p in module.named_parameters()}})
    got, expected = results
    assert torch.isnan(expected["output"]).any()
    for name in expected:
        nan = torch.isnan(expected[name])
        assert torch.equal(torch.isnan(got[name]), nan), name
        assert_close(got[name].masked_fill(nan, 0), expected[name].masked_fill(nan, 0), name=name)


MODULES = {"LSTM": (lt.LSTM, torch.nn.LSTM), "GRU": (lt.GRU, torch.nn.GRU), "RNN": (lt.RNN, torch.nn.RNN),
           "LSTMCell": (lt.LSTMCell, torch.nn.LSTMCell), "GRUCell": (lt.GRUCell, torch.nn.GRUCell),
           "RNNCell": (lt.RNNCell, torch.nn.RNNCell)}


def module_pair(name):
    ours_cls, torch_cls = MODULES[name]
    torch.manual_seed(0)
    theirs = torch_cls(3, 4)
    ours = ours_cls(3, 4)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def module_input(name):
    return torch.randn((2, 3) if name.endswith("Cell") else (5, 2, 3), generator=torch.Generator().manual_seed(1))


def first(result):
    return result[0] if isinstance(result, tuple) else result


@pytest.mark.parametrize("name", list(MODULES))
def test_dispatch_modes_and_tensor_subclasses_see_torch_s_ops(name):
    # The kernels read plain memory behind torch's back: FakeTensorMode has none to give
    # them and FlopCounterMode would see no op, and a __torch_function__ subclass would
    # come back a plain tensor. Such calls run torch's ops, as torch's module does.
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    ours, theirs = module_pair(name)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = module_input(name)
        got, expected = first(ours(fake)), first(theirs(fake))
    assert isinstance(got, FakeTensor) and got.shape == expected.shape

    counts = []
    for module in (ours, theirs):
        with FlopCounterMode(display=False) as counter:
            module(module_input(name))
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1]

    class Tagged(torch.Tensor):
        pass

    got, expected = first(ours(module_input(name).as_subclass(Tagged))), first(theirs(module_input(name)))
    assert type(got) is Tagged
    assert_close(got.as_subclass(torch.Tensor).detach(), expected.detach())
