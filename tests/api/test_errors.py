"""Bad input raises the right exception with a message naming the argument."""

import numpy as np
import pytest

import lstmfast
from helpers import BACKENDS

LAYERS = ["LSTM", "GRU", "RNN"]
CELLS = ["LSTMCell", "GRUCell", "RNNCell"]


def make(kind, *args, **kwargs):
    kwargs.setdefault("backend", "numpy")
    return getattr(lstmfast, kind)(*args, **kwargs)


# ------------------------------------------------------------------------------------------
# constructor


@pytest.mark.parametrize("kind", LAYERS + CELLS)
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(input_size=0), ValueError, "input_size"),
    (dict(input_size=-3), ValueError, "input_size"),
    (dict(hidden_size=0), ValueError, "hidden_size"),
    (dict(input_size=2.5), TypeError, "input_size"),
    (dict(hidden_size=True), TypeError, "hidden_size"),
    (dict(hidden_size="4"), TypeError, "hidden_size"),
    (dict(bias="yes"), TypeError, "bias"),
    (dict(dtype="float16"), ValueError, "dtype"),
    (dict(dtype=np.int32), ValueError, "dtype"),
    (dict(dtype=None), ValueError, "dtype"),
    (dict(dtype="complex64"), ValueError, "dtype"),
    (dict(dtype="no-such-type"), ValueError, "dtype"),
    (dict(dtype=np.dtype("float32").newbyteorder()), ValueError, "byte order"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(backend=None), ValueError, "backend"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
])
def test_constructor_arguments_common(kind, kwargs, exc, match):
    args = dict(input_size=3, hidden_size=4)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        make(kind, **args)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(num_layers=0), ValueError, "num_layers"),
    (dict(num_layers=1.0), TypeError, "num_layers"),
    (dict(dropout=-0.1), ValueError, "dropout"),
    (dict(dropout=1.5), ValueError, "dropout"),
    (dict(dropout="0.5"), ValueError, "dropout"),
    (dict(dropout=True), ValueError, "dropout"),
    (dict(batch_first=1), TypeError, "batch_first"),
    (dict(bidirectional="no"), TypeError, "bidirectional"),
])
def test_constructor_arguments_layers(kind, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        make(kind, 3, 4, **kwargs)


def test_proj_size():
    with pytest.raises(ValueError, match="proj_size"):
        make("LSTM", 3, 4, proj_size=-1)
    with pytest.raises(ValueError, match="proj_size.*smaller than hidden_size"):
        make("LSTM", 3, 4, proj_size=4)
    with pytest.raises(ValueError, match="proj_size.*smaller than hidden_size"):
        make("LSTM", 3, 4, proj_size=9)
    with pytest.raises(TypeError, match="proj_size"):
        make("LSTM", 3, 4, proj_size=1.5)
    for kind in ("GRU", "RNN"):
        with pytest.raises(ValueError, match="proj_size.*only supported for LSTM"):
            make(kind, 3, 4, proj_size=2)


@pytest.mark.parametrize("kind", ["RNN", "RNNCell"])
@pytest.mark.parametrize("nonlinearity", ["sigmoid", "Tanh", None])
def test_unknown_nonlinearity(kind, nonlinearity):
    with pytest.raises(ValueError, match="nonlinearity"):
        make(kind, 3, 4, nonlinearity=nonlinearity)


@pytest.mark.skipif("fused" in BACKENDS, reason="the fused kernels are built")
@pytest.mark.parametrize("kind", LAYERS + CELLS)
def test_fused_backend_not_built(kind):
    with pytest.raises(NotImplementedError, match="fused.*use backend='numpy'"):
        getattr(lstmfast, kind)(3, 4)  # the default backend is "fused"


def test_train_mode_must_be_bool():
    with pytest.raises(TypeError, match="mode"):
        make("GRU", 3, 4).train("no")


# ------------------------------------------------------------------------------------------
# x


BAD_DTYPES = [np.int32, np.int64, np.bool_, np.float16, np.complex64, np.complex128, object]


@pytest.mark.parametrize("kind", LAYERS + CELLS)
@pytest.mark.parametrize("layer_dtype", ["float32", "float64"])
@pytest.mark.parametrize("x_dtype", BAD_DTYPES + ["other float"])
def test_x_dtype_is_not_cast(kind, layer_dtype, x_dtype):
    layer = make(kind, 3, 4, dtype=layer_dtype)
    if x_dtype == "other float":
        x_dtype = np.float64 if layer_dtype == "float32" else np.float32
    shape = (2, 3) if "Cell" in kind else (5, 2, 3)
    x = np.ones(shape, dtype=x_dtype)
    with pytest.raises(TypeError, match=f"x must have dtype {layer_dtype}"):
        layer(x)


@pytest.mark.parametrize("kind", LAYERS + CELLS)
def test_x_not_numbers(kind):
    layer = make(kind, 3, 4, dtype="float64")
    with pytest.raises(TypeError, match="x"):
        layer("not an array")
    with pytest.raises(TypeError, match="x"):
        layer([[1.0, 2.0, 3.0], [1.0, 2.0]])  # ragged


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("shape", [(3,), (1, 5, 2, 3), ()])
def test_layer_x_ndim(kind, shape):
    with pytest.raises(ValueError, match=r"x: expected a 3-D \(batched\) or 2-D"):
        make(kind, 3, 4)(np.zeros(shape, np.float32))


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("shape", [(5, 2, 3), ()])
def test_cell_x_ndim(kind, shape):
    with pytest.raises(ValueError, match=r"x: expected a 2-D \(batched\) or 1-D"):
        make(kind, 3, 4)(np.zeros(shape, np.float32))


@pytest.mark.parametrize("kind", LAYERS + CELLS)
def test_x_feature_size(kind):
    shape = (2, 5) if "Cell" in kind else (4, 2, 5)
    with pytest.raises(ValueError, match="x: expected input_size=3 .* got 5"):
        make(kind, 3, 4)(np.zeros(shape, np.float32))


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("shape", [(0, 2, 3), (0, 3), (0, 0, 3)])
def test_layer_zero_length_sequence(kind, shape):
    with pytest.raises(ValueError, match=r"x: empty sequence \(sequence length 0"):
        make(kind, 3, 4)(np.zeros(shape, np.float32))


def test_layer_zero_length_sequence_batch_first():
    with pytest.raises(ValueError, match="x: empty sequence"):
        make("GRU", 3, 4, batch_first=True)(np.zeros((2, 0, 3), np.float32))


# An empty batch is not an error: as torch, empty outputs (and empty gradients).


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_layer_empty_batch_as_torch(kind, backend_name, batch_first):
    layer = make(kind, 3, 4, num_layers=2, bidirectional=True, batch_first=batch_first,
                 backend=backend_name, dropout=0.5)
    before = {k: v.copy() for k, v in layer.grad.items()}
    x = np.zeros((0, 5, 3) if batch_first else (5, 0, 3), np.float32)
    out, h = layer(x, lengths=[])
    assert out.shape == ((0, 5, 8) if batch_first else (5, 0, 8)) and out.dtype == np.float32
    h_n, c_n = h if kind == "LSTM" else (h, None)
    assert h_n.shape == (4, 0, 4)
    if kind == "LSTM":
        assert c_n.shape == (4, 0, 4)
    hx = (h_n, c_n) if kind == "LSTM" else h_n
    layer(x, hx)  # an empty hx of the right shape is accepted
    dx, dhx = layer.backward(np.zeros_like(out))
    assert dx.shape == x.shape
    dh0 = dhx[0] if kind == "LSTM" else dhx
    assert dh0.shape == (4, 0, 4)
    for name, g in layer.grad.items():
        np.testing.assert_array_equal(g, before[name])
    with pytest.raises(RuntimeError, match="already called"):
        layer.backward(np.zeros_like(out))
    with pytest.raises(ValueError, match="hx.*expected shape"):
        layer(x, (np.zeros((4, 1, 4), np.float32),) * 2 if kind == "LSTM"
              else np.zeros((4, 1, 4), np.float32))


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_cell_empty_batch_as_torch(kind, backend_name):
    cell = make(kind, 3, 4, backend=backend_name)
    out = cell(np.zeros((0, 3), np.float32))
    h1 = out[0] if kind == "LSTMCell" else out
    assert h1.shape == (0, 4)
    grads = cell.backward(np.zeros((0, 4), np.float32))
    assert grads[0].shape == (0, 3)
    assert all(not g.any() for g in cell.grad.values())


# ------------------------------------------------------------------------------------------
# hx


def x_batched(T=5, N=2, I=3, dtype=np.float32):
    return np.zeros((T, N, I), dtype)


@pytest.mark.parametrize("hx", [
    np.zeros((1, 2, 4), np.float32),
    (np.zeros((1, 2, 4), np.float32),),
    (np.zeros((1, 2, 4), np.float32),) * 3,
    [np.zeros((1, 2, 4), np.float32)],
])
def test_lstm_hx_must_be_a_pair(hx):
    with pytest.raises(ValueError, match=r"hx: LSTM expects a pair \(h0, c0\)"):
        make("LSTM", 3, 4)(x_batched(), hx)


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_gru_rnn_hx_must_be_one_array(kind):
    h = np.zeros((1, 2, 4), np.float32)
    with pytest.raises(ValueError, match=f"hx: {kind} expects a single array"):
        make(kind, 3, 4)(x_batched(), (h, h))


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("h_shape, x_shape", [
    ((2, 2, 4), (5, 2, 3)),    # wrong num_layers * num_directions
    ((1, 3, 4), (5, 2, 3)),    # wrong batch
    ((1, 2, 5), (5, 2, 3)),    # wrong hidden size
    ((1, 4), (5, 2, 3)),       # unbatched hx for batched x
    ((1, 1, 4), (5, 3)),       # batched hx for unbatched x
    ((2, 4), (5, 3)),
])
def test_hx_shape(kind, h_shape, x_shape):
    layer = make(kind, 3, 4)
    x = np.zeros(x_shape, np.float32)
    h = np.zeros(h_shape, np.float32)
    good_c = np.zeros((1, 2, 4) if len(x_shape) == 3 else (1, 4), np.float32)
    hx = (h, good_c) if kind == "LSTM" else h
    with pytest.raises(ValueError, match=r"hx.*expected shape"):
        layer(x, hx)


def test_lstm_c0_shape_and_projection_sizes():
    layer = make("LSTM", 3, 4, proj_size=2)
    h, c = np.zeros((1, 2, 2), np.float32), np.zeros((1, 2, 4), np.float32)
    layer(x_batched(), (h, c))  # fine
    with pytest.raises(ValueError, match=r"hx\[1\] \(c0\).*\(1, 2, 4\)"):
        layer(x_batched(), (h, np.zeros((1, 2, 2), np.float32)))
    with pytest.raises(ValueError, match=r"hx\[0\] \(h0\).*\(1, 2, 2\)"):
        layer(x_batched(), (c, c))


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("h_dtype", [np.float64, np.int32, np.float16])
def test_hx_dtype(kind, h_dtype):
    h = np.zeros((1, 2, 4), h_dtype)
    hx = (h, np.zeros((1, 2, 4), np.float32)) if kind == "LSTM" else h
    with pytest.raises(TypeError, match=r"hx.* must have dtype float32"):
        make(kind, 3, 4)(x_batched(), hx)


@pytest.mark.parametrize("kind", CELLS)
def test_cell_hx(kind):
    cell = make(kind, 3, 4)
    x = np.zeros((2, 3), np.float32)
    ok = np.zeros((2, 4), np.float32)
    for bad in (np.zeros((3, 4), np.float32), np.zeros((2, 5), np.float32),
                np.zeros((1, 2, 4), np.float32), np.zeros(4, np.float32)):
        with pytest.raises(ValueError, match=r"hx.*expected shape"):
            cell(x, (bad, ok) if kind == "LSTMCell" else bad)
    with pytest.raises(ValueError, match=r"hx.*expected shape \(4,\)"):
        cell(np.zeros(3, np.float32), (ok, ok) if kind == "LSTMCell" else ok)
    with pytest.raises(TypeError, match="hx.*must have dtype float32"):
        bad = ok.astype(np.float64)
        cell(x, (bad, ok) if kind == "LSTMCell" else bad)
    if kind == "LSTMCell":
        with pytest.raises(ValueError, match=r"hx: LSTMCell expects a pair"):
            cell(x, ok)
    else:
        with pytest.raises(ValueError, match=f"hx: {kind} expects a single array"):
            cell(x, (ok, ok))


# ------------------------------------------------------------------------------------------
# lengths


@pytest.mark.parametrize("lengths, exc, match", [
    ([5, 5, 5], ValueError, "one length per batch element"),
    ([5], ValueError, "one length per batch element"),
    ([0, 5], ValueError, r"1\.\.5"),
    ([6, 5], ValueError, r"1\.\.5"),
    ([-1, 5], ValueError, r"1\.\.5"),
    ([2.0, 5.0], TypeError, "integers, got dtype float64"),
    ([2.5, 5], TypeError, "integers"),
    ([True, True], TypeError, "integers, got dtype bool"),
    (["2", "5"], TypeError, "integers"),
    ([[2, 5]], ValueError, "1-D"),
    (3, ValueError, "1-D"),
])
def test_lengths(lengths, exc, match):
    with pytest.raises(exc, match=f"lengths.*{match}"):
        make("GRU", 3, 4)(x_batched(), lengths=lengths)


def test_lengths_unbatched_take_one_element():
    layer = make("LSTM", 3, 4)
    layer(np.zeros((5, 3), np.float32), lengths=[3])
    with pytest.raises(ValueError, match="lengths.*one length per batch element"):
        layer(np.zeros((5, 3), np.float32), lengths=[3, 3])


def test_lengths_checked_against_batch_first_layout():
    layer = make("GRU", 3, 4, batch_first=True)
    x = np.zeros((2, 5, 3), np.float32)  # N=2, T=5
    layer(x, lengths=[5, 1])
    with pytest.raises(ValueError, match=r"lengths.*1\.\.5"):
        layer(x, lengths=[6, 1])


# ------------------------------------------------------------------------------------------
# backward


@pytest.mark.parametrize("kind", LAYERS + CELLS)
def test_backward_before_any_forward(kind):
    layer = make(kind, 3, 4)
    with pytest.raises(RuntimeError, match="no forward pass has run yet"):
        layer.backward(np.zeros((5, 2, 4), np.float32))


def run(layer, kind):
    """A forward; returns an upstream gradient of the right shape."""
    if "Cell" in kind:
        out = layer(np.ones((2, 3), np.float32))
        return np.ones_like(out[0] if kind == "LSTMCell" else out)
    out, _ = layer(x_batched())
    return np.ones_like(out)


@pytest.mark.parametrize("kind", LAYERS + CELLS)
def test_backward_after_eval_forward(kind):
    layer = make(kind, 3, 4).eval()
    g = run(layer, kind)
    with pytest.raises(RuntimeError, match="last forward ran in eval mode"):
        layer.backward(g)
    layer.train()  # switching back does not resurrect anything
    with pytest.raises(RuntimeError, match="eval mode"):
        layer.backward(g)


@pytest.mark.parametrize("kind", LAYERS + CELLS)
def test_second_backward_raises(kind):
    layer = make(kind, 3, 4)
    g = run(layer, kind)
    layer.backward(g)
    grads = {k: v.copy() for k, v in layer.grad.items()}
    with pytest.raises(RuntimeError, match="backward was already called"):
        layer.backward(g)
    for name, value in layer.grad.items():
        np.testing.assert_array_equal(value, grads[name])
    g = run(layer, kind)  # a new forward makes it possible again
    layer.backward(g)


@pytest.mark.parametrize("kind", LAYERS)
def test_backward_grad_output_checks(kind):
    layer = make(kind, 3, 4, batch_first=True)
    out, _ = layer(np.zeros((2, 5, 3), np.float32))
    with pytest.raises(ValueError, match=r"grad_output: expected shape \(2, 5, 4\)"):
        layer.backward(np.zeros((5, 2, 4), np.float32))
    with pytest.raises(TypeError, match="grad_output must have dtype float32"):
        layer.backward(np.zeros((2, 5, 4), np.float64))
    if kind == "LSTM":
        with pytest.raises(ValueError, match="grad_h_n: LSTM expects None or a pair"):
            layer.backward(np.zeros_like(out), np.zeros((1, 2, 4), np.float32))
        with pytest.raises(ValueError, match=r"grad_h_n\[1\]: expected shape \(1, 2, 4\)"):
            layer.backward(np.zeros_like(out), (None, np.zeros((1, 5, 4), np.float32)))
    else:
        with pytest.raises(ValueError, match="grad_h_n: expected shape"):
            layer.backward(np.zeros_like(out), np.zeros((1, 4), np.float32))
        with pytest.raises(ValueError, match="grad_h_n.*got a tuple"):
            layer.backward(np.zeros_like(out), (np.zeros((1, 2, 4), np.float32),) * 2)
        with pytest.raises(TypeError, match="grad_h_n must have dtype float32"):
            layer.backward(np.zeros_like(out), np.zeros((1, 2, 4), np.int64))
    layer.backward(np.zeros_like(out))  # the failed calls did not consume the forward


@pytest.mark.parametrize("kind", CELLS)
def test_cell_backward_checks(kind):
    cell = make(kind, 3, 4)
    cell(np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"grad_h1: expected shape \(4,\)"):
        cell.backward(np.ones((1, 4), np.float32))
    with pytest.raises(TypeError, match="grad_h1 must have dtype float32"):
        cell.backward(np.ones(4, np.float64))
    if kind == "LSTMCell":
        with pytest.raises(ValueError, match=r"grad_c1: expected shape \(4,\)"):
            cell.backward(np.ones(4, np.float32), np.ones(5, np.float32))
    cell.backward(np.ones(4, np.float32))


# ------------------------------------------------------------------------------------------
# load_state_dict and parameter assignment: checked, and nothing changes on failure


def snapshot(layer):
    return {k: v.copy() for k, v in layer.state_dict().items()}


def assert_unchanged(layer, before):
    after = layer.state_dict()
    assert list(after) == list(before)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


@pytest.mark.parametrize("kind", ["LSTM", "GRUCell"])
def test_load_state_dict_failures_change_nothing(kind):
    kwargs = dict(num_layers=2, proj_size=2) if kind == "LSTM" else {}
    layer = make(kind, 3, 4, seed=0, **kwargs)
    before = snapshot(layer)
    other = {k: np.full_like(v, 0.5) for k, v in before.items()}
    names = list(other)

    missing = dict(other)
    del missing[names[-1]]
    with pytest.raises(KeyError, match=f"missing key.*{names[-1]}"):
        layer.load_state_dict(missing)
    assert_unchanged(layer, before)

    with pytest.raises(KeyError, match="unexpected key.*weight_xx"):
        layer.load_state_dict(dict(other, weight_xx=np.zeros(3)))
    assert_unchanged(layer, before)

    wrong = dict(other)
    wrong[names[-1]] = np.zeros((7, 7))  # the last one: all others would be valid
    with pytest.raises(ValueError, match=f"{names[-1]}.*expected shape"):
        layer.load_state_dict(wrong)
    assert_unchanged(layer, before)

    transposed = dict(other)
    transposed[names[0]] = other[names[0]].T
    with pytest.raises(ValueError, match=f"{names[0]}.*expected shape"):
        layer.load_state_dict(transposed)
    assert_unchanged(layer, before)

    for bad in (np.zeros(other[names[-1]].shape, np.complex64),
                np.full(other[names[-1]].shape, "a"), object()):
        with pytest.raises(TypeError, match=names[-1]):
            layer.load_state_dict(dict(other, **{names[-1]: bad}))
        assert_unchanged(layer, before)

    with pytest.raises(TypeError, match="state_dict should be a mapping"):
        layer.load_state_dict(list(other.items()))
    assert_unchanged(layer, before)

    layer.load_state_dict(other)  # and a good one goes through
    assert all(np.all(v == 0.5) for v in layer.state_dict().values())


def test_load_state_dict_of_another_configuration():
    layer = make("LSTM", 3, 4, bidirectional=True)
    before = snapshot(layer)
    with pytest.raises(KeyError, match="missing key.*_reverse"):
        layer.load_state_dict(make("LSTM", 3, 4).state_dict())
    with pytest.raises(KeyError, match="unexpected key.*bias"):
        make("LSTM", 3, 4, bidirectional=True, bias=False).load_state_dict(before)
    with pytest.raises(ValueError, match="'weight_ih_l0': expected shape"):
        layer.load_state_dict(make("LSTM", 5, 4, bidirectional=True).state_dict())
    assert_unchanged(layer, before)


def test_parameter_assignment_checked():
    layer = make("GRU", 3, 4)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"weight_ih_l0.*expected shape \(12, 3\)"):
        layer.weight_ih_l0 = np.zeros((3, 12))
    with pytest.raises(TypeError, match="weight_ih_l0"):
        layer.weight_ih_l0 = np.zeros((12, 3), np.complex128)
    assert_unchanged(layer, before)
    with pytest.raises(AttributeError, match="weight_hr_l0"):
        layer.weight_hr_l0


