"""Recurrent dropout and zoneout in lstmfast.torch: the kernels under autograd against
the NumPy reference with the same masks (whose oracles are in
reference/test_regularizers_reference.py), the torch loop that serves where the kernels cannot
against the kernels, and AWD-LSTM / fastai's weight dropout on W_hh."""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lstmfast  # noqa: E402
import lstmfast.torch as lt  # noqa: E402

from helpers import assert_close  # noqa: E402

CLASSES = {"LSTM": (lt.LSTM, lstmfast.LSTM), "GRU": (lt.GRU, lstmfast.GRU),
           "RNN": (lt.RNN, lstmfast.RNN)}
CONFIGS = [dict(), dict(num_layers=2, bidirectional=True), dict(batch_first=True)]


def given_masks(module, T, N, generator, p=0.3, zoneout=(0.2, 0.25)):
    LD = module.num_layers * (2 if module.bidirectional else 1)
    H = module.hidden_size
    H_out = module.proj_size if getattr(module, "proj_size", 0) else H
    dtype = module.weight_ih_l0.dtype
    rec = (torch.rand(LD, N, H_out, generator=generator, dtype=dtype) >= p).to(dtype) / (1 - p)
    m_h = (torch.rand(LD, T, N, H_out, generator=generator, dtype=dtype) < zoneout[0]).to(dtype)
    m_c = (torch.rand(LD, T, N, H, generator=generator, dtype=dtype) < zoneout[1]).to(dtype) \
        if isinstance(module, torch.nn.LSTM) else None
    return rec, (m_h, m_c)


@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: ",".join(o) or "plain")
def test_given_masks_match_the_reference(kind, dtype, options):
    torch_cls, numpy_cls = CLASSES[kind]
    torch.manual_seed(0)
    module = torch_cls(5, 7, recurrent_dropout=0.3, zoneout=0.2, **options).to(dtype)
    T, N = 6, 3
    x = torch.randn((N, T, 5) if module.batch_first else (T, N, 5), dtype=dtype, requires_grad=True)
    rec, zone = given_masks(module, T, N, torch.Generator().manual_seed(1))
    out, state = module(x, recurrent_dropout_mask=rec, zoneout_mask=zone)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()

    np_dtype = "float32" if dtype == torch.float32 else "float64"
    twin = numpy_cls(5, 7, dtype=np_dtype, backend="numpy", recurrent_dropout=0.3,
                     zoneout=0.2, **options)
    twin.load_state_dict({k: v.detach().numpy() for k, v in module.state_dict().items()})

    def caller_layout(m):  # (LD, T, N, width) time-major -> the numpy layer's caller layout
        return None if m is None else (m.numpy().transpose(0, 2, 1, 3) if module.batch_first
                                       else m.numpy())

    expected, _ = twin(x.detach().numpy(), recurrent_dropout_mask=rec.numpy(),
                       zoneout_mask=tuple(caller_layout(m) for m in zone))
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert_close(out.detach().numpy(), expected, tol=tol, name="output")
    dx, _ = twin.backward(grad_out.numpy())
    assert_close(x.grad.numpy(), dx, tol=tol, name="grad x")
    for name, p in module.named_parameters():
        assert_close(p.grad.numpy(), twin.grad[name], tol=tol, name=f"grad {name}")


