"""ONNX's options on the NumPy API's LSTM, GRU and RNN: ``reverse`` against torch.nn
run on the reversed sequences (the oracle), training with the clip in the kernels,
the options the kernels do not compute taking the reference's path with backward, and
every bad value refused by name.
ONNX Runtime is the oracle of the options themselves (test_onnx_import.py); finite
differences check their gradients (reference/test_reference.py)."""

import numpy as np
import pytest

import lstmfast

from helpers import assert_close

LAYERS = {"LSTM": {}, "GRU": {}, "GRU_RESET_BEFORE": {"linear_before_reset": False},
          "RNN": {"nonlinearity": "relu"}}


def reversed_within_lengths(a, lengths):
    """a (T, N, ...) with each sequence's first lengths[b] steps in reverse order."""
    out = np.zeros_like(a)
    for b, n in enumerate(lengths):
        out[:n, b] = a[:n, b][::-1]
    return out


@pytest.mark.parametrize("backend", ["fused", "numpy"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_reverse_is_torchs_layer_on_the_reversed_sequences(kind, backend):
    """A reverse layer's output at step t is torch's at step n-1-t of the sequence
    reversed within its length n; h_n (c_n) and every gradient are torch's."""
    torch = pytest.importorskip("torch")
    T, N, I, H, L = 6, 4, 3, 5, 2
    lengths = [6, 2, 5, 1]
    name = "GRU" if kind.startswith("GRU") else kind
    ours = getattr(lstmfast, name)(I, H, num_layers=L, reverse=True, dtype="float64",
                                   backend=backend, seed=4, **LAYERS[kind])
    if kind == "GRU_RESET_BEFORE":  # torch has no such GRU: the adapter's loop of torch ops
        import lstmfast.torch as lt

        theirs = lt.GRU(I, H, num_layers=L, linear_before_reset=False).double()
    else:
        theirs = getattr(torch.nn, name)(I, H, num_layers=L, **LAYERS[kind]).double()
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, N, I))
    h0 = rng.standard_normal((L, N, H))
    hx = (h0, rng.standard_normal((L, N, H))) if name == "LSTM" else h0
    dy = rng.standard_normal((T, N, H))

    y, state = ours(x, hx, lengths=lengths)
    dx, dhx = ours.backward(dy)

    x_t = torch.tensor(reversed_within_lengths(x, lengths), requires_grad=True)
    hx_t = tuple(torch.tensor(s, requires_grad=True) for s in (hx if name == "LSTM" else (hx,)))
    packed = torch.nn.utils.rnn.pack_padded_sequence(x_t, lengths, enforce_sorted=False)
    y_packed, state_t = theirs(packed, hx_t if name == "LSTM" else hx_t[0])
    y_t, _ = torch.nn.utils.rnn.pad_packed_sequence(y_packed, total_length=T)
    y_t.backward(torch.from_numpy(reversed_within_lengths(dy, lengths)))

    assert_close(y, reversed_within_lengths(y_t.detach().numpy(), lengths), name="output")
    states = state if name == "LSTM" else (state,)
    states_t = state_t if name == "LSTM" else (state_t,)
    for a, b in zip(states, states_t):
        assert_close(a, b.detach().numpy(), name="final state")
    assert_close(dx, reversed_within_lengths(x_t.grad.numpy(), lengths), name="dx")
    for a, b in zip(dhx if name == "LSTM" else (dhx,), hx_t):
        assert_close(a, b.grad.numpy(), name="d hx")
    for key, grad in ours.grad.items():
        assert_close(grad, getattr(theirs, key).grad.numpy(), name=f"grad[{key}]")


@pytest.mark.parametrize("kind, options", [
    ("LSTM", dict(activations=["hardsigmoid", "tanh", "relu"], clip=1.0, input_forget=True)),
    ("GRU", dict(activations=["softsign", "elu"], activation_alpha=[None, 0.5], clip=0.7,
                 bidirectional=True, num_layers=2)),
    ("RNN", dict(activations=["leakyrelu"], activation_alpha=[0.1], reverse=True)),
])
def test_options_outside_the_kernels_train_on_the_reference_path(kind, options):
    """A fused layer computes what its numpy twin does, backward included: the
    options the kernels lack run in the reference (docs/onnx.md)."""
    fused = getattr(lstmfast, kind)(3, 4, seed=1, **options)
    numpy = getattr(lstmfast, kind)(3, 4, seed=1, backend="numpy", **options)
    assert not fused._kernels_compute()
    x = np.random.default_rng(2).standard_normal((5, 2, 3)).astype(np.float32)
    for layer in (fused, numpy):
        y, _ = layer(x, lengths=[5, 3])
        layer.backward(np.ones_like(y))
    assert_close(fused(x)[0], numpy(x)[0], name="output")
    for key in numpy.grad:
        assert_close(fused.grad[key], numpy.grad[key], name=f"grad[{key}]")


