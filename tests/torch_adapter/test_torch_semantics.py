"""lstmfast.torch behaves as torch.nn where torch's machinery reaches into a module:
functional_call, parametrizations, double backward, version counters, tracing,
scripting, export (torch.export, ONNX), torch.func transforms, autocast, torch's
errors, torch.compile, restore(), and the cells. Each test runs the same module as
plain torch.nn and as lstmfast.torch (accelerate() on a deep copy) and compares.
"""

import contextlib
import copy
import importlib
import io
import pkgutil
import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import lstmfast.torch as lt  # noqa: E402
from lstmfast.torch import _backend as lt_backend  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402

from helpers import BACKENDS, assert_close, tolerance  # noqa: E402

pytestmark = pytest.mark.skipif("fused" not in BACKENDS, reason="the fused kernels are not built")

LAYERS = {
    "LSTM": (nn.LSTM, dict(num_layers=2, bidirectional=True)),
    "LSTM-proj": (nn.LSTM, dict(proj_size=3, batch_first=True)),
    "GRU": (nn.GRU, dict(num_layers=2, bidirectional=True)),
    "RNN-relu": (nn.RNN, dict(nonlinearity="relu", num_layers=2)),
}
CELLS = {
    "LSTMCell": (nn.LSTMCell, {}),
    "GRUCell": (nn.GRUCell, {}),
    "RNNCell-tanh": (nn.RNNCell, dict(nonlinearity="tanh")),
    "RNNCell-relu": (nn.RNNCell, dict(nonlinearity="relu", bias=False)),
}
I, H = 4, 5


def twins(cls, kwargs, dtype=torch.float64, seed=0):
    """(torch's module, the same module accelerated) with identical parameters."""
    torch.manual_seed(seed)
    theirs = cls(I, H, dtype=dtype, **kwargs)
    ours = lt.accelerate(copy.deepcopy(theirs))
    assert type(ours).__module__ == "lstmfast.torch"
    return theirs, ours


@contextlib.contextmanager
def kernel_calls_recorded(calls):
    """Each call of the kernels on a whole stack or on one cell step recorded in
    ``calls`` as "layer" or "cell". The functions are patched in every module of
    lstmfast.torch that binds them, since each looks them up in its own namespace:
    the autograd Functions call them when a gradient is needed, the layers and
    cells when none is, and a plain call at inference takes a short path (which
    calls the kernels when it returns a result)."""
    package = importlib.import_module("lstmfast.torch")
    modules = [importlib.import_module(f"{package.__name__}.{info.name}")
               for info in pkgutil.iter_modules(package.__path__)]
    patched = [(module, name, what, vars(module)[name])
               for name, what in (("_stack_step", "layer"), ("_cell_step", "cell"),
                                  ("_plain_inference_forward", "layer"),
                                  ("_plain_cell_forward", "cell"))
               for module in modules if name in vars(module)]

    def recording(what, original, short):
        def call(*a):
            result = original(*a)
            if not short or result is not None:
                calls.append(what)
            return result
        return call

    try:
        for module, name, what, original in patched:
            setattr(module, name, recording(what, original, name.startswith("_plain_")))
        yield
    finally:
        for module, name, _, original in patched:
            setattr(module, name, original)


def layer_input(module, dtype=torch.float64, T=6, N=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (N, T, I) if module.batch_first else (T, N, I)
    return torch.randn(shape, generator=g, dtype=dtype)


def first_output(result):
    """The tensor output of a layer (output of (output, h)) or a cell (h, or h of (h, c))."""
    return result[0] if isinstance(result, tuple) else result


def all_outputs(result):
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for r in result for t in all_outputs(r)]


def outcome(fn):
    """What fn() gives: its tensors, or the type and message of what it raised."""
    try:
        return all_outputs(fn())
    except Exception as e:  # noqa: BLE001  (we compare whatever torch raises)
        return (type(e), str(e))


def assert_same_outcome(got, expected, dtype=torch.float64, what=""):
    if isinstance(expected, tuple):
        assert got == expected, f"{what}: torch gave {expected}, lstmfast gave {got}"
        return
    assert not isinstance(got, tuple), f"{what}: torch computed, lstmfast raised {got}"
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.dtype == b.dtype, f"{what}: output {i} dtype {a.dtype} != {b.dtype}"
        # float32 and float64 at their tolerance; anything else (autocast's bfloat16,
        # integer indices) to 1e-2
        tol = tolerance(b.dtype) if b.dtype in (torch.float32, torch.float64) else 1e-2
        assert_close(a, b, tol=tol, name=f"{what} output {i}")


# --- functional_call and parametrizations --------------------------------------------


@pytest.mark.parametrize("kind", list(LAYERS) + list(CELLS))
def test_functional_call_uses_the_given_parameters(kind):
    cls, kwargs = {**LAYERS, **CELLS}[kind]
    theirs, ours = twins(cls, kwargs)
    x = layer_input(theirs) if kind in LAYERS else torch.randn(3, I, dtype=torch.float64)
    grads = []
    for module in (theirs, ours):
        params = {k: (1.5 * v).detach().requires_grad_(True) for k, v in theirs.named_parameters()}
        out = first_output(torch.func.functional_call(module, params, (x,)))
        out.pow(2).sum().backward()
        grads.append((out, params))
    (out_t, p_t), (out_o, p_o) = grads
    assert_close(out_o, out_t, tol=1e-10, name="output")
    assert (out_o - first_output(ours(x))).abs().max() > 1e-3  # the stored weights were not used
    for name in p_t:
        assert_close(p_o[name].grad, p_t[name].grad, tol=1e-10, name=f"grad {name}")


