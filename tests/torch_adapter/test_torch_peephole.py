"""lstmfast.torch.PeepholeLSTM: the fused kernels under autograd against the NumPy
reference (whose oracles are in reference/test_peephole_reference.py), and its loop of
torch ops, which serves where the kernels cannot, against the kernels."""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lstmfast  # noqa: E402
import lstmfast.torch as lt  # noqa: E402

from helpers import assert_close  # noqa: E402

CONFIGS = [dict(), dict(num_layers=2, bidirectional=True), dict(proj_size=3, num_layers=2),
           dict(batch_first=True, bias=False)]


def numpy_twin(module, dtype):
    layer = lstmfast.LSTM(module.input_size, module.hidden_size, num_layers=module.num_layers,
                          bias=module.bias, batch_first=module.batch_first,
                          bidirectional=module.bidirectional, proj_size=module.proj_size,
                          peephole=True, dtype=dtype, backend="numpy")
    layer.load_state_dict({k: v.detach().numpy() for k, v in module.state_dict().items()})
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: ",".join(o) or "plain")
def test_forward_and_gradients_match_the_reference(dtype, options):
    torch.manual_seed(0)
    module = lt.PeepholeLSTM(5, 7, **options).to(dtype)
    names = [n for n, _ in module.named_parameters()]
    assert "weight_co_l0" in names and module.weight_ci_l0.shape == (7,)
    x = torch.randn((3, 6, 5) if module.batch_first else (6, 3, 5), dtype=dtype, requires_grad=True)
    out, (h_n, c_n) = module(x)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    np_dtype = "float32" if dtype == torch.float32 else "float64"
    twin = numpy_twin(module, np_dtype)
    twin.train()
    expected, (eh, ec) = twin(x.detach().numpy())
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert_close(out.detach().numpy(), expected, tol=tol, name="output")
    assert_close(h_n.detach().numpy(), eh, tol=tol, name="h_n")
    assert_close(c_n.detach().numpy(), ec, tol=tol, name="c_n")
    dx, _ = twin.backward(grad_out.numpy())
    assert_close(x.grad.numpy(), dx, tol=tol, name="grad x")
    for name, p in module.named_parameters():
        assert_close(p.grad.numpy(), twin.grad[name], tol=tol, name=f"grad {name}")


def test_the_torch_loop_computes_what_the_kernels_do():
    torch.manual_seed(1)
    module = lt.PeepholeLSTM(3, 4, num_layers=2, bidirectional=True).double()
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 2, 4]), enforce_sorted=False)
    for given in (x, x[:, 0], packed):
        with torch.no_grad():
            fused = module(given)
            loop = module._torch_forward(given, None)
        a, b = (fused[0].data, loop[0].data) if isinstance(given, type(packed)) else (fused[0], loop[0])
        assert_close(a.numpy(), b.numpy(), tol=1e-12, name="output")
        assert_close(fused[1][1].numpy(), loop[1][1].numpy(), tol=1e-12, name="c_n")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings on Python control flow
        traced = torch.jit.trace(module, (x,), check_trace=False)
        assert_close(traced(x)[0].numpy(), module(x)[0].numpy(), tol=1e-12, name="traced")


def test_first_and_second_derivatives_pass_gradcheck():
    torch.manual_seed(2)
    module = lt.PeepholeLSTM(3, 4, num_layers=2, proj_size=2).double()
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: module(x)[0], (x,))
    # double backward differentiates the torch loop's graph (_torch_loop_stack)
    assert torch.autograd.gradgradcheck(lambda x: module(x)[0], (x,))


def test_state_dict_is_the_numpy_layers_and_scripting_says_why_not():
    module = lt.PeepholeLSTM(4, 6)
    layer = lstmfast.LSTM(4, 6, peephole=True)
    layer.load_state_dict(module.state_dict())
    assert list(layer.state_dict()) == list(module.state_dict())
    with pytest.raises(TypeError, match="torch has no peephole LSTM"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation warning
        torch.jit.script(module)
    assert type(lt.accelerate(torch.nn.Sequential(module))[0]) is lt.PeepholeLSTM