@pytest.mark.parametrize("kind", CLASSES)
def test_the_torch_loop_computes_what_the_kernels_do(kind):
    torch_cls, _ = CLASSES[kind]
    torch.manual_seed(1)
    module = torch_cls(3, 4, num_layers=2, bidirectional=True, recurrent_dropout=0.3,
                       zoneout=0.2).double()
    x = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 2, 4]), enforce_sorted=False)
    for given in (x, x[:, 0], packed):
        for train in (True, False):
            module.train(train)
            torch.manual_seed(2)
            fused = torch.utils._pytree.tree_leaves(module(given))
            torch.manual_seed(2)
            loop = torch.utils._pytree.tree_leaves(module._torch_forward(given, None))
            for a, b in zip(fused, loop):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    module.train()
    rec, zone = given_masks(module, 5, 3, torch.Generator().manual_seed(3))
    masks = {"recurrent_dropout_mask": rec, "zoneout_mask": zone}
    fused = module(packed, **masks)
    loop = module._torch_forward(packed, None, masks)
    for a, b in zip(torch.utils._pytree.tree_leaves(fused), torch.utils._pytree.tree_leaves(loop)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradcheck_and_double_backward_with_masks():
    torch.manual_seed(3)
    module = lt.LSTM(2, 3, num_layers=2, recurrent_dropout=0.3, zoneout=(0.2, 0.3)).double()
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    rec, zone = given_masks(module, 4, 2, torch.Generator().manual_seed(4))

    def f(x):
        out, (h, c) = module(x, recurrent_dropout_mask=rec, zoneout_mask=zone)
        return out, h, c

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_masks_change_training_only_and_draw_from_torch_seed():
    module = lt.LSTM(3, 5, recurrent_dropout=0.5, zoneout=0.3)
    plain = lt.LSTM(3, 5)
    plain.load_state_dict(module.state_dict())
    x = torch.randn(6, 2, 3)
    torch.manual_seed(5)
    first = module(x)[0]
    torch.manual_seed(5)
    torch.testing.assert_close(module(x)[0], first, rtol=0, atol=0)
    assert not torch.allclose(first, plain(x)[0])
    module.eval()
    plain.eval()
    # eval: no recurrent dropout; zoneout's expectation, h = 0.3 h_prev + 0.7 h~
    with torch.no_grad():
        ones = torch.ones(1, 6, 2, 5)
        module.train()
        expected = module(x, recurrent_dropout_mask=torch.ones(1, 2, 5),
                          zoneout_mask=(0.3 * ones, 0.3 * ones))[0]
        module.eval()
        torch.testing.assert_close(module(x)[0], expected, rtol=1e-6, atol=1e-6)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="recurrent_dropout"):
        lt.LSTM(3, 4, recurrent_dropout=1.0)
    with pytest.raises(ValueError, match="p_c must be 0"):
        lt.GRU(3, 4, zoneout=(0.1, 0.2))
    module = lt.LSTM(3, 4)
    x = torch.randn(6, 2, 3)
    with pytest.raises(ValueError, match=r"recurrent_dropout_mask: expected a tensor of shape \(1, 2, 4\)"):
        module(x, recurrent_dropout_mask=torch.ones(1, 3, 4))
    module.eval()
    with pytest.raises(ValueError, match="eval mode"):
        module(x, recurrent_dropout_mask=torch.ones(1, 2, 4))
    assert "recurrent_dropout=0.2" in repr(lt.GRU(3, 4, recurrent_dropout=0.2))


class WeightDropout(torch.nn.Module):
    """fastai's WeightDropout (AWD-LSTM's WeightDrop), as written there: the raw W_hh is a
    parameter of the wrapper, and before each forward the wrapped module's weight_hh_l0
    attribute is replaced by a dropped-out copy."""

    def __init__(self, module, weight_p, layer_names=("weight_hh_l0",)):
        super().__init__()
        self.module, self.weight_p, self.layer_names = module, weight_p, layer_names
        for layer in self.layer_names:
            w = getattr(self.module, layer)
            delattr(self.module, layer)
            self.register_parameter(f"{layer}_raw", torch.nn.Parameter(w.data))
            setattr(self.module, layer, torch.nn.functional.dropout(w.data, p=self.weight_p,
                                                                    training=False))
            if isinstance(self.module, torch.nn.RNNBase):
                self.module.flatten_parameters = lambda *args, **kwargs: None

    def _setweights(self):
        for layer in self.layer_names:
            raw_w = getattr(self, f"{layer}_raw")
            setattr(self.module, layer, torch.nn.functional.dropout(raw_w, p=self.weight_p,
                                                                    training=self.training))

    def forward(self, *args):
        self._setweights()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)  # torch's non-contiguous weights
            return self.module(*args)


