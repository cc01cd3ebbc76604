"""Behaviour of the layer and cell API: shapes, state_dict, train/eval, dropout, grads, layouts."""

import copy
import importlib.util
import pickle

import numpy as np
import pytest

import lstmfast
from helpers import assert_close, assert_tree_close

HAVE_TORCH = importlib.util.find_spec("torch") is not None

KINDS = ["LSTM", "GRU", "RNN"]
G = {"LSTM": 4, "GRU": 3, "RNN": 1}


def make(kind, *args, backend="numpy", **kwargs):
    return getattr(lstmfast, kind)(*args, backend=backend, **kwargs)


def randn(rng, *shape, dtype="float32"):
    return rng.standard_normal(shape).astype(dtype)


def expected_names(num_layers, bias, bidirectional, proj_size):
    """The documented naming rule: per layer, per direction: ih, hh, [bias ih, hh], [hr]."""
    names = []
    for k in range(num_layers):
        for suffix in ["", "_reverse"][: 2 if bidirectional else 1]:
            names += [f"weight_ih_l{k}{suffix}", f"weight_hh_l{k}{suffix}"]
            names += [f"bias_ih_l{k}{suffix}", f"bias_hh_l{k}{suffix}"] if bias else []
            names += [f"weight_hr_l{k}{suffix}"] if proj_size else []
    return names


# ------------------------------------------------------------------------------------------
# shapes


SHAPE_OPTIONS = [
    {},
    {"num_layers": 3},
    {"bidirectional": True},
    {"batch_first": True, "num_layers": 2, "bidirectional": True},
    {"bias": False},
    {"proj_size": 2},
    {"proj_size": 3, "bidirectional": True, "num_layers": 2, "batch_first": True},
]


def shape_cases():
    for kind in KINDS:
        for options in SHAPE_OPTIONS:
            if "proj_size" in options and kind != "LSTM":
                continue
            for unbatched in (False, True):
                yield pytest.param(kind, options, unbatched,
                                   id=f"{kind}-{options}-{'unbatched' if unbatched else 'batched'}")


@pytest.mark.parametrize("kind, options, unbatched", list(shape_cases()))
def test_shapes(kind, options, unbatched, backend):
    T, N, I, H = 4, 3, 5, 6
    layer = make(kind, I, H, backend=backend, seed=0, **options)
    D = 2 if options.get("bidirectional") else 1
    L = options.get("num_layers", 1)
    H_out = options.get("proj_size", 0) or H
    lead = (T,) if unbatched else ((N, T) if options.get("batch_first") else (T, N))
    state_lead = (L * D,) if unbatched else (L * D, N)
    x = randn(np.random.default_rng(0), *lead, I)
    out, hn = layer(x)
    assert out.shape == lead + (D * H_out,) and out.dtype == np.float32
    if kind == "LSTM":
        hn, cn = hn
        assert cn.shape == state_lead + (H,) and cn.dtype == np.float32
    assert hn.shape == state_lead + (H_out,) and hn.dtype == np.float32

    grad_h_n = (np.ones_like(hn), np.ones_like(cn)) if kind == "LSTM" else np.ones_like(hn)
    dx, dhx = layer.backward(np.ones_like(out), grad_h_n)
    assert dx.shape == x.shape and dx.dtype == np.float32
    if kind == "LSTM":
        assert dhx[0].shape == hn.shape and dhx[1].shape == cn.shape
    else:
        assert dhx.shape == hn.shape
    for name, p in layer.state_dict().items():
        assert layer.grad[name].shape == p.shape and layer.grad[name].dtype == p.dtype


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cell_shapes(kind, dtype, backend):
    cell = getattr(lstmfast, kind)(5, 4, dtype=dtype, backend=backend, seed=0)
    rng = np.random.default_rng(0)
    for lead in [(3,), ()]:
        out = cell(randn(rng, *lead, 5, dtype=dtype))
        outs = out if kind == "LSTMCell" else (out,)
        for o in outs:
            assert o.shape == lead + (4,) and o.dtype == dtype
        if kind == "LSTMCell":
            dx, (dh0, dc0) = cell.backward(np.ones_like(outs[0]), np.ones_like(outs[1]))
            assert dc0.shape == lead + (4,)
        else:
            dx, dh0 = cell.backward(np.ones_like(outs[0]))
        assert dx.shape == lead + (5,) and dh0.shape == lead + (4,) and dx.dtype == dtype


