"""lstmfast.torch with reduced precision: torch's dynamically quantized LSTM/GRU on
the int8 kernels (accelerate, quantize_dynamic), and bfloat16 autocast.

Oracles: the reference's int8 product with torch's own int8 weights, float32
torch for the accuracy contract, and torch's own int8 and autocast results.
"""

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.ao.nn.quantized import dynamic as nnqd  # noqa: E402

import lstmfast.torch as lt  # noqa: E402
from lstmfast import reference  # noqa: E402

from helpers import assert_close  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning",
                                        "ignore::UserWarning")  # torch.ao's migration notes


def torch_int8(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {nn.LSTM, nn.GRU}, dtype=torch.qint8)


def relative_error(got, expected):
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


OPTIONS = [dict(), dict(num_layers=2, bidirectional=True), dict(batch_first=True),
           dict(num_layers=3, batch_first=True, bidirectional=True)]  # torch.ao needs bias=True


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("options", OPTIONS)
def test_accelerate_runs_torchs_int8_layers_on_the_kernels_with_their_weights(kind, options):
    torch.manual_seed(0)
    quantized = torch_int8(nn.Sequential(kind(12, 24, **options)))
    x = torch.randn(3, 9, 12) if options.get("batch_first") else torch.randn(9, 3, 12)
    layer = quantized[0]
    lt.accelerate(quantized)
    assert type(layer) is (lt.QuantizedLSTM if kind is nn.LSTM else lt.QuantizedGRU)
    assert isinstance(layer, nnqd.LSTM if kind is nn.LSTM else nnqd.GRU)
    got = layer(x)
    # Oracle: the reference stack with the module's own int8 weights and scales.
    weight_bias = layer._weight_bias()
    params = {}
    for name, q in weight_bias["weight"].items():
        params[name] = reference.Int8Weight(q.int_repr().numpy(),
                                            np.full(q.shape[0], q.q_scale(), np.float32))
    for name, b in weight_bias["bias"].items():
        if b is not None:
            params[name] = b.detach().numpy()
    x_tm = x.transpose(0, 1) if options.get("batch_first") else x
    D = 2 if options.get("bidirectional") else 1
    L = options.get("num_layers", 1)
    h0 = np.zeros((L * D, 3, 24), np.float32)
    expected = reference.forward(kind.__name__, x_tm.numpy(), (h0, h0) if kind is nn.LSTM else h0,
                                 params, num_layers=L, bidirectional=D == 2)
    out = got[0].transpose(0, 1) if options.get("batch_first") else got[0]
    # A few steps of the activation grid, as in kernels/test_quantize.py's sequence test.
    assert_close(out.numpy(), expected[0], tol=2e-3, name="output")
    h_n = got[1][0] if kind is nn.LSTM else got[1]
    assert_close(h_n.numpy(), expected[1], tol=2e-3, name="h_n")
    lt.restore(quantized)
    assert type(layer) is (nnqd.LSTM if kind is nn.LSTM else nnqd.GRU)


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_int8_error_is_no_larger_than_torchs_own(kind):
    # docs/guide.md "Reduced precision": against float32, lstmfast's int8 output error is
    # no larger than torch's quantize_dynamic error on the same model.
    torch.manual_seed(1)
    model = nn.Sequential(kind(64, 128, num_layers=2))
    x = torch.randn(50, 8, 64)
    with torch.no_grad():
        expected = model(x)[0]
        torch_error = relative_error(torch_int8(model)(x)[0], expected)
        ours = relative_error(lt.quantize_dynamic(model, {kind})(x)[0], expected)
    assert 0 < ours <= torch_error, f"lstmfast int8 {ours:.4g}, torch int8 {torch_error:.4g}"


