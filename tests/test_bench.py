"""``python -m lstmfast.bench`` end to end, on its smallest grid: it runs, checks the
fused results against the reference, and prints and writes the figures it promises.

Timing figures are not asserted (speed is the benchmark's business, not a unit
test's); their presence, consistency and the ceilings they are compared with are.
"""

import importlib.util
import json

import pytest

from conftest import BACKENDS

bench = pytest.importorskip("lstmfast.bench")
pytestmark = pytest.mark.skipif("fused" not in BACKENDS, reason="the fused kernels are not built")


def test_bench_prints_and_writes_every_figure(tmp_path, capsys, threads_restored):
    pytest.importorskip("matplotlib")
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = bench.main(["--shapes", "stream", "--threads", "1", "--rounds", "1", "--min-time", "0",
                     "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    printed = capsys.readouterr().out
    for text in ("simd_target", "sgemm ceiling (1024^3, 1 thr)", "dgemm ceiling (1024^3, 1 thr)",
                 "vs torch", "vs ref", "% gemm", "grid, inference, 1 thread", "grid, training, 1 thread"):
        assert text in printed

    data = json.loads(out_json.read_text())
    ceilings = data["gemm_gflops"]
    assert sorted(ceilings) == ["float32 1", "float64 1"]
    assert all(g > 0 for g in ceilings.values())
    rows = data["results"]
    cases = {(r["cell"], r["shape"], r["variant"], r["mode"]) for r in rows}
    for cell in ("LSTM", "GRU"):
        for mode in ("inference", "training"):
            assert (cell, "stream", "", mode) in cases
            for variant in ("float64", "bidir", "2layer"):
                assert (cell, "small", variant, mode) in cases
    assert ("LSTM", "lengths", "lengths", "training") in cases
    expected = {"reference", "fused"} | ({"torch"} if importlib.util.find_spec("torch") else set())
    for r in rows:
        # every row's ceiling is the GEMM of its own dtype at its thread count
        assert r["gemm_gflops"] == ceilings[f"{r['dtype']} {r['threads']}"]
        assert r["dtype"] == ("float64" if r["variant"] == "float64" else "float32")
        assert r["seconds"]["fused"] > 0 and r["seconds"]["reference"] > 0
        assert set(r["seconds"]) == expected
        assert r["gflops"] > 0
    assert out_png.stat().st_size > 0
