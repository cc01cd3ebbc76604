"""A cell (or a layer) stepped in a loop makes its weight gradients once per backward
pass (autograd._WeightGradientSums) instead of handing autograd a set per step: its
steps hand back their gate gradients, multiplied by the steps' inputs at once, or,
where the kernels cannot hand them back (a stack, a projection), add their weight
gradients into one set of arrays.

Oracle: torch.nn's own cell with the same weights, run through the same loop, at the
project's tolerance (float64, 1e-10). The cases are the ways autograd can walk a
cell's graph: one pass, two passes over one graph (retain_graph), a pass that asks
for the input's gradient only, two sequences in one pass or in two, a weight shared
with another module, weights replaced or frozen between passes, double backward,
several threads. That the steps do so (and hand autograd no gradient of their own)
is read off the steps' results, and which way each step took off the kernels' calls.
"""

import copy

import pytest

torch = pytest.importorskip("torch")
import lstmfast.torch as lt  # noqa: E402
from lstmfast.torch import autograd as lt_autograd  # noqa: E402
from torch import nn  # noqa: E402

from helpers import assert_close, fused_available, run_all  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not fused_available(), reason="the fused kernels are not built"),
    pytest.mark.skipif(not lt_autograd._ENGINE_TELLS_PASSES,
                       reason="this torch's engine does not tell its passes"),
]

CELLS = [nn.LSTMCell, nn.GRUCell, nn.RNNCell]
I, H, N, T = 5, 7, 3, 6
TOL = 1e-10


def twins(cls, seed=0, **kwargs):
    torch.manual_seed(seed)
    theirs = cls(I, H, dtype=torch.float64, **kwargs)
    ours = lt.accelerate(copy.deepcopy(theirs))
    return theirs, ours