def test_weight_dropout_of_fastai_replaces_weight_hh_before_each_forward():
    torch.manual_seed(6)
    theirs = WeightDropout(torch.nn.LSTM(4, 5), 0.5)
    ours = WeightDropout(lt.LSTM(4, 5), 0.5)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(7, 3, 4)
    results = []
    for model in (theirs, ours):
        torch.manual_seed(7)  # the same dropout of W_hh in both
        outs = [model(x)[0] for _ in range(2)]  # a new W_hh each forward
        (outs[0].sum() + outs[1].square().sum()).backward()
        results.append(outs + [p.grad.clone() for p in model.parameters()])
    assert not torch.allclose(results[0][0], results[0][1])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ours.weight_hh_l0_raw.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_zone_out_as_espnet_zoneout_cell(kind):
    """A decoder stepping the cell in a loop (Tacotron 2): ESPnet's ZoneOutCell around
    torch's cell, with the same masks, forward and every gradient; and eval's expectation."""
    torch.manual_seed(8)
    ours = getattr(lt, kind)(4, 5, zoneout=(0.2, 0.3) if kind == "LSTMCell" else 0.2).double()
    theirs = getattr(torch.nn, kind)(4, 5).double()
    theirs.load_state_dict(ours.state_dict())
    is_lstm = kind == "LSTMCell"
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    generator = torch.Generator().manual_seed(9)
    masks = [tuple((torch.rand(3, 5, generator=generator, dtype=torch.float64) < 0.25).double()
                   if i == 0 or is_lstm else None for i in range(2)) for _ in range(6)]

    def run(cell, espnet):
        state = None
        outputs = []
        for t in range(6):
            if espnet:
                old = state if state is not None else (
                    (x.new_zeros(3, 5),) * 2 if is_lstm else x.new_zeros(3, 5))
                new = cell(x[t], state)
                if is_lstm:
                    state = tuple(m * o + (1 - m) * n for m, o, n in zip(masks[t], old, new))
                else:
                    state = masks[t][0] * old + (1 - masks[t][0]) * new
            else:
                state = cell(x[t], state, zoneout_mask=masks[t])
            outputs.append(state[0] if is_lstm else state)
        return torch.stack(outputs)

    results = []
    for cell, espnet in ((ours, False), (theirs, True)):
        x.grad = None
        cell.zero_grad()
        out = run(cell, espnet)
        out.square().sum().backward()
        results.append([out.detach(), x.grad.clone()] + [p.grad.clone() for p in cell.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    ours.eval()
    with torch.no_grad():
        h = torch.randn(3, 5, dtype=torch.float64)
        state = (h, torch.randn(3, 5, dtype=torch.float64)) if is_lstm else h
        new = theirs(x[0], state)
        got = ours(x[0], state)
        if is_lstm:
            for g, n, o, p in zip(got, new, state, ours.zoneout):
                torch.testing.assert_close(g, p * o + (1 - p) * n)
        else:
            torch.testing.assert_close(got, 0.2 * state + 0.8 * new)


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_torch_cells_recurrent_dropout_matches_the_numpy_cells(kind):
    torch.manual_seed(10)
    ours = getattr(lt, kind)(3, 4, recurrent_dropout=0.4).double()
    twin = getattr(lstmfast, kind)(3, 4, dtype="float64", backend="numpy", recurrent_dropout=0.4)
    twin.load_state_dict({k: v.detach().numpy() for k, v in ours.state_dict().items()})
    is_lstm = kind == "LSTMCell"
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 4, dtype=torch.float64)
    mask = (torch.rand(2, 4, dtype=torch.float64) >= 0.4).double() / 0.6
    got = ours(x, (h, c) if is_lstm else h, recurrent_dropout_mask=mask)
    out = got[0] if is_lstm else got
    out.sum().backward()
    expected = twin(x.detach().numpy(), (h.detach().numpy(), c.numpy()) if is_lstm else h.detach().numpy(),
                    recurrent_dropout_mask=mask.numpy())
    assert_close(out.detach().numpy(), expected[0] if is_lstm else expected, tol=1e-10, name="h1")
    back = twin.backward(np.ones((2, 4)), np.zeros((2, 4))) if is_lstm else twin.backward(np.ones((2, 4)))
    assert_close(x.grad.numpy(), back[0], tol=1e-10, name="grad x")
    assert_close(h.grad.numpy(), back[1][0] if is_lstm else back[1], tol=1e-10, name="grad h")
    for name, p in ours.named_parameters():
        assert_close(p.grad.numpy(), twin.grad[name], tol=1e-10, name=name)
    first = ours(x, (h, c) if is_lstm else h)
    again = ours(x, (h, c) if is_lstm else h)
    torch.testing.assert_close(first, again, rtol=0, atol=0)  # the sequence's mask is kept
    ours.reset_recurrent_dropout_mask()
    assert ours._recurrent_dropout_mask is None


@pytest.mark.parametrize("options", [dict(), dict(num_layers=2, bidirectional=True, proj_size=3)],
                         ids=["plain", "layers_projection"])
def test_peephole_lstm_with_both_regularizers(options):
    """PeepholeLSTM with given masks: the kernels against lstmfast.LSTM(peephole=True) of
    the reference backend, and against its torch loop (double backward's graph)."""
    torch.manual_seed(11)
    module = lt.PeepholeLSTM(5, 7, recurrent_dropout=0.3, zoneout=(0.2, 0.25), **options).double()
    T, N = 6, 3
    x = torch.randn(T, N, 5, dtype=torch.float64, requires_grad=True)
    rec, zone = given_masks(module, T, N, torch.Generator().manual_seed(12))
    masks = {"recurrent_dropout_mask": rec, "zoneout_mask": zone}
    out, (h, c) = module(x, **masks)
    loop, (lh, lc) = module._torch_forward(x, None, masks)
    for a, b in ((out, loop), (h, lh), (c, lc)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    twin = lstmfast.LSTM(5, 7, peephole=True, dtype="float64", backend="numpy", **options)
    twin.load_state_dict({k: v.detach().numpy() for k, v in module.state_dict().items()})
    expected, _ = twin(x.detach().numpy(), recurrent_dropout_mask=rec.numpy(),
                       zoneout_mask=tuple(m.numpy() for m in zone))
    assert_close(out.detach().numpy(), expected, tol=1e-10, name="output")
    dx, _ = twin.backward(grad_out.numpy())
    assert_close(x.grad.numpy(), dx, tol=1e-10, name="grad x")
    for name, p in module.named_parameters():
        assert_close(p.grad.numpy(), twin.grad[name], tol=1e-10, name=f"grad {name}")
