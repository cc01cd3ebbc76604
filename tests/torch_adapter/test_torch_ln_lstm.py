"""lstmfast.torch.LayerNormLSTM and the accelerated torchaudio _CustomLSTM: the fused
kernels under autograd against the NumPy reference (whose oracles are in
reference/test_ln_lstm_reference.py), and the loops of torch ops that serve where the
kernels cannot, against the kernels."""

import sys
import types
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lstmfast  # noqa: E402
import lstmfast.torch as lt  # noqa: E402
from lstmfast.torch.variants import _TorchaudioLSTMForward  # noqa: E402

from helpers import assert_close, torchaudio_custom_lstm  # noqa: E402
from lstmfast.oracles import CustomLSTMLoop  # noqa: E402

CONFIGS = [dict(), dict(num_layers=2, bidirectional=True), dict(batch_first=True, layer_norm_eps=1e-3)]


def perturbed(module, seed=0):
    """The layer norms moved away from their identity start."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("ln_") or "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module


def numpy_twin(module, dtype):
    layer = lstmfast.LayerNormLSTM(module.input_size, module.hidden_size, num_layers=module.num_layers,
                                   bidirectional=module.bidirectional, batch_first=module.batch_first,
                                   layer_norm_eps=module.layer_norm_eps, dtype=dtype, backend="numpy")
    layer.load_state_dict({k: v.detach().numpy() for k, v in module.state_dict().items()})
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: ",".join(o) or "plain")
def test_forward_and_gradients_match_the_reference(dtype, options):
    torch.manual_seed(0)
    module = perturbed(lt.LayerNormLSTM(5, 7, **options).to(dtype))
    x = torch.randn((3, 6, 5) if module.batch_first else (6, 3, 5), dtype=dtype, requires_grad=True)
    out, (h_n, c_n) = module(x)
    grad_out, grad_c = torch.randn_like(out), torch.randn_like(c_n)
    ((out * grad_out).sum() + (c_n * grad_c).sum()).backward()
    twin = numpy_twin(module, "float64")  # the exact result: see kernels/test_ln_lstm.py
    expected, (eh, ec) = twin(x.detach().double().numpy())
    tol = 1e-5 if dtype == torch.float32 else 1e-10  # float32 against float64: dtypes differ on purpose
    assert_close(out.detach().numpy(), expected, tol=tol, name="output", check_dtype=False)
    assert_close(h_n.detach().numpy(), eh, tol=tol, name="h_n", check_dtype=False)
    assert_close(c_n.detach().numpy(), ec, tol=tol, name="c_n", check_dtype=False)
    dx, _ = twin.backward(grad_out.double().numpy(), (None, grad_c.double().numpy()))
    assert_close(x.grad.numpy(), dx, tol=tol, name="grad x", check_dtype=False)
    for name, p in module.named_parameters():
        assert_close(p.grad.numpy(), twin.grad[name], tol=tol, name=f"grad {name}", check_dtype=False)


def test_the_torch_loop_computes_what_the_kernels_do():
    torch.manual_seed(1)
    module = perturbed(lt.LayerNormLSTM(3, 4, num_layers=2, bidirectional=True).double())
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 2, 4]), enforce_sorted=False)
    for given in (x, x[:, 0], packed):
        fused, loop = module(given), module._torch_forward(given, None)
        for a, b in zip(torch.utils._pytree.tree_leaves(fused), torch.utils._pytree.tree_leaves(loop)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradcheck_and_double_backward():
    torch.manual_seed(3)
    module = perturbed(lt.LayerNormLSTM(2, 3, num_layers=2, bidirectional=True).double())
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)

    def f(x, h0, c0):
        out, (h, c) = module(x, (h0, c0))
        return out, h, c

    assert torch.autograd.gradcheck(f, (x, h0, c0))
    assert torch.autograd.gradgradcheck(f, (x, h0, c0))


def test_names_repr_state_dict_and_scripting():
    module = lt.LayerNormLSTM(3, 4, num_layers=2)
    names = [n for n, _ in module.named_parameters()]
    assert names[:4] == ["weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1"]
    assert "ln_gates_weight_l1" in names and module.ln_cell_bias_l0.shape == (4,)
    assert repr(module) == "LayerNormLSTM(3, 4, num_layers=2)"
    layer = lstmfast.LayerNormLSTM(3, 4, num_layers=2)
    layer.load_state_dict(module.state_dict())
    assert sorted(layer.state_dict()) == sorted(module.state_dict())
    with pytest.raises(ValueError, match="layer_norm_eps"):
        lt.LayerNormLSTM(3, 4, layer_norm_eps=0)
    with pytest.raises(TypeError, match="torch has no layer-normalized LSTM"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation warning
        torch.jit.script(module)


def test_accelerate_swaps_torchaudio_custom_lstm_modules(monkeypatch):
    rnnt = types.ModuleType("torchaudio.models.rnnt")
    rnnt._CustomLSTM = CustomLSTMLoop  # torchaudio's code transcribed: a stand-in for it
    monkeypatch.setitem(sys.modules, "torchaudio.models.rnnt", rnnt)
    torch.manual_seed(2)
    model = torch.nn.ModuleList([perturbed(CustomLSTMLoop(4, 6, layer_norm_epsilon=1e-3)),
                                 CustomLSTMLoop(6, 6)])
    x = torch.randn(7, 3, 4, requires_grad=True)

    def run(model):
        x.grad = None
        model.zero_grad()
        out, state = model[0](x, None)
        out, state = model[1](out, state)
        (out.sum() + state[1].sum()).backward()
        return [out.detach(), state[0].detach(), x.grad.clone()] + [p.grad.clone() for p in model.parameters()]

    expected = run(model)
    lt.accelerate(model)
    assert all(isinstance(m, _TorchaudioLSTMForward) for m in model)
    got = run(model)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    lt.restore(model)
    assert all(type(m) is CustomLSTMLoop for m in model)


def test_accelerate_on_a_torchaudio_emformer_rnnt_predictor():
    custom_lstm, why = torchaudio_custom_lstm()
    if custom_lstm is None:
        pytest.skip(why)
    from torchaudio.models import emformer_rnnt_model

    torch.manual_seed(0)
    model = emformer_rnnt_model(
        input_dim=16, encoding_dim=32, num_symbols=20, segment_length=4, right_context_length=0,
        time_reduction_input_dim=8, time_reduction_stride=2, transformer_num_heads=2,
        transformer_ffn_dim=16, transformer_num_layers=1, transformer_dropout=0.0,
        transformer_activation="relu", transformer_left_context_length=4,
        transformer_max_memory_size=0, transformer_weight_init_scale_strategy="depthwise",
        transformer_tanh_on_mem=False, symbol_embedding_dim=12, num_lstm_layers=3,
        lstm_layer_norm=True, lstm_layer_norm_epsilon=1e-3, lstm_dropout=0.0).eval()
    targets = torch.randint(0, 20, (2, 5))
    lengths = torch.tensor([5, 3])
    with torch.no_grad():
        expected = model.predict(targets, lengths, None)
        lt.accelerate(model)
        got = model.predict(targets, lengths, None)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
