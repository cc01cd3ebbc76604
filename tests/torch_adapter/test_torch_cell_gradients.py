"""The gradients of a cell stepped in a loop, the way autograd walks its graph.

Oracle: torch.nn's own cell with the same weights, run through the same loop, at the
project's tolerance (float64, 1e-10).
"""

import copy

import pytest

torch = pytest.importorskip("torch")
import lstmfast.torch as lt  # noqa: E402
from torch import nn  # noqa: E402

from helpers import assert_close, fused_available  # noqa: E402

pytestmark = pytest.mark.skipif(not fused_available(), reason="the fused kernels are not built")

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


def grads_of(module):
    return [None if p.grad is None else p.grad.clone() for p in module.parameters()]


def assert_same_grads(ours, theirs, what):
    for i, (a, b) in enumerate(zip(grads_of(ours), grads_of(theirs))):
        assert (a is None) == (b is None), f"{what}: parameter {i}"
        if a is not None:
            assert_close(a, b, tol=TOL, name=f"{what}: parameter {i}")


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
