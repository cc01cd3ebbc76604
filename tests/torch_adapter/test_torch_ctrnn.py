"""lstmfast.torch.CTRNN: the fused kernels under autograd against the NumPy reference
(whose oracles are in reference/test_ctrnn_reference.py), and its loop of torch ops,
which serves where the kernels cannot, against the kernels."""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lstmfast  # noqa: E402
import lstmfast.torch as lt  # noqa: E402

from helpers import assert_close  # noqa: E402

CONFIGS = [dict(), dict(num_layers=2, bidirectional=True), dict(leak="inside", nonlinearity="tanh"),
           dict(batch_first=True, bias=False, leak="inside")]


def numpy_twin(module, dtype):
    layer = lstmfast.CTRNN(module.input_size, module.hidden_size, num_layers=module.num_layers,
                           nonlinearity=module.nonlinearity, alpha=module.alpha, leak=module.leak,
                           bias=module.bias, batch_first=module.batch_first,
                           bidirectional=module.bidirectional, dtype=dtype, backend="numpy")
    layer.load_state_dict({k: v.detach().numpy() for k, v in module.state_dict().items()})
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: ",".join(o) or "plain")
def test_forward_and_gradients_match_the_reference(dtype, options):
    torch.manual_seed(0)
    module = lt.CTRNN(5, 7, alpha=0.25, **options).to(dtype)
    assert [n for n, _ in module.named_parameters()] == \
        [n for n, _ in torch.nn.RNN(5, 7, **{k: v for k, v in options.items() if k in (
            "num_layers", "bidirectional", "batch_first", "bias")}).named_parameters()]
    T, N = 6, 3
    x = torch.randn((N, T, 5) if module.batch_first else (T, N, 5), dtype=dtype, requires_grad=True)
    LD = module.num_layers * (2 if module.bidirectional else 1)
    noise = 0.1 * torch.randn(LD, T, N, 7, dtype=dtype)
    out, h_n = module(x, noise=noise)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    twin = numpy_twin(module, "float32" if dtype == torch.float32 else "float64")
    given = noise.numpy().transpose(0, 2, 1, 3) if module.batch_first else noise.numpy()
    expected, eh = twin(x.detach().numpy(), noise=given)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert_close(out.detach().numpy(), expected, tol=tol, name="output")
    assert_close(h_n.detach().numpy(), eh, tol=tol, name="h_n")
    dx, _ = twin.backward(grad_out.numpy())
    assert_close(x.grad.numpy(), dx, tol=tol, name="grad x")
    for name, p in module.named_parameters():
        assert_close(p.grad.numpy(), twin.grad[name], tol=tol, name=f"grad {name}")


def test_the_torch_loop_computes_what_the_kernels_do():
    torch.manual_seed(1)
    module = lt.CTRNN(3, 4, num_layers=2, bidirectional=True, alpha=0.3, noise_std=0.2).double()
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 2, 4]), enforce_sorted=False)
    for given in (x, x[:, 0], packed):
        for train in (True, False):
            module.train(train)
            torch.manual_seed(2)
            fused = module(given)
            torch.manual_seed(2)
            loop = module._torch_forward(given, None)
            for a, b in zip(torch.utils._pytree.tree_leaves(fused), torch.utils._pytree.tree_leaves(loop)):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    noise = torch.randn(4, 5, 3, 4, dtype=torch.float64)  # given: rows in the caller's order
    for a, b in zip(torch.utils._pytree.tree_leaves(module(packed, noise=noise)),
                    torch.utils._pytree.tree_leaves(module._torch_forward(packed, None, noise))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradcheck_and_double_backward():
    torch.manual_seed(3)
    module = lt.CTRNN(2, 3, num_layers=2, alpha=0.4, leak="inside", nonlinearity="tanh").double()
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    noise = 0.1 * torch.randn(2, 4, 2, 3, dtype=torch.float64)

    def f(x, h0):
        out, h = module(x, h0, noise=noise)
        return out, h

    assert torch.autograd.gradcheck(f, (x, h0))
    assert torch.autograd.gradgradcheck(f, (x, h0))


def test_noise_follows_torch_seed_and_stays_in_eval():
    module = lt.CTRNN(3, 4, alpha=0.5, noise_std=0.3)
    x = torch.randn(6, 2, 3)
    torch.manual_seed(5)
    first = module(x)[0]
    torch.manual_seed(5)
    torch.testing.assert_close(module(x)[0], first, rtol=0, atol=0)
    assert not torch.allclose(module(x)[0], first)
    quiet = module(x, noise=torch.zeros(1, 6, 2, 4))[0]
    module.eval()
    assert not torch.allclose(module(x)[0], quiet)
    module.noise_std = 0.0
    torch.testing.assert_close(module(x)[0], quiet, rtol=0, atol=0)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="alpha"):
        lt.CTRNN(3, 4, alpha=0.0)
    with pytest.raises(ValueError, match="leak"):
        lt.CTRNN(3, 4, leak="middle")
    with pytest.raises(ValueError, match="noise_std"):
        lt.CTRNN(3, 4, noise_std=-0.1)
    module = lt.CTRNN(3, 4)
    with pytest.raises(ValueError, match=r"noise: expected a tensor of shape \(1, 6, 2, 4\)"):
        module(torch.randn(6, 2, 3), noise=torch.zeros(1, 6, 3, 4))
    with pytest.raises(TypeError, match="torch has no CTRNN"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation warning
        torch.jit.script(module)


def test_state_dict_round_trips_with_nn_rnn_and_the_numpy_layer():
    torch.manual_seed(4)
    rnn = torch.nn.RNN(3, 5, nonlinearity="relu")
    module = lt.CTRNN(3, 5, alpha=1.0)
    module.load_state_dict(rnn.state_dict())
    x = torch.randn(7, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(module(x)[0], rnn(x)[0], rtol=1e-5, atol=1e-6)
    layer = lstmfast.CTRNN(3, 5, alpha=1.0)
    layer.load_state_dict({k: v.numpy() for k, v in module.state_dict().items()})
    np.testing.assert_allclose(layer(x.numpy())[0], rnn(x)[0].detach().numpy(), rtol=1e-5, atol=1e-6)
