"""Parity with torch.nn: outputs, final states and every gradient.

Our layers load the torch module's state_dict, run the same input, and our
``backward`` is compared with torch autograd driven by the same random upstream
gradients (including at padded positions, which must be ignored). Tolerance 1e-5
(float32) / 1e-10 (float64) relative to the largest magnitude.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

import lstmfast  # noqa: E402
from helpers import assert_close  # noqa: E402

# torch's own notice that it falls back from oneDNN for projections, not ours
pytestmark = pytest.mark.filterwarnings(
    "ignore:LSTM with projections is not supported with oneDNN:UserWarning")

DTYPES = ["float32", "float64"]
TORCH_DTYPE = {"float32": torch.float32, "float64": torch.float64}


def case(kind, T=5, N=3, I=4, H=6, *, unbatched=False, h0=False, lengths=None, **options):
    name = [kind, f"T{T}N{N}I{I}H{H}"]
    name += [k if v is True else f"{k}={v}" for k, v in options.items()]
    name += (["unbatched"] if unbatched else []) + (["h0"] if h0 else [])
    name += [f"lengths={'-'.join(map(str, lengths))}"] if lengths is not None else []
    spec = dict(kind=kind, T=T, N=N, I=I, H=H, unbatched=unbatched, h0=h0, lengths=lengths,
                options=options)
    return pytest.param(spec, id=",".join(name))


LAYER_CASES = [
    case("LSTM"),
    case("LSTM", proj_size=3, num_layers=2, bidirectional=True),
    case("LSTM", num_layers=3, batch_first=True, h0=True),
    case("LSTM", T=6, N=4, bias=False, bidirectional=True, lengths=[3, 6, 1, 4]),
    case("LSTM", T=5, N=4, I=3, H=5, proj_size=2, num_layers=2, bidirectional=True,
         batch_first=True, h0=True, lengths=[2, 4, 1, 3]),
    case("LSTM", unbatched=True, h0=True, proj_size=4),
    case("LSTM", unbatched=True, bidirectional=True, num_layers=2),
    case("LSTM", T=1, N=1, I=1, H=1),
    case("LSTM", T=1, N=1, I=1, H=1, bidirectional=True, h0=True, lengths=[1]),
    case("GRU"),
    case("GRU", num_layers=3, bidirectional=True, h0=True, lengths=[5, 2, 4]),
    case("GRU", bias=False, batch_first=True, num_layers=2),
    case("GRU", unbatched=True, h0=True, bidirectional=True),
    case("GRU", T=1, N=1, I=1, H=1, h0=True),
    case("RNN_TANH"),
    case("RNN_TANH", num_layers=2, bidirectional=True, lengths=[1, 5, 3], batch_first=True),
    case("RNN_TANH", unbatched=True, h0=True, bias=False),
    case("RNN_TANH", T=1, N=1, I=1, H=1, num_layers=3),
    case("RNN_RELU"),
    case("RNN_RELU", num_layers=3, batch_first=True, bias=False, h0=True),
    case("RNN_RELU", N=4, bidirectional=True, lengths=[4, 2, 5, 1]),
]


def make_layers(kind, options, dtype, backend):
    """(torch module, our layer with the torch module's weights)."""
    options = dict(options)
    I, H = options.pop("I"), options.pop("H")
    tdtype = TORCH_DTYPE[dtype]
    if kind.startswith("RNN_"):
        nonlinearity = kind[4:].lower()
        tmod = torch.nn.RNN(I, H, nonlinearity=nonlinearity, dtype=tdtype, **options)
        ours = lstmfast.RNN(I, H, nonlinearity=nonlinearity, dtype=dtype, backend=backend,
                            **options)
    else:
        tmod = getattr(torch.nn, kind)(I, H, dtype=tdtype, **options)
        ours = getattr(lstmfast, kind)(I, H, dtype=dtype, backend=backend, **options)
    ours.load_state_dict(tmod.state_dict())
    return tmod, ours


def t(a, requires_grad=False):
    return torch.tensor(a, requires_grad=requires_grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", LAYER_CASES)
def test_layer_matches_torch(spec, dtype, backend):
    kind, T, N, I, H = (spec[k] for k in ("kind", "T", "N", "I", "H"))
    options = spec["options"]
    lstm = kind == "LSTM"
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    tmod, ours = make_layers(kind, dict(options, I=I, H=H), dtype, backend)
    batch_first = options.get("batch_first", False)
    D = 2 if options.get("bidirectional", False) else 1
    LD = D * options.get("num_layers", 1)
    H_out = options.get("proj_size", 0) or H
    lead = () if spec["unbatched"] else ((N, T) if batch_first else (T, N))
    state_lead = (LD,) if spec["unbatched"] else (LD, N)

    def randn(*shape):
        return rng.standard_normal(shape).astype(dtype)

    x = randn(*(lead or (T,)), I)
    h0 = randn(*state_lead, H_out) if spec["h0"] else np.zeros(state_lead + (H_out,), dtype)
    c0 = randn(*state_lead, H) if spec["h0"] else np.zeros(state_lead + (H,), dtype)
    g_out = randn(*(lead or (T,)), D * H_out)
    g_h = randn(*state_lead, H_out)
    g_c = randn(*state_lead, H)
    lengths = spec["lengths"]

    # torch: autograd through (packed) sequences, zero h0/c0 made explicit to get their grads
    tx, th0, tc0 = t(x, True), t(h0, True), t(c0, True)
    thx = (th0, tc0) if lstm else th0
    if lengths is None:
        t_out, t_hn = tmod(tx, thx)
    else:
        packed = pack_padded_sequence(tx, torch.tensor(lengths), batch_first=batch_first,
                                      enforce_sorted=False)
        t_out, t_hn = tmod(packed, thx)
        t_out, _ = pad_packed_sequence(t_out, batch_first=batch_first, total_length=T)
    if lstm:
        t_hn, t_cn = t_hn
    loss = (t_out * t(g_out)).sum() + (t_hn * t(g_h)).sum()
    if lstm:
        loss = loss + (t_cn * t(g_c)).sum()
    loss.backward()

    # ours
    hx = ((h0, c0) if lstm else h0) if spec["h0"] else None
    out, hn = ours(x, hx, lengths=lengths)
    if lstm:
        hn, cn = hn
        dx, (dh0, dc0) = ours.backward(g_out, (g_h, g_c))
    else:
        dx, dh0 = ours.backward(g_out, g_h)

    assert_close(out, t_out.detach().numpy(), name="output")
    assert_close(hn, t_hn.detach().numpy(), name="h_n")
    assert_close(dx, tx.grad.numpy(), name="grad x")
    assert_close(dh0, th0.grad.numpy(), name="grad h0")
    if lstm:
        assert_close(cn, t_cn.detach().numpy(), name="c_n")
        assert_close(dc0, tc0.grad.numpy(), name="grad c0")
    for name, param in tmod.named_parameters():
        assert_close(ours.grad[name], param.grad.numpy(), name=f"grad {name}")
    assert list(ours.grad) == [name for name, _ in tmod.named_parameters()]


CELL_CASES = [
    case(kind, N=N, I=I, H=H, unbatched=unbatched, h0=h0, **options)
    for kind in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
    for (N, I, H, unbatched, h0, options) in [
        (3, 4, 5, False, True, {}),
        (3, 4, 5, False, False, {"bias": False}),
        (1, 3, 4, True, True, {}),
        (1, 1, 1, False, True, {}),
    ]
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", CELL_CASES)
def test_cell_matches_torch(spec, dtype, backend):
    kind, N, I, H = (spec[k] for k in ("kind", "N", "I", "H"))
    lstm = kind == "LSTM"
    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    tdtype = TORCH_DTYPE[dtype]
    bias = spec["options"].get("bias", True)
    if kind.startswith("RNN_"):
        nl = kind[4:].lower()
        tcell = torch.nn.RNNCell(I, H, bias=bias, nonlinearity=nl, dtype=tdtype)
        cell = lstmfast.RNNCell(I, H, bias=bias, nonlinearity=nl, dtype=dtype, backend=backend)
    else:
        tcell = getattr(torch.nn, kind + "Cell")(I, H, bias=bias, dtype=tdtype)
        cell = getattr(lstmfast, kind + "Cell")(I, H, bias=bias, dtype=dtype, backend=backend)
    cell.load_state_dict(tcell.state_dict())
    lead = () if spec["unbatched"] else (N,)

    def randn(*shape):
        return rng.standard_normal(shape).astype(dtype)

    x = randn(*lead, I)
    h0 = randn(*lead, H) if spec["h0"] else np.zeros(lead + (H,), dtype)
    c0 = randn(*lead, H) if spec["h0"] else np.zeros(lead + (H,), dtype)
    g_h, g_c = randn(*lead, H), randn(*lead, H)

    tx, th0, tc0 = t(x, True), t(h0, True), t(c0, True)
    if lstm:
        t_h1, t_c1 = tcell(tx, (th0, tc0))
        ((t_h1 * t(g_h)).sum() + (t_c1 * t(g_c)).sum()).backward()
        h1, c1 = cell(x, (h0, c0) if spec["h0"] else None)
        dx, (dh0, dc0) = cell.backward(g_h, g_c)
        assert_close(c1, t_c1.detach().numpy(), name="c1")
        assert_close(dc0, tc0.grad.numpy(), name="grad c0")
    else:
        t_h1 = tcell(tx, th0)
        (t_h1 * t(g_h)).sum().backward()
        h1 = cell(x, h0 if spec["h0"] else None)
        dx, dh0 = cell.backward(g_h)
    assert_close(h1, t_h1.detach().numpy(), name="h1")
    assert_close(dx, tx.grad.numpy(), name="grad x")
    assert_close(dh0, th0.grad.numpy(), name="grad h0")
    assert list(cell.grad) == [name for name, _ in tcell.named_parameters()]
    for name, param in tcell.named_parameters():
        assert_close(cell.grad[name], param.grad.numpy(), name=f"grad {name}")


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
def test_eval_forward_matches_torch(kind, backend):
    """Eval mode (nothing kept) gives the same numbers as torch's inference."""
    torch.manual_seed(0)
    options = dict(I=5, H=7, num_layers=2, bidirectional=True)
    tmod, ours = make_layers(kind, options, "float64", backend)
    ours.eval()
    tmod.eval()
    x = np.random.default_rng(3).standard_normal((6, 2, 5))
    out, hn = ours(x)
    with torch.no_grad():
        t_out, t_hn = tmod(t(x))
    assert_close(out, t_out.numpy(), name="output")
    if kind == "LSTM":
        assert_close(hn[0], t_hn[0].numpy(), name="h_n")
        assert_close(hn[1], t_hn[1].numpy(), name="c_n")
    else:
        assert_close(hn, t_hn.numpy(), name="h_n")
