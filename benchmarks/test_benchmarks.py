"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only``.

Each group is one case of the grid of docs/performance.md (cell, shape, mode); inside it the
fused kernels, the NumPy reference and torch (when installed) are timed in the
same run. Every case first checks the fused result against the reference.
The thread count is LSTMFAST_NUM_THREADS (or all CPUs); torch gets the same.
"""

import numpy as np
import pytest

import lstmfast
from lstmfast.bench.common import SHAPES, fused_available

try:
    import torch
except ImportError:  # torch is optional: its cases are skipped
    torch = None

IMPLS = ["fused", "reference", "torch"]
CELLS = ["LSTM", "GRU"]
MODES = ["inference", "training"]


def _inputs(T, N, I, H):
    rng = np.random.default_rng(1)
    return (rng.standard_normal((T, N, I)).astype(np.float32),
            rng.standard_normal((T, N, H)).astype(np.float32))


def _layer(cell, I, H, backend, mode):
    layer = getattr(lstmfast, cell)(I, H, backend=backend, seed=0)
    return layer.train() if mode == "training" else layer.eval()


def _step(layer, mode, x, d_out):
    if mode == "inference":
        return layer(x)[0]
    out = layer(x)[0]
    layer.backward(d_out)
    return out


def _torch_step(cell, I, H, mode, state, x, d_out):
    torch.set_num_threads(lstmfast.get_num_threads())
    module = getattr(torch.nn, cell)(I, H)
    module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
    xt, gt = torch.from_numpy(x), torch.from_numpy(d_out)
    if mode == "inference":
        module.eval()

        def run():
            with torch.inference_mode():
                return module(xt)[0]
        return run
    xg = xt.clone().requires_grad_(True)

    def run():
        module.zero_grad(set_to_none=False)
        out = module(xg)[0]
        out.backward(gt)
        return out
    return run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cell", CELLS)
def test_grid(benchmark, cell, mode, shape, impl):
    T, N, I, H = SHAPES[shape]
    benchmark.group = f"{cell} {shape} {mode} (T={T} N={N} I={I} H={H}, float32, threads={lstmfast.get_num_threads()}, simd={lstmfast._config.simd_target()})"
    x, d_out = _inputs(T, N, I, H)
    reference = _layer(cell, I, H, "numpy", mode)
    if impl == "fused":
        if not fused_available():
            pytest.skip("fused kernels not built")
        layer = _layer(cell, I, H, "fused", mode)
        layer.load_state_dict(reference.state_dict())
        expected = reference(x)[0]
        got = benchmark(_step, layer, mode, x, d_out)
        err = np.abs(got - expected).max() / max(1.0, np.abs(expected).max())
        assert err <= 1e-5, f"fused differs from the reference by {err:.3g}"
    elif impl == "reference":
        benchmark.pedantic(_step, args=(reference, mode, x, d_out), rounds=3, iterations=1, warmup_rounds=1)
    else:
        if torch is None:
            pytest.skip("torch not installed")
        run = _torch_step(cell, I, H, mode, reference.state_dict(), x, d_out)
        got = benchmark(run)
        expected = reference(x)[0]
        err = np.abs(got.detach().numpy() - expected).max() / max(1.0, np.abs(expected).max())
        assert err <= 1e-5, f"torch differs from the reference by {err:.3g}"
