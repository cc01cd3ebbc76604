"""PyTorch's own ModuleInfo samples for the recurrent modules, through lstmfast.torch.

torch ships, for its test suite, a ``ModuleInfo`` per module with the constructor
and forward inputs it checks that module on (``module_db`` in
``torch.testing._internal.common_modules``), and the inputs that must raise. For
``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and the three cells, each sample is run by the
torch module and by a deep copy of it made ours by ``accelerate``, and compared:
every output (``h_n``/``c_n``, the data and indices of a ``PackedSequence``), the
gradients of the inputs, of ``hx`` and of every parameter for a random weighted sum
of the outputs, in float32 and float64, training and eval mode, with contiguous
and non-contiguous inputs; then ``state_dict``, ``pickle`` and ``torch.save``
round trips; and every error sample must raise what torch raises, with torch's
message and no warning torch does not give. Tolerance 1e-5 (float32) / 1e-10
(float64) relative to the largest magnitude of torch's value.

The cells' tests need ``lstmfast.torch``'s own cells: without them ``accelerate``
leaves a torch cell as it is, and the tests say so.
"""

import copy
import io
import pickle
import re
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch.nn.utils.rnn import PackedSequence  # noqa: E402

import lstmfast.torch as lt  # noqa: E402
from lstmfast.torch import _backend as lt_backend  # noqa: E402
from helpers import assert_close, tolerance  # noqa: E402

# torch.testing._internal is torch's test support code, not a public API; importing
# it freezes torch.backends' global flags for the whole process, which we undo so
# the rest of the suite runs as it would without this file.
_frozen = torch.backends.flags_frozen()
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db  # noqa: E402
from torch.testing._internal.common_utils import noncontiguous_like  # noqa: E402

if not _frozen:
    setattr(torch.backends, "__allow_nonbracketed_mutation_flag", True)

# torch's own notice that it falls back from oneDNN for projections, not ours
pytestmark = pytest.mark.filterwarnings(
    "ignore:LSTM with projections is not supported with oneDNN:UserWarning")

MODULES = (torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN,
           torch.nn.LSTMCell, torch.nn.GRUCell, torch.nn.RNNCell)
INFOS = [info for cls in MODULES for info in module_db if info.module_cls is cls]
DTYPES = [torch.float32, torch.float64]
SEED = 0


@pytest.fixture(scope="module", autouse=True)
def _torch_single_threaded():
    """torch, the reference, on one thread: on these tiny samples its threads only add
    synchronisation (lstmfast keeps its default count, the one users run)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_SAMPLES = {}


def _samples(info, dtype, training):
    """The ModuleInfo's samples, made once (seeded); tests take copies with _forward_inputs."""
    key = (info.name, dtype, training)
    if key not in _SAMPLES:
        # The layers' packed-sequence samples are generated only on request.
        extra = {"with_packed_sequence": True} if info.module_cls in (torch.nn.GRU, torch.nn.RNN) else {}
        torch.random.default_generator.manual_seed(SEED)  # CPU only: no lazy CUDA seeding
        _SAMPLES[key] = list(info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                                     training=training, **extra))
    return _SAMPLES[key]


def _error_samples(info, dtype):
    torch.random.default_generator.manual_seed(SEED)  # CPU only: no lazy CUDA seeding
    return list(info.module_error_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                              training=True))


def _describe_value(v):
    if isinstance(v, PackedSequence):
        return f"packed{tuple(v.data.shape)}bs={'-'.join(str(int(b)) for b in v.batch_sizes)}"
    if isinstance(v, torch.Tensor):
        return "x".join(map(str, v.shape)) if v.dim() else "scalar"
    if isinstance(v, (tuple, list)):
        return "(" + ",".join(_describe_value(e) for e in v) + ")"
    return str(v)


def _describe(sample):
    """A test id for a sample: constructor arguments, then forward input shapes."""
    ci, fi = sample.constructor_input, sample.forward_input
    ctor = [_describe_value(a) for a in ci.args] + [f"{k}={_describe_value(v)}" for k, v in ci.kwargs.items()]
    parts = [",".join(ctor)]
    if fi is not None:
        parts.append("forward=" + ",".join([_describe_value(a) for a in fi.args]
                                           + [f"{k}={_describe_value(v)}" for k, v in fi.kwargs.items()]))
    if sample.desc:
        parts.append(sample.desc)
    return "|".join(parts)


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


# (mode, layout) for the numerical comparison: both modes, and non-contiguous inputs
# in one of them (the adapter's path does not depend on the mode without dropout).
VARIANTS = [("train", "contiguous"), ("eval", "contiguous"), ("train", "noncontiguous")]


