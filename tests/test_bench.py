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


# --- python -m lstmfast.bench --models -------------------------------------------

@pytest.fixture
def bench_models():
    pytest.importorskip("torch")
    from lstmfast import bench_models

    return bench_models


@pytest.fixture
def torch_threads_restored(threads_restored):
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_models_prints_and_writes_every_figure(tmp_path, capsys, bench_models):
    # One training model: its row has every field an inference row has, and more.
    out_json = tmp_path / "models.json"
    rc = bench.main(["--models", "gru_forecaster", "--tiny", "--quick", "--json", str(out_json)])
    assert rc == 0
    printed = capsys.readouterr().out
    for text in ("simd_target", "torch", "lstmfast threads", "speed-up", "RNN share", "RNN in model",
                 "RNN alone", "alone f+b", "gru_forecaster", "max relative difference"):
        assert text in printed

    data = json.loads(out_json.read_text())
    assert data["config"]["simd_target"] and data["config"]["torch"]
    assert data["refused"] == []
    (row,) = data["results"]
    assert (row["model"], row["mode"], row["threads"], row["dtype"]) == ("gru_forecaster", "training", 2, "float32")
    assert row["max_rel_diff"] <= data["agreement_rtol"]
    assert row["rnn_share_of"] == "forward"  # backward cannot be attributed to modules
    for key in ("seconds", "rnn_share", "rnn_seconds_in_model", "rnn_alone_seconds", "rnn_alone_step_seconds"):
        assert set(row[key]) == {"torch", "accelerated"}, key
        assert all(v > 0 for v in row[key].values()), key
    assert all(0 < share <= 1 for share in row["rnn_share"].values())
    for ratio, seconds in (("ratio", "seconds"), ("rnn_ratio_in_model", "rnn_seconds_in_model"),
                           ("rnn_ratio_alone", "rnn_alone_seconds"),
                           ("rnn_ratio_alone_step", "rnn_alone_step_seconds")):
        assert row[ratio] == pytest.approx(row[seconds]["torch"] / row[seconds]["accelerated"]), ratio
    assert row["accelerated_modules"] == row["rnn_modules"] == 1
    assert row["rnn_calls_per_step"] == 1


def test_models_refuses_a_model_whose_outputs_disagree(tmp_path, capsys, monkeypatch, bench_models):
    real_load = bench_models.load_check_outputs

    def load_with_a_wrong_accelerated_output(path):
        outputs = real_load(path)
        for key, value in outputs["accelerated"].items():
            outputs["accelerated"][key] = value * (1 + 10 * bench_models.AGREEMENT_RTOL)
        return outputs

    jobs = []
    real_run_worker = bench_models.run_worker

    def recording_run_worker(job):
        jobs.append(job["kind"])
        return real_run_worker(job)

    monkeypatch.setattr(bench_models, "load_check_outputs", load_with_a_wrong_accelerated_output)
    monkeypatch.setattr(bench_models, "run_worker", recording_run_worker)
    out_json = tmp_path / "models.json"
    rc = bench.main(["--models", "wavernn_gen", "--tiny", "--quick", "--json", str(out_json)])
    assert rc != 0
    assert "REFUSED" in capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert data["results"] == []
    (refused,) = data["refused"]
    assert refused["model"] == "wavernn_gen" and refused["max_rel_diff"] > data["agreement_rtol"]
    assert jobs == ["check"]  # nothing was timed


def test_models_rejects_unknown_names(bench_models, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--models", "crnn,no_such_model", "--tiny"])
    assert "no_such_model" in capsys.readouterr().err


def _tiny_job(bench_models, name, mode, impl):
    repeats = bench_models.Repeats.for_run(quick=True, tiny=True)
    return {"model": name, "mode": mode, "impl": impl, "threads": 1, "tiny": True, "repeats": repeats.__dict__}


@pytest.mark.parametrize("name", ["crnn", "gru_forecaster", "bilstm3", "deepspeech", "wavernn_gen", "tacotron_dec",
                                  "cell_loop"])
def test_every_model_agrees_and_measures_in_process(name, tmp_path, bench_models, torch_threads_restored):
    # The workers' own functions, in this process and at tiny sizes: every model builds,
    # its accelerated outputs (and gradients) agree with torch's, and each measure is sane.
    spec = bench_models.MODELS[name]
    path = tmp_path / "outputs.npz"
    bench_models.model_outputs(name, True, 1, str(path))
    error, where = bench_models.compare_outputs(bench_models.load_check_outputs(path))
    assert error <= bench_models.AGREEMENT_RTOL, f"{name}: {where} differs by {error:.3g}"

    model, inputs, _ = bench_models.build(name, tiny=True)
    rnn_calls = []
    for m in bench_models.rnn_modules(model):
        m.register_forward_hook(lambda *args: rnn_calls.append(1))
    with __import__("torch").no_grad():
        model(*inputs)
    for mode in spec.modes:
        for impl in bench_models.IMPLEMENTATIONS:
            measured = bench_models.measure_model(_tiny_job(bench_models, name, mode, impl))
            assert measured["seconds"] > 0 and 0 < measured["rnn_share"] <= 1
            assert measured["rnn_modules"] == len(bench_models.rnn_modules(model))
            alone = bench_models.measure_rnn_alone(_tiny_job(bench_models, name, mode, impl))
            assert alone["seconds"] > 0 and alone["calls"] == len(rnn_calls)
            assert ("step_seconds" in alone) == (mode == "training")
