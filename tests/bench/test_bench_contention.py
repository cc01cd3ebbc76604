"""``python -m lstmfast.bench.contention`` end to end, on tiny sizes: it runs every
measurement in its own process, checks results there, and prints and writes the
figures it promises. Timings are not asserted (speed is the benchmark's business)."""

import json

import pytest

from helpers import BACKENDS

contention = pytest.importorskip("lstmfast.bench.contention")
pytestmark = pytest.mark.skipif("fused" not in BACKENDS, reason="the fused kernels are not built")


def test_prints_and_writes_every_figure(tmp_path, capsys):
    pytest.importorskip("torch")
    out_json = tmp_path / "contention.json"
    rc = contention.main(["--threads", "2", "--rounds", "1", "--width", "64", "--iters", "2",
                           "--min-time", "0", "--shapes", "stream", "--json", str(out_json)])
    assert rc == 0
    printed = capsys.readouterr().out
    for text in ("simd target", "threads: 2", "CRNN whole model", "the two BiLSTMs alone",
                 "in the LSTMs", "more threads than cores", "busy core", "stream T=100 N=1"):
        assert text in printed, text
    data = json.loads(out_json.read_text())
    for key in ("crnn", "isolated"):
        for impl in ("torch", "lstmfast"):
            assert data[key][impl]["lstm"] > 0
    assert data["crnn"]["lstmfast"]["total"] >= data["crnn"]["lstmfast"]["lstm"]
    rows = data["oversubscription"]
    assert [(r["shape"], r["training"]) for r in rows] == [("stream", False), ("stream", True)]
    for r in rows:
        assert sorted(r["times"]) == ["2", "4", "8", "busy"]
        assert all(t > 0 for t in r["times"].values())