PARAMETRIZATIONS = {
    "weight_norm": lambda m, name: nn.utils.parametrizations.weight_norm(m, name),
    "spectral_norm": lambda m, name: nn.utils.parametrizations.spectral_norm(m, name),
    "orthogonal": lambda m, name: nn.utils.parametrizations.orthogonal(m, name),
    "custom": lambda m, name: nn.utils.parametrize.register_parametrization(m, name, _Scaled()),
}


class _Scaled(nn.Module):
    def forward(self, w):
        return 0.5 * w.tanh()


@pytest.mark.parametrize("parametrization", list(PARAMETRIZATIONS))
@pytest.mark.parametrize("order", ["accelerate_after", "accelerate_before"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "LSTMCell"])
def test_parametrizations_drive_forward_and_get_gradients(kind, parametrization, order):
    cls, kwargs = {**LAYERS, **CELLS}[kind]
    name = "weight_hh_l0" if kind in LAYERS else "weight_hh"
    if parametrization == "orthogonal":  # a square weight
        name = "weight_ih_l1" if kind in LAYERS else name
    torch.manual_seed(0)
    theirs = cls(I, H, dtype=torch.float64, **kwargs)
    ours = copy.deepcopy(theirs)
    if order == "accelerate_before":
        lt.accelerate(ours)
    for module in (theirs, ours):
        torch.manual_seed(1)  # spectral_norm draws its starting vectors
        PARAMETRIZATIONS[parametrization](module, name)
    if order == "accelerate_after":
        lt.accelerate(ours)
    assert isinstance(ours, getattr(lt, cls.__name__))
    x = layer_input(theirs) if kind in LAYERS else torch.randn(3, I, dtype=torch.float64)
    outs = []
    for module in (theirs, ours):
        out = first_output(module(x))
        out.sin().sum().backward()
        outs.append(out)
    assert_close(outs[1], outs[0], tol=1e-10, name="output")
    originals = [dict(m.parametrizations[name].named_parameters()) for m in (theirs, ours)]
    assert originals[0]
    for key in originals[0]:
        assert originals[0][key].grad is not None
        assert_close(originals[1][key].grad, originals[0][key].grad, tol=1e-10, name=f"grad {key}")


# --- autograd: double backward, version counters -------------------------------------