# ------------------------------------------------------------------------------------------
# parameters and state_dict


STATE_DICT_CONFIGS = [
    ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=3)),
    ("LSTM", dict(num_layers=3, bias=False)),
    ("GRU", dict(num_layers=2, bidirectional=True)),
    ("GRU", dict(bias=False, bidirectional=True)),
    ("RNN", dict(num_layers=2, nonlinearity="relu")),
]


@pytest.mark.parametrize("kind, options", STATE_DICT_CONFIGS)
def test_state_dict_keys_and_shapes_match_torch(kind, options):
    layer = make(kind, 5, 7, **options)
    ours = {name: p.shape for name, p in layer.state_dict().items()}
    if HAVE_TORCH:
        import torch

        theirs = {name: tuple(p.shape)
                  for name, p in getattr(torch.nn, kind)(5, 7, **options).state_dict().items()}
        assert list(ours) == list(theirs)
        assert ours == theirs
    else:
        assert list(ours) == expected_names(
            options.get("num_layers", 1), options.get("bias", True),
            options.get("bidirectional", False), options.get("proj_size", 0))


def test_state_dict_naming_rule():
    layer = make("LSTM", 3, 4, num_layers=2, bidirectional=True, proj_size=2)
    assert list(layer.state_dict()) == expected_names(2, True, True, 2)
    assert layer.weight_ih_l1_reverse.shape == (16, 4)  # input of layer 1 is D * proj_size
    assert layer.weight_hh_l0.shape == (16, 2)
    assert layer.weight_hr_l1_reverse.shape == (2, 4)
    cell = lstmfast.GRUCell(3, 4, bias=True, backend="numpy")
    assert list(cell.state_dict()) == ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    assert cell.weight_ih.shape == (12, 3) and cell.bias_hh.shape == (12,)
    assert list(lstmfast.RNNCell(3, 4, bias=False, backend="numpy").state_dict()) == [
        "weight_ih", "weight_hh"]


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_state_dict_round_trip(kind):
    a = make(kind, 3, 4, seed=1, dtype="float64")
    b = make(kind, 3, 4, seed=2, dtype="float64")
    x = randn(np.random.default_rng(0), 2, 3, dtype="float64")
    assert not np.array_equal(a.state_dict()["weight_hh" + ("" if "Cell" in kind else "_l0")],
                              b.state_dict()["weight_hh" + ("" if "Cell" in kind else "_l0")])
    b.load_state_dict(a.state_dict())
    for name, value in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[name], value)
    np.testing.assert_array_equal(np.asarray(a(x)[0]), np.asarray(b(x)[0]))


def test_state_dict_returns_copies_and_attributes_are_live():
    layer = make("GRU", 3, 4, seed=0)
    sd = layer.state_dict()
    sd["weight_ih_l0"][...] = 7
    assert not np.any(layer.weight_ih_l0 == 7)
    x = randn(np.random.default_rng(0), 2, 1, 3)
    before = layer(x)[0]
    layer.weight_ih_l0[...] = 0  # the attribute is the array the layer computes with
    assert not np.allclose(layer(x)[0], before)
    array = layer.weight_hh_l0
    layer.weight_hh_l0 = np.ones((12, 4))  # assignment copies (and casts) into it
    assert layer.weight_hh_l0 is array and array.dtype == np.float32 and np.all(array == 1)
    assert "weight_hh_l0" in dir(layer)