# ------------------------------------------------------------------------------------------
# sizes no layer could hold: refused before anything is allocated


FUSED = pytest.mark.skipif("fused" not in BACKENDS, reason="the fused kernels are not built")


@FUSED
@pytest.mark.parametrize("kind, args, kwargs, match", [
    ("LSTM", (3, 2**40), {}, r"hidden_size: 4 gates \* hidden_size = 4398046511104"),
    ("LSTM", (3, 2**29), {}, r"hidden_size: 4 gates \* hidden_size = 2147483648"),
    ("GRU", (2**31, 4), {}, "input_size: input_size = 2147483648"),
    ("RNN", (3, 2**30 + 1), dict(bidirectional=True), r"hidden_size: 2 directions \* hidden"),
    ("GRU", (3, 4), dict(num_layers=2**31), "num_layers = 2147483648 exceeds what"),
    ("LSTMCell", (3, 2**40), {}, "hidden_size"),
    ("GRUCell", (2**40, 3), {}, "input_size"),
])
def test_fused_sizes_beyond_32_bit_blas(kind, args, kwargs, match):
    with pytest.raises(ValueError, match=match + ".*(32-bit BLAS|at most 2147483647)"):
        getattr(lstmfast, kind)(*args, backend="fused", **kwargs)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("kind, args, kwargs", [
    ("LSTM", (2**20, 2**20), {}),
    ("GRU", (3, 4), dict(num_layers=10**9)),
    ("RNN", (2**30, 2**30), {}),
    ("RNNCell", (2**25, 2**25), {}),
])
def test_parameters_beyond_memory(kind, args, kwargs, backend_name):
    with pytest.raises(MemoryError, match=f"{kind}: the parameters and their gradients would "
                                          "need .* more than this machine's"):
        getattr(lstmfast, kind)(*args, backend=backend_name, **kwargs)


def test_numpy_backend_has_no_blas_limit_but_memory():
    with pytest.raises(MemoryError, match="LSTM: the parameters"):
        make("LSTM", 3, 2**40)


@pytest.mark.parametrize("bad", [2**31, 2**63])
def test_set_num_threads_rejects_too_many(bad):
    before = lstmfast.get_num_threads()
    with pytest.raises(ValueError, match=r"set_num_threads: n must be <= 2147483647"):
        lstmfast.set_num_threads(bad)
    assert lstmfast.get_num_threads() == before  # nothing changed