def _double_backward(module, x, hx):
    x = x.clone().requires_grad_(True)
    out = module(x, hx)
    (gx,) = torch.autograd.grad(first_output(out).pow(2).sum(), x, create_graph=True)
    penalty = gx.pow(2).sum()  # a gradient penalty: needs the graph of the gradient
    penalty.backward()
    return [gx, x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("kind", list(LAYERS) + list(CELLS))
@pytest.mark.parametrize("with_hx", [False, True])
def test_double_backward_matches_torch(kind, with_hx):
    cls, kwargs = {**LAYERS, **CELLS}[kind]
    theirs, ours = twins(cls, kwargs)
    if kind in LAYERS:
        x = layer_input(theirs)
        D = 2 if theirs.bidirectional else 1
        h_size = theirs.proj_size or H
        h0 = torch.randn(D * theirs.num_layers, 3, h_size, dtype=torch.float64)
        c0 = torch.randn(D * theirs.num_layers, 3, H, dtype=torch.float64)
        hx = ((h0, c0) if cls is nn.LSTM else h0) if with_hx else None
    else:
        x = torch.randn(3, I, dtype=torch.float64)
        h0, c0 = torch.randn(3, H, dtype=torch.float64), torch.randn(3, H, dtype=torch.float64)
        hx = ((h0, c0) if cls is nn.LSTMCell else h0) if with_hx else None
    expected = _double_backward(theirs, x, hx)
    got = _double_backward(ours, x, hx)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert_close(a, b, tol=1e-10, name=f"double backward tensor {i}")
    assert expected[1].abs().max() > 0  # the penalty reached x


@pytest.mark.parametrize("kind", list(LAYERS) + list(CELLS))
def test_batched_gradients_check_as_torchs(kind):
    # gradcheck's batched-gradient check vmaps the backward over a batch of output
    # gradients (torch's first vmap, torch._vmap_internals); torch.func.vmap over a
    # vjp is the other way in. Both must give torch's gradients.
    cls, kwargs = {**LAYERS, **CELLS}[kind]
    theirs, ours = twins(cls, kwargs)
    x = (layer_input(theirs, T=3, N=2) if kind in LAYERS
         else torch.randn(2, I, dtype=torch.float64)).requires_grad_()
    params = dict(ours.named_parameters())

    def run(module, x, *weights):
        result = torch.func.functional_call(module, dict(zip(params, weights)), (x,))
        return first_output(result)

    assert torch.autograd.gradcheck(lambda x, *w: run(ours, x, *w), (x, *params.values()),
                                    check_batched_grad=True)
    out, vjp = torch.func.vjp(lambda x: run(ours, x, *params.values()), x)
    grads = torch.randn((3,) + out.shape, dtype=torch.float64)
    expected = torch.stack([torch.autograd.grad(run(theirs, x, *theirs.parameters()), x, g)[0]
                            for g in grads])
    assert_close(torch.func.vmap(vjp)(grads)[0], expected, tol=1e-10, name="vmapped vjp")


@pytest.mark.parametrize("kind", list(CELLS))
def test_cells_of_no_hidden_units_give_torchs_empty_results(kind):
    cls, kwargs = CELLS[kind]
    torch.manual_seed(0)
    theirs = cls(I, 0, dtype=torch.float64, **kwargs)
    ours = lt.accelerate(copy.deepcopy(theirs))
    for x in (torch.randn(3, I, dtype=torch.float64), torch.randn(I, dtype=torch.float64)):
        got, expected = all_outputs(ours(x)), all_outputs(theirs(x))
        assert [t.shape for t in got] == [t.shape for t in expected]
        assert all(t.numel() == 0 and t.dtype == torch.float64 for t in got)


def test_double_backward_packed_sequence_with_dropout_masks():
    theirs, ours = twins(nn.LSTM, dict(num_layers=2, bidirectional=True))
    ours.dropout = theirs.dropout = 0.0  # same computation; the masks path is run in eval below
    lengths = torch.tensor([6, 2, 4])
    x = layer_input(theirs)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    results = []
    for module in (theirs, ours):
        data = packed.data.clone().requires_grad_(True)
        p = torch.nn.utils.rnn.PackedSequence(data, packed.batch_sizes, packed.sorted_indices,
                                              packed.unsorted_indices)
        out, (h_n, c_n) = module(p)
        (g,) = torch.autograd.grad(out.data.pow(2).sum() + h_n.sum(), data, create_graph=True)
        g.pow(2).sum().backward()
        results.append([g, data.grad] + [q.grad for q in module.parameters()])
    for i, (a, b) in enumerate(zip(results[1], results[0])):
        assert_close(a, b, tol=1e-10, name=f"tensor {i}")


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
@pytest.mark.parametrize("changed", ["weight", "input"])
def test_in_place_change_before_backward_raises_like_torch(kind, changed):
    cls, kwargs = {**LAYERS, **CELLS}[kind]
    for module in twins(cls, kwargs):
        x = (layer_input(module) if kind in LAYERS else torch.randn(3, I, dtype=torch.float64))
        x = x.requires_grad_(True) * 1.0  # a non-leaf, which may be changed in place
        loss = first_output(module(x)).sum()
        with torch.no_grad():
            if changed == "weight":
                next(module.parameters()).mul_(2.0)
            else:
                x.mul_(2.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


# --- tracing, scripting, export -------------------------------------------------------


class _Model(nn.Module):
    """A small model around one recurrent module, as users trace and export them."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        features = (getattr(rnn, "proj_size", 0) or H) * (2 if getattr(rnn, "bidirectional", False) else 1)
        self.head = nn.Linear(features, 2, dtype=torch.float64)

    def forward(self, x):
        out = first_output(self.rnn(x))
        return self.head(out)


@pytest.mark.parametrize("kind", list(LAYERS) + list(CELLS))
def test_jit_trace_records_torchs_operator_and_round_trips(kind):
    cls, kwargs = {**LAYERS, **CELLS}[kind]
    theirs, ours = twins(cls, {k: v for k, v in kwargs.items() if k != "bidirectional"})
    x = layer_input(theirs) if kind in LAYERS else torch.randn(3, I, dtype=torch.float64)
    graphs = []
    for module in (theirs, ours):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own tracer warnings, the same for both
            traced = torch.jit.trace(_Model(module), (x,))
        graphs.append([node.kind() for node in traced.inlined_graph.nodes()])
    assert "prim::PythonOp" not in graphs[1]  # the fused autograd.Function is not in the trace
    assert graphs[1] == graphs[0]  # torch's operators, in torch's order
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation warnings
        torch.jit.save(traced, buf)
        buf.seek(0)
        loaded = torch.jit.load(buf)
    expected = _Model(theirs)
    expected.head.load_state_dict(traced.head.state_dict())
    assert_close(loaded(x), expected(x), tol=1e-10, name="traced, saved and loaded")


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "LSTMCell", "RNNCell-tanh"])
def test_jit_script_does_what_it_does_for_torch(kind):
    cls, kwargs = {**LAYERS, **CELLS}[kind]
    theirs, ours = twins(cls, kwargs)
    x = layer_input(theirs) if kind in LAYERS else torch.randn(3, I, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation warnings
        expected = outcome(lambda: torch.jit.script(theirs)(x))
        got = outcome(lambda: torch.jit.script(ours)(x))
    assert_same_outcome(got, expected, what="scripted")
    assert type(ours).__module__ == "lstmfast.torch"  # scripting leaves the module as it was


@pytest.mark.parametrize("kind", list(LAYERS) + ["LSTMCell", "GRUCell"])
def test_torch_export_gives_torchs_program(kind):
    cls, kwargs = {**LAYERS, **CELLS}[kind]
    theirs, ours = twins(cls, kwargs)
    x = layer_input(theirs) if kind in LAYERS else torch.randn(3, I, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's export warns about RNN weights, for both
        expected = outcome(lambda: torch.export.export(theirs, (x,)).module()(x))
        got = outcome(lambda: torch.export.export(ours, (x,)).module()(x))
    assert_same_outcome(got, expected, what="exported")
    assert not isinstance(expected, tuple), "torch's own export failed: nothing to compare"


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN-relu", "LSTMCell", "GRUCell"])
@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_export_runs_in_onnxruntime_as_torchs(kind, dynamo, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    cls, kwargs = {**LAYERS, **CELLS}[kind]
    theirs, ours = twins(cls, {k: v for k, v in kwargs.items() if k != "num_layers"},
                         dtype=torch.float32)
    x = layer_input(theirs, torch.float32) if kind in LAYERS else torch.randn(3, I)
    results = []
    for module in (theirs, ours):
        path = tmp_path / f"{type(module).__module__}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporters' deprecation and tracer warnings
            outcome_of_export = outcome(lambda: torch.onnx.export(
                _Float32(module), (x,), str(path), dynamo=dynamo) and [])
        if isinstance(outcome_of_export, tuple):
            results.append(outcome_of_export)
            continue
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}
        results.append([torch.from_numpy(session.run(None, feed)[0])])
    assert_same_outcome(results[1], results[0], what="onnxruntime on the exported model")
    if not isinstance(results[0], tuple):
        assert_close(results[1][0], first_output(theirs(x)).detach(), tol=1e-5, name="vs torch eager")


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN-relu", "LSTMCell", "GRUCell"])
@pytest.mark.parametrize("dynamo", [False, True])
def test_a_layer_exports_on_its_own_with_either_exporter(kind, dynamo, tmp_path):
    """The module itself, not wrapped: the legacy exporter once passed every named
    forward parameter with a default positionally (recurrent_dropout_mask,
    zoneout_mask), and failed with a TypeError. Legacy export gives the standard node."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    cls, kwargs = {**LAYERS, **CELLS}[kind]
    theirs, ours = twins(cls, {k: v for k, v in kwargs.items() if k != "num_layers"},
                         dtype=torch.float32)
    x = layer_input(theirs, torch.float32) if kind in LAYERS else torch.randn(3, I)
    path = tmp_path / "ours.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer warnings
        torch.onnx.export(ours, (x,), str(path), dynamo=dynamo)
    if not dynamo and kind in LAYERS:
        op = kind.split("-")[0]
        assert op in [n.op_type for n in onnx.load(str(path)).graph.node]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert_close(torch.from_numpy(got), first_output(theirs(x)).detach(), tol=1e-5,
                 name="onnxruntime on the exported module vs torch eager")


class _Float32(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return first_output(self.rnn(x))


# --- torch.func, autocast, errors, compile --------------------------------------------


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "LSTMCell", "RNNCell-relu"])
@pytest.mark.parametrize("transform", ["grad", "jacrev", "vmap"])
def test_torch_func_transforms_as_torch(kind, transform):
    cls, kwargs = {**LAYERS, **CELLS}[kind]
    theirs, ours = twins(cls, kwargs)
    x = layer_input(theirs, T=3, N=2) if kind in LAYERS else torch.randn(2, I, dtype=torch.float64)

    def run(module):
        params = dict(module.named_parameters())

        def f(p, inp):
            return first_output(torch.func.functional_call(module, p, (inp,)))

        if transform == "grad":
            return torch.func.grad(lambda p: f(p, x).sin().sum())(params)["weight_hh_l0" if kind in LAYERS else "weight_hh"]
        if transform == "jacrev":
            return torch.func.jacrev(lambda inp: f(params, inp))(x)
        return torch.func.vmap(lambda inp: f(params, inp))(x.unsqueeze(0).expand(2, *x.shape))

    assert_same_outcome(outcome(lambda: run(ours)), outcome(lambda: run(theirs)), what=transform)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN-relu", "LSTMCell", "GRUCell"])
def test_autocast_follows_torchs_rules(kind):
    cls, kwargs = {**LAYERS, **CELLS}[kind]
    theirs, ours = twins(cls, kwargs, dtype=torch.float32)
    x = layer_input(theirs, torch.float32) if kind in LAYERS else torch.randn(3, I)
    results = []
    for module in (theirs, ours):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(outcome(lambda: module(x)))
    assert_same_outcome(results[1], results[0], what="under autocast")


def _bad_calls(kind, module):
    """Calls torch rejects, for the module of this kind."""
    d = torch.float64
    if kind in LAYERS:
        D = 2 if module.bidirectional else 1
        L = D * module.num_layers
        is_lstm = isinstance(module, nn.LSTM)

        def hx(n, size=H, dim=3):
            h = torch.zeros((L, n, size)[3 - dim:], dtype=d)
            return (h, torch.zeros_like(h)) if is_lstm else h

        return {
            "feature size": (torch.zeros(6, 3, I + 1, dtype=d), None),
            "1-D input": (torch.zeros(I, dtype=d), None),
            "4-D input": (torch.zeros(1, 6, 3, I, dtype=d), None),
            "hx batch": (torch.zeros(6, 3, I, dtype=d), hx(2)),
            "hx size": (torch.zeros(6, 3, I, dtype=d), hx(3, H + 1)),
            "hx dims": (torch.zeros(6, 3, I, dtype=d), hx(3, dim=2)),
            "unbatched hx dims": (torch.zeros(6, I, dtype=d), hx(1)),
            "dtype": (torch.zeros(6, 3, I, dtype=torch.float32), None),
            "int input": (torch.zeros(6, 3, I, dtype=torch.int64), None),
        }
    is_lstm = isinstance(module, nn.LSTMCell)

    def state(*shape):
        h = torch.zeros(*shape, dtype=d)
        return (h, h) if is_lstm else h

    return {
        "feature size": (torch.zeros(3, I + 1, dtype=d), None),
        "3-D input": (torch.zeros(1, 3, I, dtype=d), None),
        "hx batch": (torch.zeros(3, I, dtype=d), state(2, H)),
        "hx size": (torch.zeros(3, I, dtype=d), state(3, H + 1)),
        "hx dims": (torch.zeros(3, I, dtype=d), state(1, 3, H)),
        "dtype": (torch.zeros(3, I, dtype=torch.float32), None),
    }


@pytest.mark.parametrize("kind", list(LAYERS) + list(CELLS))
def test_errors_are_torchs(kind):
    cls, kwargs = {**LAYERS, **CELLS}[kind]
    theirs, ours = twins(cls, kwargs)
    for what, (x, hx) in _bad_calls(kind, theirs).items():
        expected = outcome(lambda: theirs(x, hx))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # our one-time fallback notice
            got = outcome(lambda: ours(x, hx))
        assert isinstance(expected, tuple) or what in ("dtype",), f"{what}: torch accepted it"
        assert_same_outcome(got, expected, what=what)


def test_torch_compile_runs_the_fused_kernels_and_matches():
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(I, I, dtype=torch.float64)
            self.rnn = nn.LSTM(I, H, num_layers=2, dtype=torch.float64)
            self.cell = nn.GRUCell(H, H, dtype=torch.float64)
            self.head = nn.Linear(H, 2, dtype=torch.float64)

        def forward(self, x):
            y = self.rnn(self.proj(x))[0]
            h = self.cell(y[0])
            for t in range(1, 3):
                h = self.cell(y[t], h)
            return self.head(h).sum()

    torch.manual_seed(0)
    model = Decoder()
    x = layer_input(model.rnn)
    expected = model(x)
    lt.accelerate(model)
    calls = []
    torch._dynamo.reset()
    try:
        with kernel_calls_recorded(calls), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # dynamo's notes on what it does not trace
            got = torch.compile(model)(x)
    finally:
        torch._dynamo.reset()
    assert_close(got, expected, tol=1e-10, name="compiled")
    assert calls.count("layer") >= 1 and calls.count("cell") >= 3


def test_torch_compile_takes_the_short_inference_path_behind_its_graph_break(monkeypatch):
    # Inference calls under a compiled caller take the short path too (behind
    # torch.compiler.disable, where dynamo checks no frame): the full path costs
    # twice as much a frame.
    from lstmfast.torch import cells as lt_cells, layers as lt_layers

    taken = []

    def spy(module, name):
        original = getattr(module, name)

        def call(*a):
            result = original(*a)
            taken.append((name, result is not None))
            return result
        monkeypatch.setattr(module, name, call)

    spy(lt_layers, "_plain_inference_forward")
    spy(lt_cells, "_plain_cell_forward")
    torch.manual_seed(0)
    model = nn.ModuleDict({"rnn": nn.GRU(I, H), "cell": nn.LSTMCell(H, H)})
    x = layer_input(model["rnn"], dtype=torch.float32)

    def forward(x):
        y = model["rnn"](x)[0]
        return model["cell"](y[-1])[0]

    with torch.no_grad():
        expected = forward(x)
        lt.accelerate(model)
        torch._dynamo.reset()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # dynamo's notes on what it does not trace
                got = torch.compile(forward)(x)
        finally:
            torch._dynamo.reset()
    assert_close(got, expected, tol=1e-5, name="compiled")
    assert ("_plain_inference_forward", True) in taken and ("_plain_cell_forward", True) in taken
    assert all(ok for _, ok in taken), taken


# --- restore ---------------------------------------------------------------------------


def test_restore_undoes_accelerate_keeping_parameters_and_parametrizations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(I, H), nn.GRU(H, H), nn.RNNCell(H, H), nn.Linear(H, 2))
    nn.utils.parametrizations.weight_norm(model[1], "weight_hh_l0")
    before = {name: p for name, p in model.named_parameters()}
    types = [type(m) for m in model]
    lt.accelerate(model)
    assert type(model[0]) is lt.LSTM and type(model[2]) is lt.RNNCell
    assert isinstance(model[1], lt.GRU) and nn.utils.parametrize.is_parametrized(model[1])
    assert lt.restore(model) is model
    assert [type(m) for m in model] == types
    assert {name: p for name, p in model.named_parameters()} == before
    nn.utils.parametrize.remove_parametrizations(model[1], "weight_hh_l0")
    assert type(model[1]) is nn.GRU