def test_load_state_dict_casts_to_layer_dtype_and_accepts_lists():
    layer32 = make("LSTM", 2, 3, seed=0)
    layer64 = make("LSTM", 2, 3, seed=1, dtype="float64")
    layer32.load_state_dict(layer64.state_dict())
    for name, value in layer32.state_dict().items():
        assert value.dtype == np.float32
        assert_close(value, layer64.state_dict()[name].astype(np.float32), tol=0)
    layer64.load_state_dict({k: v.tolist() for k, v in layer32.state_dict().items()})
    assert layer64.weight_ih_l0.dtype == np.float64


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_load_torch_state_dict_with_grad_tensors():
    import torch

    tmod = torch.nn.LSTM(3, 5, num_layers=2, proj_size=2)
    layer = make("LSTM", 3, 5, num_layers=2, proj_size=2)
    layer.load_state_dict(tmod.state_dict(keep_vars=True))  # requires_grad Parameters
    for name, p in tmod.named_parameters():
        np.testing.assert_array_equal(getattr(layer, name), p.detach().numpy())


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_load_a_bfloat16_torch_state_dict(dtype):
    # NumPy has no bfloat16: such a checkpoint is cast to the layer's dtype as any other
    import torch

    tmod = torch.nn.GRU(3, 5, num_layers=2)
    layer = make("GRU", 3, 5, num_layers=2, dtype=dtype)
    layer.load_state_dict({k: v.bfloat16() for k, v in tmod.state_dict().items()})
    for name, p in tmod.named_parameters():
        value = getattr(layer, name)
        assert value.dtype == dtype
        np.testing.assert_array_equal(value, p.detach().bfloat16().double().numpy().astype(dtype))
    assert not np.array_equal(layer.weight_hh_l0, tmod.weight_hh_l0.detach().numpy())  # really rounded


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
@pytest.mark.parametrize("kind, args, kwargs", [
    ("LSTM", (10, 20), {}),
    ("LSTM", (10, 20), dict(num_layers=2, bias=False, batch_first=True, dropout=0.5,
                            bidirectional=True, proj_size=5)),
    ("GRU", (3, 4), dict(num_layers=3)),
    ("RNN", (3, 4), dict(bidirectional=True)),
    ("LSTMCell", (3, 4), {}),
    ("GRUCell", (3, 4), dict(bias=False)),
    ("RNNCell", (3, 4), dict(nonlinearity="relu")),
])
def test_repr_like_torch(kind, args, kwargs):
    import torch

    ours = make(kind, *args, backend="fused", **kwargs) if lstmfast_fused() else None
    if ours is None:
        ours = make(kind, *args, **kwargs)
        assert repr(ours).endswith(", backend=numpy)")
        text = repr(ours).replace(", backend=numpy", "")
    else:
        text = repr(ours)
    assert text == repr(getattr(torch.nn, kind)(*args, **kwargs))


def lstmfast_fused():
    from conftest import BACKENDS

    return "fused" in BACKENDS


def test_repr_extras():
    assert repr(make("RNN", 3, 4, nonlinearity="relu", dtype="float64")) == (
        "RNN(3, 4, nonlinearity=relu, dtype=float64, backend=numpy)")


# ------------------------------------------------------------------------------------------
# initialisation


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_seed_reproducible_init(kind):
    a, b, c = (make(kind, 3, 4, seed=s) for s in (5, 5, 6))
    for name in a.state_dict():
        np.testing.assert_array_equal(a.state_dict()[name], b.state_dict()[name])
        assert not np.array_equal(a.state_dict()[name], c.state_dict()[name])
    d, e = make(kind, 3, 4), make(kind, 3, 4)  # seed=None: fresh entropy
    assert not np.array_equal(d.weight_ih if "Cell" in kind else d.weight_ih_l0,
                              e.weight_ih if "Cell" in kind else e.weight_ih_l0)


def test_same_seed_same_weights_in_both_dtypes():
    a = make("GRU", 3, 4, seed=3)
    b = make("GRU", 3, 4, seed=3, dtype="float64")
    for name in a.state_dict():
        assert_close(a.state_dict()[name], b.state_dict()[name].astype(np.float32), tol=0)


@pytest.mark.parametrize("kind, kwargs", [
    ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=9)),
    ("GRU", {}), ("RNN", {}), ("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {}),
])
def test_init_range(kind, kwargs):
    H = 16
    layer = make(kind, 40, H, seed=0, **kwargs)
    bound = 1 / np.sqrt(H)
    values = np.concatenate([p.ravel() for p in layer.state_dict().values()])
    assert np.all(np.abs(values) <= bound)
    assert values.max() > 0.95 * bound and values.min() < -0.95 * bound
    assert abs(values.mean()) < 0.05 * bound


# ------------------------------------------------------------------------------------------
# train / eval, backward bookkeeping


def test_train_eval_flags():
    layer = make("LSTM", 3, 4)
    assert layer.training is True  # like torch
    assert layer.eval() is layer and layer.training is False
    assert layer.train() is layer and layer.training is True
    assert layer.train(False) is layer and layer.training is False
    cell = lstmfast.GRUCell(3, 4, backend="numpy")
    assert cell.training is True and cell.eval().training is False