def _params(variants):
    """(info, dtype, training, layout, sample index) per sample, dtype and variant."""
    params = []
    for info in INFOS:
        for dtype in DTYPES:
            assert dtype in info.dtypes
            for mode, layout in variants:
                training = mode == "train"
                for index, sample in enumerate(_samples(info, dtype, training)):
                    ident = [info.name, _describe(sample), _dtype_name(dtype), mode, layout]
                    marks = []
                    if training and sample.constructor_input.kwargs.get("dropout", 0) > 0:
                        ident.append("dropout-is-random-in-training")
                        marks.append(pytest.mark.skip(reason="dropout masks are random in both"))
                    params.append(pytest.param(info, dtype, training, layout, index,
                                               id="-".join(ident), marks=marks))
    return params


def _error_params():
    params = []
    for info in INFOS:
        for dtype in DTYPES:
            for index, error in enumerate(_error_samples(info, dtype)):
                ident = [info.name, _describe(error.module_error_input), error.error_on.name.lower(),
                         _dtype_name(dtype)]
                params.append(pytest.param(info, dtype, index, id="-".join(ident)))
    return params


def _make_pair(info, sample, dtype, training):
    """(torch module, our deep copy of it made fast by accelerate)."""
    ci = sample.constructor_input
    torch.random.default_generator.manual_seed(SEED)  # CPU only: no lazy CUDA seeding
    theirs = info.module_cls(*ci.args, **ci.kwargs).to(dtype)
    theirs.train(training)
    ours = lt.accelerate(copy.deepcopy(theirs))
    assert type(ours).__module__ == "lstmfast.torch", (
        f"accelerate left {type(ours).__module__}.{type(ours).__name__} as it was")
    assert isinstance(ours, info.module_cls) and ours.training == training
    return theirs, ours


def _map_tensors(fn, value):
    """``value`` with ``fn`` applied to every tensor in it (PackedSequence data included)."""
    if isinstance(value, PackedSequence):
        return PackedSequence(fn(value.data), value.batch_sizes, value.sorted_indices, value.unsorted_indices)
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(fn, v) for v in value)
    return value


def _tensors(value):
    """Every tensor in ``value`` in order, PackedSequence data (not its indices) included."""
    if isinstance(value, PackedSequence):
        return [value.data]
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _forward_inputs(sample, layout="contiguous"):
    """A copy of the sample's forward (args, kwargs), no tensor shared with another test."""
    args, kwargs = copy.deepcopy((sample.forward_input.args, sample.forward_input.kwargs))
    if layout == "noncontiguous":
        args = _map_tensors(noncontiguous_like, args)
        kwargs = {k: _map_tensors(noncontiguous_like, v) for k, v in kwargs.items()}
        assert not any(t.is_contiguous() for t in _tensors((args, list(kwargs.values()))) if t.numel() > 1)
    return args, kwargs


def _assert_same_structure(got, expected, what):
    """Types and PackedSequence indices equal; the values are compared elsewhere."""
    assert type(got) is type(expected), f"{what}: {type(got).__name__} != {type(expected).__name__}"
    if isinstance(expected, PackedSequence):
        for field in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            a, b = getattr(got, field), getattr(expected, field)
            assert (a is None and b is None) or torch.equal(a, b), f"{what}.{field}: {a} != {b}"
    elif isinstance(expected, (tuple, list)):
        assert len(got) == len(expected), f"{what}: {len(got)} values != {len(expected)}"
        for i, (a, b) in enumerate(zip(got, expected)):
            _assert_same_structure(a, b, f"{what}[{i}]")


def _assert_all_close(got, expected, dtype, names):
    assert len(got) == len(expected) == len(names)
    for name, a, b in zip(names, got, expected):
        assert a.dtype == b.dtype == dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
        assert_close(a.detach().numpy(), b.detach().numpy(), tol=tolerance(dtype), name=name)


def _output_names(info, result):
    if isinstance(result, torch.Tensor):  # a GRU or RNN cell: h'
        return ["h'"]
    if info.module_cls is torch.nn.LSTMCell:
        return ["h'", "c'"]
    out = "output.data" if isinstance(result[0], PackedSequence) else "output"
    return [out, "h_n", "c_n"] if info.module_cls is torch.nn.LSTM else [out, "h_n"]