def sequence(seed, T=T):
    return torch.randn(T, N, I, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def loss_of(cell, x, state=None):
    """The loop users write: a step per row of x, a loss on every h."""
    outputs = []
    for t in range(x.shape[0]):
        state = cell(x[t], state)
        outputs.append(state[0] if isinstance(state, tuple) else state)
    return torch.stack(outputs).sin().sum()


@pytest.fixture
def routes(monkeypatch):
    """The way each step's backward took, in order: "gates" (it handed back its gate
    gradients) or "sums" (it added its weight gradients into the pass's arrays)."""
    from lstmfast import _fused

    taken = []
    for name, route in (("gate_gradients_backward", "gates"), ("summing_backward", "sums")):
        original = getattr(_fused, name)
        monkeypatch.setattr(_fused, name, lambda *a, _o=original, _r=route, **k:
                            taken.append(_r) or _o(*a, **k))
    return taken


def grads_of(module):
    return [None if p.grad is None else p.grad.clone() for p in module.parameters()]


def assert_same_grads(ours, theirs, what):
    for i, (a, b) in enumerate(zip(grads_of(ours), grads_of(theirs))):
        assert (a is None) == (b is None), f"{what}: parameter {i}"
        if a is not None:
            assert_close(a, b, tol=TOL, name=f"{what}: parameter {i}")


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("bias", [True, False])
def test_one_pass_gives_torchs_gradients_and_the_steps_hand_autograd_none(cls, bias, monkeypatch,
                                                                         routes):
    steps = []
    original = lt_autograd._CellFunction.backward

    def spy(ctx, *grads):
        result = original(ctx, *grads)
        steps.append(result[-4:])
        return result

    monkeypatch.setattr(lt_autograd._CellFunction, "backward", staticmethod(spy))
    theirs, ours = twins(cls, bias=bias)
    x = sequence(1).requires_grad_(True)
    x_ours = x.detach().clone().requires_grad_(True)
    loss_of(theirs, x).backward()
    loss_of(ours, x_ours).backward()
    assert_same_grads(ours, theirs, "one pass")
    assert_close(x_ours.grad, x.grad, tol=TOL, name="input gradient")
    assert len(steps) == T and all(g is None for step in steps for g in step)
    assert routes == ["gates"] * T


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_steps_kept_past_the_limit_are_multiplied_early_and_give_torchs_gradients(cls, monkeypatch):
    # A pass keeps its steps' gate gradients up to about a set of weight gradients
    # (here: no more than that, the floor taken away), then multiplies them into its
    # arrays and drops them; the rest at the anchor.
    monkeypatch.setattr(lt_autograd._PassGradients, "_KEPT_BYTES", 0)
    products = []
    original = lt_autograd._PassGradients._multiply_steps
    monkeypatch.setattr(lt_autograd._PassGradients, "_multiply_steps",
                        lambda self, wanted: products.append(len(self.steps)) or original(self, wanted))
    theirs, ours = twins(cls)
    long_sequence = sequence(8, T=4 * T)
    for module in (theirs, ours):
        loss_of(module, long_sequence).backward()
    assert_same_grads(ours, theirs, "multiplied in parts")
    # a step's records (N=3) take 3 x (G*H + H) values: a set of weight gradients,
    # G*H x (I + H + 2), is reached every few steps
    assert len(products) >= 3 and sum(products) == 4 * T and max(products) < 4 * T


@pytest.mark.parametrize("hidden, batch, route", [(7, 8, "sums"), (7, 7, "gates"), (180, 8, "gates"),
                                                  (180, 64, "gates"), (180, 65, "sums")],
                         ids=["small_weights_8_rows", "small_weights_7_rows", "large_weights_8_rows",
                              "large_weights_64_rows", "large_weights_65_rows"])
def test_calls_of_many_rows_sum_and_the_rest_hand_back_gates(hidden, batch, route, routes):
    # Calls of 8 rows or more on weight gradients that stay in cache (at most 1 MB),
    # and calls of more than 64 rows on any: each call's sum is a GEMM of its own,
    # which beat multiplying them all at once.
    torch.manual_seed(0)
    theirs = nn.LSTMCell(I, hidden, dtype=torch.float64)
    ours = lt.accelerate(copy.deepcopy(theirs))
    x = torch.randn(4, batch, I, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for module in (theirs, ours):
        loss_of(module, x).backward()
    assert_same_grads(ours, theirs, route)
    assert routes == [route] * 4


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_float32_steps_give_torchs_gradients(cls):
    # The weight gradients of float32 steps come from one product over all steps
    # (OpenBLAS's sgemm): within float32's tolerance of torch's own cell.
    torch.manual_seed(0)
    theirs = cls(16, 24)
    ours = lt.accelerate(copy.deepcopy(theirs))
    x = torch.randn(12, 4, 16, generator=torch.Generator().manual_seed(9))
    for module in (theirs, ours):
        loss_of(module, x).backward()
    for i, (a, b) in enumerate(zip(grads_of(ours), grads_of(theirs))):
        assert_close(a, b, tol=1e-5, name=f"float32 parameter {i}")


@pytest.mark.parametrize("frozen", ["weight_ih", "bias_hh", "weight_hh"])
def test_a_frozen_weight_gets_no_gradient_and_the_others_torchs(frozen):
    theirs, ours = twins(nn.GRUCell)
    for module in (theirs, ours):
        getattr(module, frozen).requires_grad_(False)
        loss_of(module, sequence(7)).backward()
        assert getattr(module, frozen).grad is None
    assert_same_grads(ours, theirs, f"{frozen} frozen")


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_two_passes_over_one_graph_add_up_as_torchs(cls):
    theirs, ours = twins(cls)
    for module in (theirs, ours):
        loss = loss_of(module, sequence(2))
        loss.backward(retain_graph=True)
        loss.backward()
    assert_same_grads(ours, theirs, "retain_graph")


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_a_pass_for_the_input_alone_leaves_nothing_for_the_next(cls):
    # The anchor does not run in a pass that does not reach the weights: the steps
    # must not sum into arrays a later pass would then find.
    theirs, ours = twins(cls)
    for module in (theirs, ours):
        x = sequence(3).requires_grad_(True)
        (dx,) = torch.autograd.grad(loss_of(module, x), [x])
        module.dx = dx
        loss_of(module, sequence(4)).backward()
    assert_close(ours.dx, theirs.dx, tol=TOL, name="input gradient")
    assert_same_grads(ours, theirs, "after a pass for the input")
    assert not lt_autograd._weight_gradient_sums[ours].passes


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_gradients_of_the_weights_alone_through_autograd_grad(cls):
    theirs, ours = twins(cls)
    results = []
    for module in (theirs, ours):
        results.append(torch.autograd.grad(loss_of(module, sequence(5)), list(module.parameters())))
    for i, (a, b) in enumerate(zip(*reversed(results))):
        assert_close(a, b, tol=TOL, name=f"parameter {i}")


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_two_sequences_in_one_pass_and_in_two(cls):
    theirs, ours = twins(cls)
    for module in (theirs, ours):
        (loss_of(module, sequence(6)) + loss_of(module, sequence(7, T=3))).backward()
    assert_same_grads(ours, theirs, "one pass")
    for module in (theirs, ours):
        first, second = loss_of(module, sequence(8)), loss_of(module, sequence(9, T=4))
        second.backward()
        first.backward()
    assert_same_grads(ours, theirs, "two passes, in the other order")


def test_a_weight_shared_with_another_module_gets_both_gradients():
    theirs, ours = twins(nn.GRUCell)
    for module in (theirs, ours):
        head = nn.Linear(H, 3 * H, bias=False, dtype=torch.float64)
        with torch.no_grad():
            head.weight.copy_(torch.linspace(-1, 1, 3 * H * H, dtype=torch.float64).reshape(3 * H, H))
        head.weight = module.weight_hh  # tied: the loss reads it outside the cell too
        h = None
        for t, x_t in enumerate(sequence(10)):
            h = module(x_t, h)
        (loss_of(module, sequence(11)) + head(h).square().sum()).backward()
    assert_same_grads(ours, theirs, "tied weight")


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_weights_replaced_or_frozen_between_passes(cls):
    theirs, ours = twins(cls)
    for module in (theirs, ours):
        loss_of(module, sequence(12)).backward()
        module.zero_grad()
        module.weight_hh = nn.Parameter(module.weight_hh.detach() * 0.5)  # a new object
        loss_of(module, sequence(13)).backward()
    assert_same_grads(ours, theirs, "a weight replaced")
    for module in (theirs, ours):
        module.zero_grad(set_to_none=True)
        module.weight_ih.requires_grad_(False)
        loss_of(module, sequence(14)).backward()
        assert module.weight_ih.grad is None
        module.weight_ih.requires_grad_(True)
        loss_of(module, sequence(15)).backward()
    assert_same_grads(ours, theirs, "a weight frozen, then trained again")


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_training_steps_with_an_optimizer_follow_torchs(cls):
    theirs, ours = twins(cls)
    for module in (theirs, ours):
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        for step in range(3):
            optimizer.zero_grad()
            loss_of(module, sequence(16 + step)).backward()
            optimizer.step()
    for i, (a, b) in enumerate(zip(ours.parameters(), theirs.parameters())):
        assert_close(a.detach(), b.detach(), tol=TOL, name=f"parameter {i} after 3 steps")


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
def test_double_backward_through_a_loop_counts_each_step_once(cls):
    theirs, ours = twins(cls)
    results = []
    for module in (theirs, ours):
        params = list(module.parameters())
        grads = torch.autograd.grad(loss_of(module, sequence(20, T=3)), params, create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in grads), params)
        results.append(grads + second)
    for i, (a, b) in enumerate(zip(*reversed(results))):
        assert_close(a, b, tol=TOL, name=f"gradient {i}")


def test_cells_trained_in_threads_of_their_own():
    pairs = [twins(nn.LSTMCell, seed=s) for s in range(4)]

    def train(module, seed):
        return lambda: loss_of(module, sequence(seed)).backward()

    for k in (1, 0):  # theirs, then ours
        run_all([train(pair[k], 30 + i) for i, pair in enumerate(pairs)])
    for i, (theirs, ours) in enumerate(pairs):
        assert_same_grads(ours, theirs, f"thread {i}")


# --- layers stepped a few steps per call ---------------------------------------------

# name, torch's twin (None: lstmfast's own module on the NumPy reference backend, which
# hands autograd its gradients per call, is the oracle), constructor arguments
LAYERS = [
    ("LSTM", nn.LSTM, dict()),
    ("LSTM-2-layers-bidirectional", nn.LSTM, dict(num_layers=2, bidirectional=True)),
    ("LSTM-proj", nn.LSTM, dict(proj_size=3)),
    ("GRU", nn.GRU, dict(bias=False)),
    ("RNN-relu", nn.RNN, dict(nonlinearity="relu")),
    ("PeepholeLSTM", None, dict()),
    ("LayerNormLSTM", None, dict()),
    ("CTRNN", None, dict(alpha=0.5)),
]


def layer_twins(name, twin, kwargs):
    torch.manual_seed(0)
    if twin is not None:
        theirs = twin(I, H, dtype=torch.float64, **kwargs)
        return theirs, lt.accelerate(copy.deepcopy(theirs))
    ours = getattr(lt, name)(I, H, **kwargs).double()
    theirs = copy.deepcopy(ours)
    theirs._lstmfast_backend = "numpy"
    return theirs, ours


def layer_loss_of(layer, x, per_call):
    """A layer fed per_call steps per call, its state carried between the calls."""
    state, outputs = None, []
    for t in range(0, x.shape[0], per_call):
        y, state = layer(x[t:t + per_call], state)
        outputs.append(y)
    return torch.cat(outputs).sin().sum()


@pytest.mark.parametrize("name, twin, kwargs", LAYERS, ids=[c[0] for c in LAYERS])
@pytest.mark.parametrize("per_call", [1, 2])
def test_a_layer_stepped_in_a_loop_hands_autograd_no_gradient(name, twin, kwargs, per_call,
                                                             monkeypatch, routes):
    calls = []
    original = lt_autograd._RecurrentFunction.backward

    def spy(ctx, *grads):
        result = original(ctx, *grads)
        calls.append(result[6:])
        return result

    monkeypatch.setattr(lt_autograd._RecurrentFunction, "backward", staticmethod(spy))
    theirs, ours = layer_twins(name, twin, kwargs)
    x = sequence(40).requires_grad_(True)
    x_ours = x.detach().clone().requires_grad_(True)
    layer_loss_of(theirs, x, per_call).backward()
    calls.clear()
    routes.clear()
    layer_loss_of(ours, x_ours, per_call).backward()
    assert_same_grads(ours, theirs, "one pass")
    assert_close(x_ours.grad, x.grad, tol=TOL, name="input gradient")
    assert len(calls) == T // per_call and all(g is None for call in calls for g in call)
    # one layer of torch's cells hands back its gate gradients; the rest sum
    route = "gates" if name in ("LSTM", "GRU", "RNN-relu") else "sums"
    assert routes == [route] * (T // per_call)


@pytest.mark.parametrize("kept_bytes", [None, 0], ids=["kept_to_the_anchor", "multiplied_early"])
def test_a_pass_with_calls_of_both_ways_adds_them_up(routes, kept_bytes, monkeypatch):
    # A layer called on a packed sequence (its steps sum) and stepped on plain ones
    # (they hand back gate gradients) in one pass: both reach the weights' gradients,
    # whether the steps kept are multiplied at the anchor or before the packed call sums.
    if kept_bytes is not None:
        monkeypatch.setattr(lt_autograd._PassGradients, "_KEPT_BYTES", kept_bytes)
    theirs, ours = layer_twins("LSTM", nn.LSTM, dict())
    pack = nn.utils.rnn.pack_padded_sequence
    for module in (theirs, ours):
        packed = pack(sequence(70), torch.tensor([6, 4, 2]))
        y_packed, state = module(packed)
        loss = nn.utils.rnn.pad_packed_sequence(y_packed)[0].cos().sum()
        (loss + layer_loss_of(module, sequence(71), 2)).backward()
    assert_same_grads(ours, theirs, "packed and stepped")
    assert sorted(set(routes)) == ["gates", "sums"]


@pytest.mark.parametrize("name, twin, kwargs", LAYERS[:2] + LAYERS[5:6], ids=["LSTM", "LSTM-2-bi",
                                                                             "PeepholeLSTM"])
def test_a_stepped_layer_under_retain_graph_input_only_passes_and_an_optimizer(name, twin, kwargs):
    theirs, ours = layer_twins(name, twin, kwargs)
    for module in (theirs, ours):
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        loss = layer_loss_of(module, sequence(41), 1)
        loss.backward(retain_graph=True)
        loss.backward()
        optimizer.step()
        x = sequence(42).requires_grad_(True)
        (module.dx,) = torch.autograd.grad(layer_loss_of(module, x, 1), [x])
        optimizer.zero_grad()
        layer_loss_of(module, sequence(43), 3).backward()
    assert_close(ours.dx, theirs.dx, tol=TOL, name="input gradient")
    assert_same_grads(ours, theirs, "after an optimizer step and a pass for the input")
    for i, (a, b) in enumerate(zip(ours.parameters(), theirs.parameters())):
        assert_close(a.detach(), b.detach(), tol=TOL, name=f"parameter {i} after a step")


def test_a_layer_with_a_parametrized_weight_takes_no_anchor():
    # A parametrization computes the weight anew at every call: an anchor would serve
    # one call only, so each call hands autograd its own gradients, as before.
    theirs, ours = layer_twins("LSTM", nn.LSTM, dict())
    for module in (theirs, ours):
        nn.utils.parametrizations.weight_norm(module, "weight_hh_l0")
        layer_loss_of(module, sequence(44), 2).backward()
    assert_same_grads(ours, theirs, "weight_norm")
    assert ours not in lt_autograd._weight_gradient_sums


def test_passes_that_fail_midway_leave_no_gradient_behind():
    # A backward that raises after some steps summed leaves their sum unclaimed: it
    # must neither reach a later pass nor pile up (at most _PASSES sums are kept).
    theirs, ours = twins(nn.LSTMCell)

    def failing_pass(module):
        state, outputs = None, []
        for t, x_t in enumerate(sequence(50)):
            state = module(x_t, state)
            if t == 2:
                state[0].register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("stop")))
            outputs.append(state[0])
        with pytest.raises(RuntimeError, match="stop"):
            torch.stack(outputs).sum().backward()

    for _ in range(lt_autograd._WeightGradientSums._PASSES + 2):
        failing_pass(ours)
    assert len(lt_autograd._weight_gradient_sums[ours].passes) == lt_autograd._WeightGradientSums._PASSES
    failing_pass(theirs)
    for module in (theirs, ours):
        module.zero_grad(set_to_none=True)
        loss_of(module, sequence(51)).backward()
    assert_same_grads(ours, theirs, "after failed passes")