@pytest.mark.parametrize("kind", KINDS)
def test_eval_and_train_forward_agree_without_dropout(kind, backend):
    layer = make(kind, 3, 4, num_layers=2, backend=backend, seed=0)
    x = randn(np.random.default_rng(0), 5, 2, 3)
    out_train = layer(x)[0]
    out_eval = layer.eval()(x)[0]
    assert_close(out_eval, out_train)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_grads_accumulate_and_zero_grad(kind, backend):
    cell = "Cell" in kind
    layer = make(kind, 3, 4, backend=backend, seed=0, dtype="float64")
    rng = np.random.default_rng(0)
    x = randn(rng, 2, 3, dtype="float64") if cell else randn(rng, 5, 2, 3, dtype="float64")

    def step():
        out = layer(x)
        h = out[0] if kind == "LSTMCell" else (out if cell else out[0])
        return layer.backward(np.ones_like(h))

    assert all(np.all(g == 0) for g in layer.grad.values())
    arrays = dict(layer.grad)
    step()
    once = {k: v.copy() for k, v in layer.grad.items()}
    assert any(np.any(g != 0) for g in once.values())
    step()
    for name, g in layer.grad.items():
        assert g is arrays[name]  # same arrays, added into
        assert_close(g, 2 * once[name], name=name)
    layer.zero_grad()
    for name, g in layer.grad.items():
        assert g is arrays[name] and np.all(g == 0)


def test_backward_returns_grad_for_default_zero_hx(backend):
    layer = make("LSTM", 3, 4, backend=backend, seed=0)
    out, _ = layer(randn(np.random.default_rng(0), 2, 1, 3))
    dx, (dh0, dc0) = layer.backward(np.ones_like(out))
    assert dh0.shape == (1, 1, 4) and dc0.shape == (1, 1, 4)
    assert np.any(dh0 != 0)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_pickle_and_deepcopy(kind, backend):
    layer = make(kind, 3, 4, num_layers=2, backend=backend, seed=0).eval()
    x = randn(np.random.default_rng(0), 5, 2, 3)
    expected = layer(x)[0]
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert_close(clone(x)[0], expected, tol=0)
        clone.weight_ih_l0[...] = 0
        assert not np.all(layer.weight_ih_l0 == 0)


# ------------------------------------------------------------------------------------------
# dropout