@pytest.mark.parametrize("info, dtype, training, layout, index", _params(VARIANTS))
def test_sample_outputs_and_gradients_match_torch(info, dtype, training, layout, index):
    sample = _samples(info, dtype, training)[index]
    theirs, ours = _make_pair(info, sample, dtype, training)
    args, kwargs = _forward_inputs(sample, layout)
    leaves = [t for t in _tensors((args, list(kwargs.values()))) if t.requires_grad]
    before = [t.detach().clone() for t in leaves]

    expected = theirs(*args, **kwargs)
    got = ours(*args, **kwargs)
    _assert_same_structure(got, expected, "result")
    outs, ref_outs = _tensors(got), _tensors(expected)
    names = _output_names(info, expected)
    _assert_all_close(outs, ref_outs, dtype, names)

    # Backward of a random weighted sum of all outputs, to the inputs, hx and every parameter.
    g = torch.Generator().manual_seed(SEED + 1)
    upstream = [torch.randn(o.shape, generator=g, dtype=dtype) for o in ref_outs]
    if layout == "noncontiguous":
        upstream = [noncontiguous_like(u) for u in upstream]
    param_names = [name for name, _ in theirs.named_parameters()]
    assert param_names == [name for name, _ in ours.named_parameters()]
    grads = torch.autograd.grad(outs, leaves + list(ours.parameters()), upstream)
    ref_grads = torch.autograd.grad(ref_outs, leaves + list(theirs.parameters()), upstream)
    grad_names = [f"grad forward input {i}" for i in range(len(leaves))] + [f"grad {n}" for n in param_names]
    _assert_all_close(grads, ref_grads, dtype, grad_names)

    # Neither module wrote into its inputs.
    for i, (t, b) in enumerate(zip(leaves, before)):
        assert torch.equal(t.detach(), b), f"forward input {i} was modified"

    # Inference (nothing kept for backward) gives the same numbers.
    with torch.no_grad():
        got_nograd = _tensors(ours(*args, **kwargs))
    assert all(t.grad_fn is None for t in got_nograd)
    _assert_all_close(got_nograd, ref_outs, dtype, [f"no_grad {n}" for n in names])

    # torch's own check for unbatched samples: the module on a batch of one, squeezed.
    if sample.reference_fn is not None and not isinstance(args[0], PackedSequence):
        with torch.no_grad():
            reference = _tensors(sample.reference_fn(ours, *args, **kwargs))
        _assert_all_close(got_nograd, reference, dtype, [f"batch-of-one {n}" for n in names])


@pytest.mark.parametrize("info, dtype, training, layout, index", _params([("train", "contiguous")]))
def test_sample_state_dict_and_pickle_round_trip(info, dtype, training, layout, index):
    sample = _samples(info, dtype, training)[index]
    theirs, ours = _make_pair(info, sample, dtype, training)
    args, kwargs = _forward_inputs(sample)

    state, ref_state = ours.state_dict(), theirs.state_dict()
    assert list(state) == list(ref_state)
    for key in ref_state:
        assert torch.equal(state[key], ref_state[key]), key
    plain = info.module_cls(*sample.constructor_input.args, **sample.constructor_input.kwargs).to(dtype)
    plain.load_state_dict(state)  # ours' state_dict loads into torch's module, and back
    ours.load_state_dict(plain.state_dict())

    with torch.no_grad():
        expected = _tensors(ours(*args, **kwargs))
    buffers = {"pickle": pickle.dumps(ours)}
    saved = io.BytesIO()
    torch.save(ours, saved)
    buffers["torch.save"] = saved.getvalue()
    for how, data in buffers.items():
        loaded = pickle.loads(data) if how == "pickle" else torch.load(io.BytesIO(data), weights_only=False)
        assert type(loaded) is type(ours), how
        assert loaded.training == ours.training, how
        loaded_state = loaded.state_dict()
        assert list(loaded_state) == list(state), how
        assert all(torch.equal(loaded_state[k], state[k]) for k in state), how
        with torch.no_grad():
            got = _tensors(loaded(*args, **kwargs))
        for i, (a, b) in enumerate(zip(got, expected)):
            assert torch.equal(a, b), f"{how}: output {i} of the loaded module differs"


@pytest.mark.parametrize("info, dtype, index", _error_params())
def test_error_sample_raises_like_torch(info, dtype, index):
    error = _error_samples(info, dtype)[index]
    sample = error.module_error_input
    ci, fi = sample.constructor_input, sample.forward_input

    def run(make):
        """(exception, warnings) of constructing with ``make`` and calling the forward."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                module = make()
                if error.error_on == ModuleErrorEnum.FORWARD_ERROR:
                    module(*fi.args, **fi.kwargs)
            except Exception as e:  # noqa: BLE001  (compared with torch's below)
                return e, [(w.category, str(w.message)) for w in caught]
        return None, [(w.category, str(w.message)) for w in caught]

    def make_ours():
        if error.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            return getattr(lt, info.module_cls.__name__)(*ci.args, **ci.kwargs)
        module = lt.accelerate(info.module_cls(*ci.args, **ci.kwargs))
        assert type(module).__module__ == "lstmfast.torch", (
            f"accelerate left {type(module).__module__}.{type(module).__name__} as it was")
        return module

    expected, expected_warnings = run(lambda: info.module_cls(*ci.args, **ci.kwargs))
    assert isinstance(expected, error.error_type) and re.search(error.error_regex, str(expected)), (
        f"torch itself: {expected!r}")
    lt_backend._warned.clear()  # the adapter warns once per process; each test sees the first time
    got, got_warnings = run(make_ours)
    assert type(got) is type(expected), f"ours raised {got!r}, torch {expected!r}"
    assert re.search(error.error_regex, str(got)) and str(got) == str(expected), (
        f"ours: {got!r}, torch: {expected!r}")
    assert got_warnings == expected_warnings, (
        f"ours warned {got_warnings}, torch {expected_warnings}, before raising {expected!r}")