def test_accelerate_and_restore_reject_non_modules():
    for fn in (lt.accelerate, lt.restore):
        with pytest.raises(TypeError, match="must be a torch.nn.Module, got list"):
            fn([nn.LSTM(2, 2)])


# --- cells -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(CELLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cell_loop_outputs_and_gradients_match_torch(kind, dtype, batched, backend):
    cls, kwargs = CELLS[kind]
    theirs, ours = twins(cls, kwargs, dtype=dtype)
    ours._lstmfast_backend = backend
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(5, 3, I, generator=g, dtype=dtype)
    if not batched:
        xs = xs[:, 0]
    results = []
    for module in (theirs, ours):
        x = xs.clone().requires_grad_(True)
        state = None
        outs = []
        for t in range(x.shape[0]):
            state = module(x[t], state)
            outs.append(first_output(state))
        y = torch.stack(outs)
        weights = torch.linspace(-1, 1, y.numel(), dtype=dtype).reshape(y.shape)
        (y * weights).sum().backward()
        results.append([y, x.grad] + [p.grad for p in module.parameters()])
    for i, (a, b) in enumerate(zip(results[1], results[0])):
        assert_close(a, b, tol=tolerance(dtype), name=f"{kind} tensor {i}")


@pytest.mark.parametrize("kind", list(LAYERS) + list(CELLS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_input_of_data_gets_no_gradient_and_the_kernels_skip_it(kind, backend, monkeypatch):
    # torch's autograd computes no gradient that no input needs; the kernels are told
    # the same of the input (dx is a third of a layer's non-recurrent backward).
    # The state's and the parameters' gradients must still be torch's.
    from lstmfast.torch import autograd as lt_autograd

    asked = []
    original = lt_autograd._backward_new_gradients
    monkeypatch.setattr(lt_autograd, "_backward_new_gradients",
                        lambda *a, input_grad: asked.append(input_grad) or original(
                            *a, input_grad=input_grad))
    if "fused" in BACKENDS:  # the steps' backward for _WeightGradientSums (autograd.py)
        fused = importlib.import_module("lstmfast._fused")
        summing, gates = fused.summing_backward, fused.gate_gradients_backward
        monkeypatch.setattr(fused, "summing_backward",
                            lambda *a: asked.append(a[-1]) or summing(*a))
        monkeypatch.setattr(fused, "gate_gradients_backward",
                            lambda *a: asked.append(a[-1]) or gates(*a))
    cls, kwargs = (LAYERS.get(kind) or CELLS[kind])
    theirs, ours = twins(cls, kwargs)
    ours._lstmfast_backend = backend
    is_cell = kind in CELLS
    x = layer_input(theirs, T=4) if not is_cell else torch.randn(
        4, 3, I, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    results = []
    for module in (theirs, ours):
        h0 = torch.randn(3, H, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
        if not is_cell:
            layers = module.num_layers * (2 if module.bidirectional else 1)
            h0 = torch.randn(layers, 3, module.proj_size or H, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(6))
        h0.requires_grad_(True)
        if is_cell:
            state = h0
            if cls is nn.LSTMCell:
                state = (h0, torch.zeros_like(h0))
            outs = []
            for t in range(x.shape[0]):
                state = module(x[t], state)
                outs.append(first_output(state))
            y = torch.stack(outs)
        else:
            y = module(x, (h0, torch.zeros(layers, 3, H, dtype=torch.float64))
                       if cls is nn.LSTM else h0)[0]
        weights = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)
        (y * weights).sum().backward()
        assert x.grad is None
        results.append([h0.grad] + [p.grad for p in module.parameters()])
    for i, (a, b) in enumerate(zip(results[1], results[0])):
        assert_close(a, b, tol=1e-10, name=f"{kind} gradient {i}")
    assert asked and not any(asked), asked


@pytest.mark.parametrize("kind", list(CELLS))
def test_gradients_held_by_the_caller_are_never_written_again(kind):
    # The adapter makes each gradient array again once autograd has let go of it.
    # Gradients still held (returned by autograd.grad, taken over as .grad) must keep
    # their values while later backward calls run: each one is checked against torch
    # only after all the calls.
    cls, kwargs = CELLS[kind]
    theirs, ours = twins(cls, kwargs)
    xs = torch.randn(6, 3, I, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    kept = []
    for module in (theirs, ours):
        params = list(module.parameters())
        for p in params:
            p.grad = None
        state, per_step = None, []
        for t in range(xs.shape[0]):
            state = module(xs[t], state)
            if t == 1:  # .grad taken over from this backward's own arrays
                first_output(state).sum().backward(retain_graph=True)
            per_step.append(torch.autograd.grad(first_output(state).sum(), params, retain_graph=True))
        kept.append((per_step, [p.grad for p in params]))
    for step, (a, b) in enumerate(zip(kept[1][0], kept[0][0])):
        for i, (ga, gb) in enumerate(zip(a, b)):
            assert_close(ga, gb, tol=1e-10, name=f"{kind} step {step} parameter {i}")
    for i, (a, b) in enumerate(zip(kept[1][1], kept[0][1])):
        assert_close(a, b, tol=1e-10, name=f"{kind} .grad {i}")


@pytest.mark.parametrize("kind", list(CELLS))
def test_cell_keeps_nothing_without_grad(kind):
    cls, kwargs = CELLS[kind]
    theirs, ours = twins(cls, kwargs)
    x = torch.randn(3, I, dtype=torch.float64)
    with torch.no_grad():
        got, expected = ours(x), theirs(x)
    for a, b in zip(all_outputs(got), all_outputs(expected)):
        assert a.grad_fn is None
        assert_close(a, b, tol=1e-10, name="no_grad")


def _weight(m, kind):
    """A cell's weight_ih / weight_hh, or a layer's first ones (weight_ih_l0 ...)."""
    return getattr(m, _weight_name(m, kind))


def _weight_name(m, kind):
    return f"weight_{kind}" + ("_l0" if isinstance(m, nn.RNNBase) else "")


CHANGES = {
    "in_place": lambda m, g: _weight(m, "hh").mul_(0.5),
    "new_storage": lambda m, g: setattr(_weight(m, "hh"), "data", torch.randn(
        _weight(m, "hh").shape, dtype=_weight(m, "hh").dtype, generator=g)),
    # the same memory, shape and first element seen with other strides
    "other_strides": lambda m, g: setattr(_weight(m, "hh"), "data", _weight(m, "hh").data.as_strided(
        _weight(m, "hh").shape, (1, _weight(m, "hh").shape[0]))),
    "new_parameter": lambda m, g: setattr(m, _weight_name(m, "ih"), nn.Parameter(torch.randn(
        _weight(m, "ih").shape, dtype=_weight(m, "ih").dtype, generator=g))),
    "load_state_dict": lambda m, g: m.load_state_dict(
        {k: torch.randn(v.shape, dtype=v.dtype, generator=g) for k, v in m.state_dict().items()}),
}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("kind", list(CELLS))
def test_cell_follows_every_change_of_its_weights(kind, change):
    """A cell keeps NumPy views of its parameters between calls (cells.py,
    _backend._weight_arrays): every way of changing a parameter must reach the next call."""
    cls, kwargs = CELLS[kind]
    theirs, ours = twins(cls, kwargs)
    x, h = torch.randn(3, I, dtype=torch.float64), torch.randn(3, H, dtype=torch.float64)
    hx = (h, torch.randn(3, H, dtype=torch.float64)) if cls is nn.LSTMCell else h
    with torch.no_grad():
        before = ours(x, hx)
        assert_close(before, theirs(x, hx), tol=1e-10, name="before")
        for module in (theirs, ours):
            CHANGES[change](module, torch.Generator().manual_seed(9))
        after = ours(x, hx)
        assert_close(after, theirs(x, hx), tol=1e-10, name=f"after {change}")
        assert not torch.allclose(all_outputs(after)[0], all_outputs(before)[0])
        # A copy has its own parameters: changing them changes the copy alone.
        ours_copy, theirs_copy = copy.deepcopy(ours), copy.deepcopy(theirs)
        for module in (ours_copy, theirs_copy):
            module.weight_hh.mul_(-1.0)
        assert_close(ours_copy(x, hx), theirs_copy(x, hx), tol=1e-10, name="the changed copy")
        assert_close(ours(x, hx), theirs(x, hx), tol=1e-10,
                     name="the original after its copy changed")


def assert_all_close(got, expected, name):
    """Every tensor of a layer's result (output, h_n and c_n) within 1e-10."""
    for i, (g, e) in enumerate(zip(all_outputs(got), all_outputs(expected), strict=True)):
        assert_close(g, e, tol=1e-10, name=f"{name} [{i}]")


@pytest.mark.parametrize("given_state", [False, True], ids=["zero_state", "given_state"])
@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("kind", list(LAYERS))
def test_layer_follows_every_change_of_its_weights(kind, change, given_state):
    """A layer called without autograd keeps NumPy views of its parameters between calls
    (layers.py, _backend._weight_arrays) and makes its zero state as arrays: every way of
    changing a parameter must reach the next call."""
    cls, kwargs = LAYERS[kind]
    theirs, ours = twins(cls, kwargs)
    x = layer_input(theirs)
    with torch.no_grad():
        args = (x, theirs(x)[1]) if given_state else (x,)
        before = ours(*args)
        assert_all_close(before, theirs(*args), name="before")
        for module in (theirs, ours):
            CHANGES[change](module, torch.Generator().manual_seed(9))
        after = ours(*args)
        assert_all_close(after, theirs(*args), name=f"after {change}")
        assert not torch.allclose(all_outputs(after)[0], all_outputs(before)[0])
        ours_copy, theirs_copy = copy.deepcopy(ours), copy.deepcopy(theirs)
        for module in (ours_copy, theirs_copy):
            module.weight_hh_l0.mul_(-1.0)
        assert_all_close(ours_copy(*args), theirs_copy(*args), name="the changed copy")
        assert_all_close(ours(*args), theirs(*args), name="the original after its copy changed")


def test_cell_with_given_state_gets_its_gradient():
    theirs, ours = twins(nn.LSTMCell, {})
    x = torch.randn(3, I, dtype=torch.float64)
    grads = []
    for module in (theirs, ours):
        h0 = torch.randn(3, H, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
        c0 = torch.randn(3, H, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
        h1, c1 = module(x, (h0, c0))
        (h1.sum() + 2 * c1.sum()).backward()
        grads.append((h0.grad, c0.grad))
    assert_close(grads[1][0], grads[0][0], tol=1e-10, name="dh0")
    assert_close(grads[1][1], grads[0][1], tol=1e-10, name="dc0")


@pytest.mark.parametrize("grad", [True, False])
def test_cells_and_layers_run_on_the_kernels(grad):
    cell, layer = twins(nn.GRUCell, {})[1], twins(nn.LSTM, {})[1]
    calls = []
    with kernel_calls_recorded(calls), torch.set_grad_enabled(grad):
        h = cell(torch.randn(3, I, dtype=torch.float64))
        out, _ = layer(torch.randn(6, 3, I, dtype=torch.float64))
    assert calls == ["cell", "layer"]
    assert (h.grad_fn is not None, out.grad_fn is not None) == (grad, grad)


def test_cells_pickle_and_keep_their_class():
    _, ours = twins(nn.LSTMCell, {})
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is lt.LSTMCell
    x = torch.randn(3, I, dtype=torch.float64)
    for a, b in zip(loaded(x), ours(x)):
        assert torch.equal(a, b)


def test_unsupported_cell_dtype_falls_back_with_a_warning():
    theirs = nn.GRUCell(I, H, dtype=torch.bfloat16)
    ours = lt.accelerate(copy.deepcopy(theirs))
    x = torch.randn(3, I, dtype=torch.bfloat16)
    lt_backend._warned.discard(("GRUCell", "dtype torch.bfloat16"))
    with pytest.warns(RuntimeWarning, match=re.escape("dtype torch.bfloat16 is not supported")):
        got = ours(x)
    assert torch.equal(got, theirs(x))


def test_module_double_backward_uses_numbers_as_torch_in_float32():
    # float32 as users train: the fused backward and torch's graph agree to 1e-5
    theirs, ours = twins(nn.GRU, dict(num_layers=1), dtype=torch.float32)
    x = layer_input(theirs, torch.float32)
    got, expected = _double_backward(ours, x, None), _double_backward(theirs, x, None)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert_close(a, b, tol=1e-5, name=f"tensor {i}")
    assert np.isfinite(got[1].numpy()).all()


@pytest.mark.parametrize("kind", list(CELLS))
@pytest.mark.parametrize("with_hx", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "frozen"])
def test_plain_cell_steps_take_the_short_path_and_match_torch(kind, with_hx, dtype, context,
                                                              monkeypatch):
    # A decoder's step at inference skips the full path (cells._plain_cell_forward).
    from lstmfast.torch import cells as lt_cells

    taken = []
    original = lt_cells._plain_cell_forward
    monkeypatch.setattr(lt_cells, "_plain_cell_forward",
                        lambda *a: taken.append(original(*a) is not None) or original(*a))
    cls, kwargs = CELLS[kind]
    theirs, ours = twins(cls, kwargs, dtype=dtype)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, I, generator=g, dtype=dtype)
    hx = None
    if with_hx:
        h = torch.randn(3, H, generator=g, dtype=dtype)
        hx = (h, torch.randn(3, H, generator=g, dtype=dtype)) if cls is nn.LSTMCell else h
    if context == "frozen":
        for module in (ours, theirs):
            module.requires_grad_(False)
        manager = torch.enable_grad()
    else:
        manager = getattr(torch, context)()
    with manager:
        got, expected = ours(x, hx), theirs(x, hx)
    assert taken == [True]
    for i, (a, b) in enumerate(zip(all_outputs(got), all_outputs(expected))):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        assert_close(a, b, tol=tolerance(dtype), name=f"{kind} result {i}")


@pytest.mark.parametrize("case", ["unbatched", "hx_wrong_shape", "hx_wrong_dtype", "input_wrong_size",
                                  "needs_grad", "autocast", "numpy_backend", "empty_batch"])
def test_cell_calls_the_short_path_leaves_to_the_full_one(case, monkeypatch):
    from lstmfast.torch import cells as lt_cells

    taken = []
    original = lt_cells._plain_cell_forward
    monkeypatch.setattr(lt_cells, "_plain_cell_forward",
                        lambda *a: taken.append(original(*a) is not None) or original(*a))
    theirs, ours = twins(nn.LSTMCell, {}, dtype=torch.float32)
    if case == "numpy_backend":
        ours._lstmfast_backend = "numpy"
    x = torch.randn(3, I)
    hx = None
    if case == "unbatched":
        x = x[0]
    elif case == "hx_wrong_shape":
        hx = (torch.zeros(2, H), torch.zeros(2, H))
    elif case == "hx_wrong_dtype":
        hx = (torch.zeros(3, H, dtype=torch.float64), torch.zeros(3, H, dtype=torch.float64))
    elif case == "input_wrong_size":
        x = torch.randn(3, I + 1)
    elif case == "empty_batch":
        x = x[:0]
    with torch.enable_grad() if case == "needs_grad" else torch.no_grad():
        if case == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ours(x, hx)
        else:
            assert_same_outcome(outcome(lambda: ours(x, hx)), outcome(lambda: theirs(x, hx)),
                                dtype=torch.float32, what=case)
    assert not any(taken), taken