def dropout_layer(kind, backend="numpy", seed=7, dropout=0.5, **kwargs):
    return make(kind, 3, 4, num_layers=3, dropout=dropout, bidirectional=True,
                backend=backend, seed=seed, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_reproducible_with_seed_and_absent_in_eval(kind, backend):
    x = randn(np.random.default_rng(0), 6, 5, 3)
    a, b, c = dropout_layer(kind, backend), dropout_layer(kind, backend), dropout_layer(kind, backend)
    c.load_state_dict(a.state_dict())
    c._dropout_rng = np.random.default_rng(123)  # same weights, another dropout stream
    out_a, out_b, out_c = a(x)[0], b(x)[0], c(x)[0]
    np.testing.assert_array_equal(out_a, out_b)
    assert not np.allclose(out_a, out_c)
    assert not np.allclose(a(x)[0], out_a)  # a new mask on each call
    plain = make(kind, 3, 4, num_layers=3, bidirectional=True, backend=backend)
    plain.load_state_dict(a.state_dict())
    plain_out = plain(x)[0]
    assert not np.allclose(out_a, plain_out)
    a.eval()
    assert_close(a(x)[0], plain_out)
    assert_close(a(x)[0], plain_out)


def test_dropout_masks_values_and_stream():
    layer = dropout_layer("GRU", dropout=0.3)
    masks = layer._make_dropout_masks(50, 40)
    assert len(masks) == 2
    for m in masks:
        assert m.shape == (50, 40, 8) and m.dtype == np.float32
        values = set(np.unique(m).tolist())
        assert values == {0.0, np.float32(1 / 0.7)}
        assert abs(np.mean(m == 0) - 0.3) < 0.03
    assert not np.array_equal(masks[0], masks[1])
    # one seed, one mask stream, whatever the dtype
    m32 = dropout_layer("GRU", dropout=0.3)._make_dropout_masks(5, 4)
    m64 = dropout_layer("GRU", dropout=0.3, dtype="float64")._make_dropout_masks(5, 4)
    for a, b in zip(m32, m64):
        assert b.dtype == np.float64
        np.testing.assert_array_equal(a, b.astype(np.float32))
    full = dropout_layer("GRU", dropout=1.0)._make_dropout_masks(3, 2)
    assert all(np.all(m == 0) for m in full)


def split_layers(layer, kind, backend):
    """One single-layer module per layer of ``layer``, with the same weights."""
    singles = []
    for k in range(layer.num_layers):
        I = layer.input_size if k == 0 else 2 * layer.hidden_size
        single = make(kind, I, layer.hidden_size, bidirectional=True, backend=backend,
                      dtype=layer.dtype)
        single.load_state_dict({name.replace(f"_l{k}", "_l0"): value
                                for name, value in layer.state_dict().items()
                                if f"_l{k}" in name})
        singles.append(single)
    return singles


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_masks_multiply_layer_outputs(kind, backend, monkeypatch):
    """Output and gradients equal the stack of single layers with the masks in between."""
    rng = np.random.default_rng(0)
    layer = dropout_layer(kind, backend, dtype="float64")
    T, N = 4, 3
    masks = [np.where(rng.random((T, N, 8)) < 0.5, 2.0, 0.0) for _ in range(2)]
    monkeypatch.setattr(layer, "_make_dropout_masks", lambda T_, N_: masks)
    x = randn(rng, T, N, 3, dtype="float64")
    out, _ = layer(x)
    g = randn(rng, T, N, 8, dtype="float64")
    dx, _ = layer.backward(g)

    singles = split_layers(layer, kind, backend)
    h = x
    for k, single in enumerate(singles):
        h = single(h)[0]
        if k < 2:
            h = h * masks[k]
    assert_close(out, h)
    d = g
    for k in reversed(range(3)):
        d, _ = singles[k].backward(d)
        if k > 0:
            d = d * masks[k - 1]
    assert_close(dx, d)
    for k, single in enumerate(singles):
        for name, value in single.grad.items():
            assert_close(layer.grad[name.replace("_l0", f"_l{k}")], value, name=name)


def test_dropout_one_cuts_lower_layers(backend):
    layer = dropout_layer("LSTM", backend, dropout=1.0, dtype="float64")
    x = randn(np.random.default_rng(0), 4, 2, 3, dtype="float64")
    out, _ = layer(x)
    layer.backward(np.ones_like(out))
    top = split_layers(layer, "LSTM", backend)[2]
    assert_close(out, top(np.zeros((4, 2, 8)))[0])
    for name, g in layer.grad.items():
        if "_l2" not in name:
            assert np.all(g == 0), name


def test_dropout_same_on_every_backend(backend):
    x = randn(np.random.default_rng(0), 6, 5, 3)
    out = dropout_layer("LSTM", backend)(x)[0]
    assert_close(out, dropout_layer("LSTM", "numpy")(x)[0])


def test_no_dropout_warning_for_single_layer_like_torch():
    with pytest.warns(UserWarning, match="dropout.*num_layers greater than 1"):
        make("GRU", 3, 4, dropout=0.2)


# ------------------------------------------------------------------------------------------
# layouts: batch_first, unbatched, non-contiguous input


@pytest.mark.parametrize("kind", KINDS)
def test_batch_first_is_a_transpose(kind, backend):
    rng = np.random.default_rng(0)
    tm = make(kind, 3, 4, num_layers=2, bidirectional=True, backend=backend, seed=0)
    bf = make(kind, 3, 4, num_layers=2, bidirectional=True, batch_first=True, backend=backend)
    bf.load_state_dict(tm.state_dict())
    x = randn(rng, 5, 2, 3)
    g = randn(rng, 5, 2, 8)
    out_tm, hn_tm = tm(x)
    out_bf, hn_bf = bf(x.transpose(1, 0, 2))
    assert_close(out_bf, out_tm.transpose(1, 0, 2))
    assert_tree_close(hn_bf, hn_tm)  # states are never batch_first
    dx_tm, _ = tm.backward(g)
    dx_bf, _ = bf.backward(g.transpose(1, 0, 2))
    assert_close(dx_bf, dx_tm.transpose(1, 0, 2))
    for name in tm.grad:
        assert_close(bf.grad[name], tm.grad[name], name=name)


@pytest.mark.parametrize("kind", KINDS)
def test_unbatched_equals_batched_with_one_element(kind, backend):
    rng = np.random.default_rng(0)
    a = make(kind, 3, 4, num_layers=2, bidirectional=True, backend=backend, seed=0,
             dtype="float64", **({"proj_size": 2} if kind == "LSTM" else {}))
    b = copy.deepcopy(a)
    H_out = 2 if kind == "LSTM" else 4
    x = randn(rng, 5, 3, dtype="float64")
    h0 = randn(rng, 4, H_out, dtype="float64")
    c0 = randn(rng, 4, 4, dtype="float64")
    g = randn(rng, 5, 2 * H_out, dtype="float64")
    gh = randn(rng, 4, H_out, dtype="float64")
    lstm = kind == "LSTM"
    out_u, hn_u = a(x, (h0, c0) if lstm else h0)
    out_b, hn_b = b(x[:, None], (h0[:, None], c0[:, None]) if lstm else h0[:, None])
    assert out_u.shape == (5, 2 * H_out)
    assert_close(out_u, out_b[:, 0])
    if lstm:
        assert_close(hn_u[0], hn_b[0][:, 0])
        assert_close(hn_u[1], hn_b[1][:, 0])
        dx_u, (dh_u, dc_u) = a.backward(g, (gh, None))
        dx_b, (dh_b, dc_b) = b.backward(g[:, None], (gh[:, None], None))
        assert_close(dc_u, dc_b[:, 0])
    else:
        assert_close(hn_u, hn_b[:, 0])
        dx_u, dh_u = a.backward(g, gh)
        dx_b, dh_b = b.backward(g[:, None], gh[:, None])
    assert_close(dx_u, dx_b[:, 0])
    assert_close(dh_u, dh_b[:, 0])
    for name in a.grad:
        assert_close(a.grad[name], b.grad[name], name=name)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_noncontiguous_and_fortran_inputs(kind, backend):
    rng = np.random.default_rng(0)
    layer = make(kind, 3, 4, bidirectional=True, backend=backend, seed=0).eval()
    x = randn(rng, 5, 2, 3)
    h = randn(rng, 2, 2, 4)
    hx = (h, randn(rng, 2, 2, 4)) if kind == "LSTM" else h
    expected = layer(x, hx)
    variants = [
        np.asfortranarray(x),
        np.repeat(x, 2, axis=2)[:, :, ::2],  # strided view
        np.ascontiguousarray(x.transpose(1, 0, 2)).transpose(1, 0, 2),  # transposed view
        x[::-1][::-1],
    ]
    for v in variants:
        assert v.shape == x.shape
        if kind == "LSTM":
            result = layer(v, (np.asfortranarray(hx[0]), hx[1][:, ::-1][:, ::-1]))
            assert_close(result[1][0], expected[1][0])
            assert_close(result[1][1], expected[1][1])
        else:
            result = layer(v, np.asfortranarray(hx))
            assert_close(result[1], expected[1])
        assert_close(result[0], expected[0], tol=0)
    cell = lstmfast.GRUCell(3, 4, backend=backend, seed=0)
    xs = randn(rng, 3, 4)
    assert_close(cell(np.asfortranarray(xs.T)), cell(np.ascontiguousarray(xs.T)), tol=0)


def test_lists_work_for_float64_layers():
    layer = make("GRU", 2, 3, dtype="float64", seed=0)
    out, hn = layer([[1.0, 2.0], [3.0, 4.0]])
    assert out.shape == (2, 3) and hn.shape == (1, 3)


# ------------------------------------------------------------------------------------------
# lengths (PackedSequence semantics), checked without torch


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_lengths_equal_running_each_sequence_alone(kind, batch_first, backend):
    rng = np.random.default_rng(0)
    T, lengths = 6, [4, 6, 1, 3]
    layer = make(kind, 3, 5, num_layers=2, bidirectional=True, batch_first=batch_first,
                 backend=backend, seed=0, dtype="float64")
    alone = make(kind, 3, 5, num_layers=2, bidirectional=True, backend=backend,
                 dtype="float64")
    alone.load_state_dict(layer.state_dict())
    x = randn(rng, T, 4, 3, dtype="float64")
    g = randn(rng, T, 4, 10, dtype="float64")
    xb = x.transpose(1, 0, 2) if batch_first else x
    gb = g.transpose(1, 0, 2) if batch_first else g
    out, hn = layer(xb, lengths=np.array(lengths))
    dx, _ = layer.backward(gb)
    if batch_first:
        out, dx = out.transpose(1, 0, 2), dx.transpose(1, 0, 2)
    summed = {name: np.zeros_like(g_) for name, g_ in layer.grad.items()}
    for b, n in enumerate(lengths):
        out_b, hn_b = alone(x[:n, b])
        assert_close(out[:n, b], out_b, name=f"output of sequence {b}")
        assert np.all(out[n:, b] == 0), "output past a sequence's end must be 0"
        states = zip(hn, hn_b) if kind == "LSTM" else [(hn, hn_b)]
        for s, s_b in states:
            assert_close(s[:, b], s_b, name=f"final state of sequence {b}")
        alone.zero_grad()
        dx_b, _ = alone.backward(g[:n, b])
        assert_close(dx[:n, b], dx_b, name=f"grad x of sequence {b}")
        assert np.all(dx[n:, b] == 0)
        for name in summed:
            summed[name] += alone.grad[name]
    for name in summed:
        assert_close(layer.grad[name], summed[name], name=name)


def test_lengths_accept_lists_tuples_and_int_arrays():
    layer = make("GRU", 2, 3, seed=0).eval()
    x = randn(np.random.default_rng(0), 4, 3, 2)
    expected = layer(x, lengths=[2, 4, 1])[0]
    for lengths in ((2, 4, 1), np.array([2, 4, 1], dtype=np.int32),
                    np.array([2, 4, 1], dtype=np.uint8)):
        np.testing.assert_array_equal(layer(x, lengths=lengths)[0], expected)
    full = layer(x, lengths=[4, 4, 4])[0]
    np.testing.assert_array_equal(full, layer(x)[0])


# ------------------------------------------------------------------------------------------
# cells


@pytest.mark.parametrize("kind, nonlinearity", [("LSTM", None), ("GRU", None),
                                                ("RNN", "tanh"), ("RNN", "relu")])
def test_cell_steps_equal_the_layer(kind, nonlinearity, backend):
    """Streaming a sequence through a cell gives the one-layer layer's output."""
    rng = np.random.default_rng(0)
    extra = {"nonlinearity": nonlinearity} if nonlinearity else {}
    layer = make(kind, 3, 4, backend=backend, seed=0, dtype="float64", **extra).eval()
    cell = make(kind + "Cell", 3, 4, backend=backend, dtype="float64", **extra).eval()
    cell.load_state_dict({name[:-3]: v for name, v in layer.state_dict().items()})
    x = randn(rng, 5, 2, 3, dtype="float64")
    out, hn = layer(x)
    state = None
    for t in range(5):
        state = cell(x[t], state)
        h = state[0] if kind == "LSTM" else state
        assert_close(h, out[t], name=f"step {t}")
    if kind == "LSTM":
        assert_close(state[1], hn[1][0])


def test_cell_backward_matches_one_step_layer(backend):
    rng = np.random.default_rng(0)
    layer = make("LSTM", 3, 4, backend=backend, seed=0, dtype="float64")
    cell = lstmfast.LSTMCell(3, 4, backend=backend, dtype="float64")
    cell.load_state_dict({name[:-3]: v for name, v in layer.state_dict().items()})
    x = randn(rng, 2, 3, dtype="float64")
    h0, c0, gh, gc = (randn(rng, 2, 4, dtype="float64") for _ in range(4))
    layer(x[None], (h0[None], c0[None]))
    dx_l, (dh_l, dc_l) = layer.backward(np.zeros((1, 2, 4)), (gh[None], gc[None]))
    cell(x, (h0, c0))
    dx_c, (dh_c, dc_c) = cell.backward(gh, gc)
    assert_close(dx_c, dx_l[0])
    assert_close(dh_c, dh_l[0])
    assert_close(dc_c, dc_l[0])
    for name in cell.grad:
        assert_close(cell.grad[name], layer.grad[name + "_l0"], name=name)


# ------------------------------------------------------------------------------------------
# the short path of plain inference calls (_RNNBase._plain_inference_forward)

PLAIN_CONFIGS = [
    ("LSTM", dict()),
    ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=3)),
    ("LSTM", dict(bias=False)),
    ("LSTM", dict(peephole=True)),  # parameters beyond torch's four: not the lean entry
    ("GRU", dict(num_layers=2, bidirectional=True)),
    ("GRU", dict(linear_before_reset=False)),
    ("RNN", dict(nonlinearity="relu", bias=False)),
    ("RNN", dict(num_layers=3)),
]