def test_options_are_attributes_and_in_the_repr():
    layer = lstmfast.LSTM(3, 4, activations=["HardSigmoid", "tanh", "tanh"], clip=2,
                          input_forget=True, reverse=True)
    assert layer.activations == ("hardsigmoid", "tanh", "tanh")
    assert layer.activation_alpha == (0.2, None, None)  # ONNX Runtime's defaults
    assert layer.activation_beta == (0.5, None, None)
    assert layer.clip == 2.0 and layer.input_forget and layer.reverse
    assert repr(layer) == ("LSTM(3, 4, activations=('hardsigmoid', 'tanh', 'tanh'), "
                           "activation_alpha=(0.2, None, None), activation_beta=(0.5, None, None), "
                           "clip=2.0, input_forget=True, reverse=True)")
    plain = lstmfast.GRU(3, 4, activations=["sigmoid", "tanh"])  # torch's own: nothing to say
    assert repr(plain) == "GRU(3, 4)" and plain.activations == ("sigmoid", "tanh")
    assert lstmfast.RNN(3, 4).activations == ("tanh",)
    relu = lstmfast.RNN(3, 4, activations=["Relu"])
    assert relu.nonlinearity == "relu" and repr(relu) == "RNN(3, 4, nonlinearity=relu)"


def test_what_the_kernels_compute_quantizes_and_the_rest_does_not():
    x = np.random.default_rng(0).standard_normal((4, 2, 3)).astype(np.float32)
    layer = lstmfast.GRU(3, 4, reverse=True, clip=1.0, activations=["hardsigmoid", "tanh"],
                         seed=0).eval()
    quantized = lstmfast.quantize(layer, "int8")
    assert quantized.reverse and quantized.clip == 1.0
    y, _ = quantized(x)
    assert y.shape == (4, 2, 4)
    with pytest.raises(ValueError, match="quantize: with these activations the layer runs in "
                                         "the reference"):
        lstmfast.quantize(lstmfast.LSTM(3, 4, activations=["softsign", "tanh", "tanh"]), "int8")


@pytest.mark.parametrize("kind, options", [
    ("LSTM", dict(clip=0.5, input_forget=True)),
    ("GRU", dict(clip=0.6, activations=["hardsigmoid", "tanh"], bidirectional=True)),
    ("GRU", dict(clip=0.7, linear_before_reset=False, num_layers=2)),
    ("RNN", dict(clip=0.4, nonlinearity="relu", reverse=True)),
])
def test_training_with_a_clip_runs_in_the_kernels(kind, options):
    """The kernels train with every option they compute, the clip included: the fused
    layer's forward and gradients are its numpy twin's, from the kernels' cache."""
    _fused = pytest.importorskip("lstmfast._fused")
    if not _fused.available:
        pytest.skip("fused kernels not built")
    fused = getattr(lstmfast, kind)(3, 4, seed=0, **options)
    numpy = getattr(lstmfast, kind)(3, 4, seed=0, backend="numpy", **options)
    assert fused._kernels_compute()
    x = np.random.default_rng(1).standard_normal((5, 2, 3)).astype(np.float32) * 3
    dy = np.random.default_rng(2).standard_normal((5, 2, 4 * fused._num_directions))
    for layer in (fused, numpy):
        y, _ = layer(x, lengths=[5, 3])
        if layer is fused:
            assert isinstance(layer._calls.pending, _fused._Cache)  # not the reference's
        layer.backward(dy.astype(np.float32))
    assert_close(fused(x)[0], numpy(x)[0], name="output")
    for key in numpy.grad:
        assert_close(fused.grad[key], numpy.grad[key], name=f"grad[{key}]")


@pytest.mark.parametrize("make, error, message", [
    (lambda: lstmfast.LSTM(3, 4, activations=["gelu", "tanh", "tanh"]), ValueError,
     "activations: 'gelu' is not one of"),
    (lambda: lstmfast.LSTM(3, 4, activations="sigmoid"), TypeError,
     "activations should be a sequence of names"),
    (lambda: lstmfast.LSTM(3, 4, activations=["sigmoid", "tanh"]), ValueError,
     r"activations: LSTM takes 3 \(sigmoid, tanh, tanh\), got 2"),
    (lambda: lstmfast.GRU(3, 4, activations=["sigmoid", "tanh"], activation_alpha=[0.1]),
     ValueError, "activation_alpha: expected one entry .* per activation, 2, got 1"),
    (lambda: lstmfast.GRU(3, 4, activations=["sigmoid", "tanh"], activation_beta=[0.1, None]),
     ValueError, "activation_beta: sigmoid takes none, got 0.1"),
    (lambda: lstmfast.GRU(3, 4, activations=["hardsigmoid", "tanh"], activation_alpha=["a", None]),
     TypeError, "activation_alpha should hold numbers or None"),
    (lambda: lstmfast.RNN(3, 4, activation_alpha=[0.1]), ValueError,
     "activation_alpha, activation_beta: given without activations"),
    (lambda: lstmfast.LSTM(3, 4, clip=0), ValueError, "clip must be None or a number > 0, got 0"),
    (lambda: lstmfast.LSTM(3, 4, clip=True), ValueError, "clip must be None or a number > 0"),
    (lambda: lstmfast.LSTM(3, 4, input_forget=1), TypeError, "input_forget should be of type bool"),
    (lambda: lstmfast.GRU(3, 4, reverse=True, bidirectional=True), ValueError,
     "reverse: a bidirectional layer already runs both ways"),
    (lambda: lstmfast.RNN(3, 4, reverse="yes"), TypeError, "reverse should be of type bool"),
    (lambda: lstmfast.RNN(3, 4, nonlinearity="relu", activations=["tanh"]), ValueError,
     "activations=\\('tanh',\\) and nonlinearity='relu' disagree"),
])
def test_bad_options_are_refused_by_name(make, error, message):
    with pytest.raises(error, match=message):
        make()