def test_layer_norm_lstm_error_is_no_larger_than_torchs_own_of_torchaudios_module():
    # The layer norms divide by the spread of their inputs, so every reduced
    # precision errs several times more on this cell than on the LSTM (int8 about
    # 0.1, bfloat16 about 0.02 of the largest output here): the contract is torch's
    # own reduced forms of torchaudio's _CustomLSTM (its code transcribed:
    # quantize_dynamic of its Linear layers, bfloat16 autocast), in the median over
    # models, as one model's largest error is one unit's.
    from lstmfast.oracles import CustomLSTMLoop
    from lstmfast import LayerNormLSTM, quantize

    errors = {key: [] for key in ("torch int8", "ours int8", "torch bf16", "ours bf16")}
    for seed in range(6):
        torch.manual_seed(seed)
        module = CustomLSTMLoop(64, 128).eval()
        layer = LayerNormLSTM(64, 128)
        layer.load_state_dict({
            "weight_ih_l0": module.x2g.weight.detach().numpy(),
            "weight_hh_l0": module.p2g.weight.detach().numpy(),
            "ln_gates_weight_l0": module.g_norm.weight.detach().numpy(),
            "ln_gates_bias_l0": module.g_norm.bias.detach().numpy(),
            "ln_cell_weight_l0": module.c_norm.weight.detach().numpy(),
            "ln_cell_bias_l0": module.c_norm.bias.detach().numpy()})
        layer.eval()
        x = torch.randn(20, 8, 64)
        with torch.no_grad():
            expected = module(x, None)[0]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                int8 = torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)
            errors["torch int8"].append(relative_error(int8(x, None)[0], expected))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                errors["torch bf16"].append(relative_error(module(x, None)[0], expected))
        for precision, key in (("int8", "ours int8"), ("bfloat16", "ours bf16")):
            got = torch.from_numpy(quantize(layer, precision)(x.numpy())[0])
            errors[key].append(relative_error(got, expected))
    median = {key: float(np.median(values)) for key, values in errors.items()}
    assert 0 < median["ours int8"] <= median["torch int8"], median
    assert 0 < median["ours bf16"] <= median["torch bf16"], median


def test_quantize_dynamic_is_torchs_followed_by_accelerate():
    torch.manual_seed(2)
    model = nn.Sequential(lt.LSTM(8, 16), nn.Linear(16, 4))  # an accelerated layer is quantized too
    x = torch.randn(6, 2, 8)
    ours = lt.quantize_dynamic(model)
    assert type(ours[0]) is lt.QuantizedLSTM
    assert type(ours[1]) is torch.ao.nn.quantized.dynamic.Linear
    assert type(model[0]) is lt.LSTM, "the original model is left as it was"
    reference_model = lt.accelerate(torch_int8(lt.restore(model)))
    lt.accelerate(model)
    np.testing.assert_array_equal(ours[0](x)[0].numpy(), reference_model[0](x)[0].numpy())
    with pytest.raises(ValueError, match="torch.qint8"):
        lt.quantize_dynamic(model, dtype=torch.float16)


def test_changed_int8_weights_are_seen():
    torch.manual_seed(3)
    a = lt.accelerate(torch_int8(nn.Sequential(nn.LSTM(5, 7))))
    b = lt.accelerate(torch_int8(nn.Sequential(nn.LSTM(5, 7))))
    x = torch.randn(4, 2, 5)
    before = b(x)[0]
    assert not torch.equal(a(x)[0], before)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b(x)[0], a(x)[0])