def _short_path_spy(monkeypatch):
    """A list that records, for each call, whether the short path took it."""
    from lstmfast.modules import base

    taken = []
    original = base._RNNBase._plain_inference_forward

    def spy(self, x, hx):
        result = original(self, x, hx)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(base._RNNBase, "_plain_inference_forward", spy)
    return taken


@pytest.mark.skipif(not lstmfast._fused.available, reason="fused kernels not built")
@pytest.mark.parametrize("kind, kwargs", PLAIN_CONFIGS)
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("with_hx", [False, True])
@pytest.mark.parametrize("precision", ["float32", "float64", "int8", "bfloat16"])
def test_plain_inference_calls_take_the_short_path_with_the_full_paths_results(
        kind, kwargs, T, with_hx, precision, monkeypatch):
    dtype = "float64" if precision == "float64" else "float32"
    layer = make(kind, 5, 7, backend="fused", dtype=dtype, seed=2, **kwargs).eval()
    if precision in ("int8", "bfloat16"):
        layer = lstmfast.quantize(layer, precision)
    rng = np.random.default_rng(4)
    N, D = 3, 2 if kwargs.get("bidirectional") else 1
    LD, H_out = kwargs.get("num_layers", 1) * D, kwargs.get("proj_size") or 7
    x = randn(rng, T, N, 5, dtype=dtype)
    hx = None
    if with_hx:
        h0 = randn(rng, LD, N, H_out, dtype=dtype)
        hx = (h0, randn(rng, LD, N, 7, dtype=dtype)) if kind == "LSTM" else h0
    taken = _short_path_spy(monkeypatch)
    got = layer(x, hx)
    assert taken == [True]
    from lstmfast.modules import base

    monkeypatch.setattr(base._RNNBase, "_plain_inference_forward", lambda self, x, hx: None)
    expected = layer(x, hx)
    for a, b in zip(_result_arrays(got), _result_arrays(expected)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    with pytest.raises(RuntimeError):  # an eval-mode forward keeps nothing for backward
        layer.backward(np.ones_like(got[0]))


def _result_arrays(result):
    """The arrays of (output, h_n) or (output, (h_n, c_n))."""
    output, states = result
    return [output] + (list(states) if isinstance(states, tuple) else [states])


@pytest.mark.skipif(not lstmfast._fused.available, reason="fused kernels not built")
@pytest.mark.parametrize("case", ["batch_first", "noncontiguous", "float64_x", "list_x", "unbatched",
                                  "hx_wrong_shape", "hx_noncontiguous", "lengths", "training",
                                  "zoneout", "clip", "activations", "input_forget", "reverse",
                                  "big_endian_x", "ctrnn", "numpy_backend", "empty_batch"])
def test_calls_the_short_path_leaves_to_the_full_one(case, monkeypatch):
    # Everything but the plain call goes the full way, with its results and errors.
    kwargs = {}
    if case == "zoneout":
        kwargs["zoneout"] = 0.3
    if case == "clip":
        kwargs["clip"] = 2.0
    if case == "activations":
        kwargs["activations"] = ["HardSigmoid", "Tanh", "Tanh"]
    if case in ("input_forget", "reverse"):
        kwargs[case] = True
    cls = "CTRNN" if case == "ctrnn" else "LSTM"
    backend = "numpy" if case == "numpy_backend" else "fused"
    layer = getattr(lstmfast, cls)(4, 6, backend=backend, seed=1, batch_first=case == "batch_first",
                                   **kwargs)
    layer.train(case == "training")
    rng = np.random.default_rng(5)
    x = randn(rng, 3, 2, 4)
    hx, lengths = None, None
    if case == "noncontiguous":
        x = np.asfortranarray(x)
    elif case == "float64_x":
        x = x.astype("float64")
    elif case == "big_endian_x":  # float32, but not numpy's builtin dtype object
        x = x.astype(">f4")
    elif case == "list_x":
        x = x.tolist()
    elif case == "unbatched":
        x = x[:, 0]
    elif case == "hx_wrong_shape":
        hx = (np.zeros((1, 3, 6), "float32"), np.zeros((1, 3, 6), "float32"))
    elif case == "hx_noncontiguous":
        hx = (np.zeros((6, 2, 1), "float32").T, np.zeros((1, 2, 6), "float32"))
    elif case == "lengths":
        lengths = [3, 2]
    elif case == "empty_batch":
        x = x[:, :0]
    taken = _short_path_spy(monkeypatch)
    try:
        layer(x, hx, lengths)
    except (TypeError, ValueError):
        assert case in ("float64_x", "big_endian_x", "list_x", "hx_wrong_shape"), case
    assert not any(taken), taken