@pytest.mark.parametrize("name, twin, kwargs", LAYERS[:1] + LAYERS[3:5], ids=["LSTM", "GRU", "RNN-relu"])
def test_double_backward_through_a_stepped_layer_counts_each_call_once(name, twin, kwargs):
    theirs, ours = layer_twins(name, twin, kwargs)
    results = []
    for module in (theirs, ours):
        params = list(module.parameters())
        grads = torch.autograd.grad(layer_loss_of(module, sequence(60, T=4), 1), params,
                                    create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in grads), params)
        results.append(grads + second)
    for i, (a, b) in enumerate(zip(*reversed(results))):
        assert_close(a, b, tol=TOL, name=f"gradient {i}")


@pytest.mark.parametrize("twin", [nn.LSTM, nn.GRU], ids=["LSTM", "GRU"])
def test_a_batch_first_layer_stepped_in_a_loop_gives_torchs_gradients(twin, routes):
    # batch_first: each call's input reaches the kernels as a transposed view, which
    # the gate gradients' products must read in the kernels' (time-major) order.
    torch.manual_seed(0)
    theirs = twin(I, H, batch_first=True, dtype=torch.float64)
    ours = lt.accelerate(copy.deepcopy(theirs))
    x = sequence(80).transpose(0, 1)  # (N, T, I)
    for module in (theirs, ours):
        state, outputs = None, []
        for t in range(0, x.shape[1], 2):
            y, state = module(x[:, t:t + 2], state)
            outputs.append(y)
        torch.cat(outputs, 1).sin().sum().backward()
    assert_same_grads(ours, theirs, "batch_first")
    assert routes == ["gates"] * (T // 2)
