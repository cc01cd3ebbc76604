"""lstmfast.torch.GRU(linear_before_reset=False), the GRU of the original paper: the fused
kernels under autograd against the NumPy reference (whose oracles, ONNX Runtime and
Keras, are in reference/test_gru_reset_before_reference.py), and its loop of torch
ops, which serves where the kernels cannot, against the kernels."""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lstmfast  # noqa: E402
import lstmfast.torch as lt  # noqa: E402

from helpers import assert_close  # noqa: E402

CONFIGS = [dict(), dict(num_layers=2, bidirectional=True), dict(batch_first=True, bias=False),
           dict(num_layers=3, dropout=0.0, hidden_size=19)]


def numpy_twin(module, dtype):
    layer = lstmfast.GRU(module.input_size, module.hidden_size, num_layers=module.num_layers,
                         bias=module.bias, batch_first=module.batch_first,
                         bidirectional=module.bidirectional, dtype=dtype, backend="numpy",
                         linear_before_reset=False)
    layer.load_state_dict({k: v.detach().numpy() for k, v in module.state_dict().items()})
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: ",".join(o) or "plain")
def test_forward_and_gradients_match_the_reference(dtype, options):
    torch.manual_seed(0)
    options = {"hidden_size": 7, **options}
    module = lt.GRU(5, linear_before_reset=False, **options).to(dtype)
    x = torch.randn((3, 6, 5) if module.batch_first else (6, 3, 5), dtype=dtype, requires_grad=True)
    h0 = torch.randn(module.num_layers * (2 if module.bidirectional else 1), 3, module.hidden_size,
                     dtype=dtype, requires_grad=True)
    out, h_n = module(x, h0)
    grad_out, grad_h = torch.randn_like(out), torch.randn_like(h_n)
    ((out * grad_out).sum() + (h_n * grad_h).sum()).backward()
    twin = numpy_twin(module, "float32" if dtype == torch.float32 else "float64")
    twin.train()
    expected, eh = twin(x.detach().numpy(), h0.detach().numpy())
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert_close(out.detach().numpy(), expected, tol=tol, name="output")
    assert_close(h_n.detach().numpy(), eh, tol=tol, name="h_n")
    dx, dh0 = twin.backward(grad_out.numpy(), grad_h.numpy())
    assert_close(x.grad.numpy(), dx, tol=tol, name="grad x")
    assert_close(h0.grad.numpy(), dh0, tol=tol, name="grad h0")
    for name, p in module.named_parameters():
        assert_close(p.grad.numpy(), twin.grad[name], tol=tol, name=f"grad {name}")


def test_it_is_not_torchs_gru():
    torch.manual_seed(3)
    ours = lt.GRU(4, 6, linear_before_reset=False)
    torchs = torch.nn.GRU(4, 6)
    torchs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 4)
    with torch.no_grad():
        assert (ours(x)[0] - torchs(x)[0]).abs().max() > 1e-3


def test_the_torch_loop_computes_what_the_kernels_do():
    torch.manual_seed(1)
    module = lt.GRU(3, 4, num_layers=2, bidirectional=True, linear_before_reset=False).double()
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 2, 4]), enforce_sorted=False)
    for given in (x, x[:, 0], packed):
        with torch.no_grad():
            fused = module(given)
            loop = module._torch_forward(given, None)
        a, b = (fused[0].data, loop[0].data) if isinstance(given, type(packed)) else (fused[0], loop[0])
        assert_close(a.numpy(), b.numpy(), tol=1e-12, name="output")
        assert_close(fused[1].numpy(), loop[1].numpy(), tol=1e-12, name="h_n")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings on Python control flow
        traced = torch.jit.trace(module, (x,), check_trace=False)
        assert_close(traced(x)[0].numpy(), module(x)[0].numpy(), tol=1e-12, name="traced")
    with pytest.raises(TypeError, match="linear_before_reset=False.*cannot be scripted"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script's own notice
        torch.jit.script(module)


def test_regularizers_match_the_loop():
    torch.manual_seed(4)
    module = lt.GRU(3, 5, num_layers=2, linear_before_reset=False, recurrent_dropout=0.3,
                    zoneout=0.2).double().train()
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    rec = (torch.rand(2, 2, 5, dtype=torch.float64) > 0.3).double() / 0.7
    zone = ((torch.rand(2, 6, 2, 5) < 0.2).double(), None)
    given = {"recurrent_dropout_mask": rec, "zoneout_mask": zone}
    out, h_n = module(x, **given)
    (out.sum() + h_n.sum()).backward()
    fused_grad = x.grad.clone()
    x.grad = None
    loop_out, loop_h = module._torch_forward(x, None, given)
    (loop_out.sum() + loop_h.sum()).backward()
    assert_close(out.detach().numpy(), loop_out.detach().numpy(), tol=1e-10, name="output")
    assert_close(fused_grad.numpy(), x.grad.numpy(), tol=1e-10, name="grad x")


def test_first_and_second_derivatives_pass_gradcheck():
    torch.manual_seed(2)
    module = lt.GRU(3, 4, num_layers=2, linear_before_reset=False).double()
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: module(x)[0], (x,))
    # double backward differentiates the torch loop's graph (_torch_loop_stack)
    assert torch.autograd.gradgradcheck(lambda x: module(x)[0], (x,))


@pytest.mark.filterwarnings("ignore::DeprecationWarning",
                            "ignore::UserWarning")  # torch.ao's migration notes
def test_autocast_runs_the_loop_and_restore_keeps_it():
    torch.manual_seed(5)
    module = lt.GRU(3, 4, linear_before_reset=False)
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = module(x)[0]
        loop = module._torch_forward(x, None)[0]
    # torch's ops under autocast multiply in bfloat16: the loop's result to that precision
    assert_close(under.float().numpy(), loop.numpy(), tol=2e-2, check_dtype=False, name="autocast")
    model = torch.nn.Sequential(module)
    assert type(lt.restore(model)[0]) is lt.GRU  # torch has no class that computes it
    quantized = lt.quantize_dynamic(model)
    assert type(quantized[0]) is lt.GRU and not quantized[0].linear_before_reset


def test_bad_linear_before_reset_is_refused():
    with pytest.raises(TypeError, match="linear_before_reset should be of type bool"):
        lt.GRU(3, 4, linear_before_reset="no")
    assert "linear_before_reset=False" in repr(lt.GRU(3, 4, linear_before_reset=False))
    assert "linear_before_reset" not in repr(lt.GRU(3, 4))