def test_what_the_int8_kernels_cannot_do_runs_torchs_forward():
    torch.manual_seed(4)
    model = nn.Sequential(nn.LSTM(5, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = torch.ao.quantization.quantize_dynamic(model, {nn.LSTM}, dtype=torch.float16)
    x = torch.randn(4, 2, 5)
    expected = half(x)[0]
    lt.accelerate(half)
    assert type(half[0]) is lt.QuantizedLSTM
    assert torch.equal(half[0](x)[0], expected), "float16 weights: torch's own kernels"
    int8 = lt.accelerate(torch_int8(model))
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([4, 2]))
    got, _ = int8(packed)
    assert isinstance(got, nn.utils.rnn.PackedSequence)
    unpacked = nn.utils.rnn.pad_packed_sequence(got)[0]
    assert_close(unpacked[:, 0].numpy(), int8(x[:, :1])[0][:, 0].numpy(), tol=1e-6, name="packed row 0")


# ----------------------------------------------------------------------------------
# bfloat16 autocast


def torchs_autocast_result(module, x):
    """What torch's own class returns under bfloat16 autocast, or None where its
    kernels refuse (oneDNN's bf16 LSTM needs AVX-512 BF16 hardware)."""
    torch_class = module._lstmfast_torch_class
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return torch_class.forward(module, x)
    except RuntimeError:
        return None


@pytest.mark.parametrize("make", [
    lambda: lt.LSTM(16, 32), lambda: lt.LSTM(16, 32, proj_size=8, num_layers=2),
    lambda: lt.GRU(16, 32, bidirectional=True), lambda: lt.RNN(16, 32, nonlinearity="relu")],
    ids=["lstm", "lstm-proj", "gru", "rnn"])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_bfloat16_autocast_returns_torchs_dtypes_within_bfloat16_error(make, input_dtype):
    torch.manual_seed(5)
    module = make()
    x = torch.randn(12, 3, 16).to(input_dtype).float()  # values bfloat16 can hold
    x_in = x.to(input_dtype)
    with torch.no_grad():
        exact = module(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = module(x_in)
    torchs = torchs_autocast_result(module, x_in)
    flat = lambda r: [r[0]] + (list(r[1]) if isinstance(r[1], tuple) else [r[1]])  # noqa: E731
    for g, e in zip(flat(got), flat(exact)):
        assert relative_error(g, e) <= 1e-2
    if torchs is not None:
        for g, t in zip(flat(got), flat(torchs)):
            assert g.dtype == t.dtype
            assert relative_error(g, t) <= 2e-2
    else:  # torch's kernels refuse on this CPU: the dtypes it gives where they run
        assert all(g.dtype == torch.bfloat16 for g in flat(got))
    assert sum(t is not None for t in [torchs]) or module.mode == "LSTM"


def test_bfloat16_autocast_sees_changed_weights_and_leaves_training_to_torch():
    torch.manual_seed(6)
    module = lt.RNN(4, 8)
    x = torch.randn(5, 2, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = module(x)[0]
        module.weight_hh_l0.mul_(0.5)
        after = module(x)[0]
        expected = nn.RNN.forward(module, x)[0]
    assert not torch.equal(before, after)
    assert relative_error(after, expected) <= 2e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)[0]
    assert out.requires_grad and out.grad_fn is not None  # torch's graph, for training


def test_packed_weights_stay_out_of_copies_and_saves(tmp_path):
    # The packed reduced weights are cached beside the module, not in it: copies,
    # torch.save and state_dicts carry only what torch's modules carry.
    torch.manual_seed(7)
    float_model = nn.Sequential(lt.LSTM(6, 10))
    int8_model = lt.quantize_dynamic(float_model)
    x = torch.randn(5, 2, 6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_out = float_model(x)[0]
    int8_out = int8_model(x)[0]
    for model, out, autocast in ((float_model, bf16_out, True), (int8_model, int8_out, False)):
        assert set(vars(model[0])) == set(vars(copy.deepcopy(model[0])))
        torch.save(model, tmp_path / "model.pt")
        loaded = torch.load(tmp_path / "model.pt", weights_only=False)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            assert torch.equal(loaded(x)[0], out)


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("with_hx", [False, True])
def test_int8_plain_calls_take_the_short_path_with_the_full_paths_results(kind, options, T, with_hx,
                                                                         monkeypatch):
    # A stream's frame through torch's int8 layer: the short path
    # (layers._plain_inference_forward) must give exactly what the full path gives.
    from lstmfast.torch import layers as lt_layers

    torch.manual_seed(1)
    layer = lt.accelerate(torch_int8(nn.Sequential(kind(12, 24, **options))))[0]
    N, D = 3, 2 if options.get("bidirectional") else 1
    LD = options.get("num_layers", 1) * D
    x = torch.randn(N, T, 12) if options.get("batch_first") else torch.randn(T, N, 12)
    hx = None
    if with_hx:
        hx = (torch.randn(LD, N, 24), torch.randn(LD, N, 24)) if kind is nn.LSTM else torch.randn(LD, N, 24)
    taken = []
    original = lt_layers._plain_inference_forward
    monkeypatch.setattr(lt_layers, "_plain_inference_forward",
                        lambda *a: taken.append(original(*a) is not None) or original(*a))
    with torch.no_grad():
        got = layer(x, hx)
        monkeypatch.setattr(lt_layers, "_plain_inference_forward", lambda *a: None)
        expected = layer(x, hx)
    assert taken == [True]
    flat = lambda r: [r[0]] + (list(r[1]) if isinstance(r[1], tuple) else [r[1]])  # noqa: E731
    for a, b in zip(flat(got), flat(expected)):
        assert a.shape == b.shape
        assert torch.equal(a, b)
