"""Data-parallel training with lstmfast.torch under torch.distributed (gloo, 2 processes)."""

import os
import socket
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_replicas_match_single_process_training(tmp_path):
    port = free_port()
    env = dict(os.environ, LSTMFAST_NUM_THREADS="1")
    outs = [tmp_path / f"rank{r}.pt" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, WORKER, str(r), "2", str(port), str(outs[r])], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log}"
    single = tmp_path / "single.pt"
    subprocess.run([sys.executable, WORKER, "0", "1", "0", str(single)], env=env, check=True, timeout=180)

    rank0, rank1, whole = (torch.load(f) for f in (*outs, single))
    for name in whole:
        assert torch.equal(rank0[name], rank1[name]), f"replicas differ in {name}"
        diff = (rank0[name] - whole[name]).abs().max().item()
        assert diff <= 1e-10 * max(1.0, whole[name].abs().max().item()), \
            f"{name}: DDP and single-process training differ by {diff:.3g}"
    # The training really moved the weights (so agreement is not trivial).
    torch.manual_seed(0)
    sys.path.insert(0, os.path.dirname(WORKER))
    try:
        import ddp_worker
    finally:
        sys.path.pop(0)
    fresh = ddp_worker.Model().double().state_dict()
    assert any(not torch.equal(fresh[k], whole[k]) for k in whole)
