"""``python -m lstmfast.bench`` end to end, on its smallest grid: it runs, checks the
fused results against the reference, and prints and writes the figures it promises.

Timing figures are not asserted (speed is the benchmark's business, not a unit
test's); their presence, consistency and the ceilings they are compared with are.
"""

import importlib.util
import json
import sys

import numpy as np
import pytest

from helpers import BACKENDS

bench = pytest.importorskip("lstmfast.bench")
from lstmfast.bench import common  # noqa: E402
pytestmark = pytest.mark.skipif("fused" not in BACKENDS, reason="the fused kernels are not built")


def test_bench_prints_and_writes_every_figure(tmp_path, capsys, threads_restored):
    pytest.importorskip("matplotlib")
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = bench.main(["--shapes", "stream", "--threads", "1", "--rounds", "1", "--min-time", "0",
                     "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    printed = capsys.readouterr().out
    for text in ("simd_target", "sgemm ceiling (1024^3, 1 thr)", "dgemm ceiling (1024^3, 1 thr)",
                 "vs torch", "vs ref", "% gemm", "grid, inference, 1 thread", "grid, training, 1 thread",
                 "cpu features", "blas core", "(OpenBLAS core "):
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
    assert ("LSTM", "proj", "proj", "training") in cases
    expected = {"reference", "fused"} | ({"torch"} if importlib.util.find_spec("torch") else set())
    for r in rows:
        # every row's ceiling is the GEMM of its own dtype at its thread count
        assert r["gemm_gflops"] == ceilings[f"{r['dtype']} {r['threads']}"]
        assert r["dtype"] == ("float64" if r["variant"] == "float64" else "float32")
        assert r["seconds"]["fused"] > 0 and r["seconds"]["reference"] > 0
        assert set(r["seconds"]) == expected
        assert r["gflops"] > 0
    assert out_png.stat().st_size > 0


def test_the_header_names_the_cpu_extensions_and_the_blas_core(monkeypatch):
    for name in common.OPENBLAS_FORCING:
        monkeypatch.delenv(name, raising=False)
    from lstmfast import _core

    config = common.configuration(None, None)
    assert config["blas core"] == _core.blas_corename() != ""
    features = _core.cpu_features()
    if features:  # x86
        assert set(features) == {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx"}
        for name, present in features.items():
            assert (name in config["cpu features"].split(" (not:")[0].split()) == present
    assert "warning" not in config


def test_a_forced_openblas_kernel_is_warned_of_and_not_the_ceiling(monkeypatch):
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    warning = common.configuration(None, None)["warning"]
    assert "OPENBLAS_CORETYPE=Haswell" in warning
    assert "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE" in warning
    # The ceiling is the best of this process and a child without the variable, whose
    # OpenBLAS picks its own kernel.
    import subprocess

    monkeypatch.setattr(common, "gemm_gflops", lambda *args: 50.0)
    children = []

    def child(argv, env, **kwargs):
        children.append(env)
        return subprocess.CompletedProcess(argv, 0, stdout=f"{child_gflops} ChildCore\n")

    monkeypatch.setattr(subprocess, "run", child)
    from lstmfast import _core

    child_gflops = 80.0
    assert common.gemm_ceiling(1, "float32", 64, 0.01) == (80.0, "ChildCore")
    child_gflops = 20.0
    assert common.gemm_ceiling(1, "float32", 64, 0.01) == (50.0, _core.blas_corename())
    assert len(children) == 2 and not any(k in env for env in children for k in common.OPENBLAS_FORCING)
    for name in common.OPENBLAS_FORCING:  # the environment may set either
        monkeypatch.delenv(name, raising=False)
    assert common.gemm_ceiling(1, "float32", 64, 0.01) == (50.0, _core.blas_corename())
    assert len(children) == 2  # nothing forced: no child


# --- python -m lstmfast.bench --models -------------------------------------------

@pytest.fixture
def models():
    pytest.importorskip("torch")
    from lstmfast.bench import models

    return models


@pytest.fixture
def torch_threads_restored(threads_restored):
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_models_prints_and_writes_every_figure(tmp_path, capsys, models):
    # One training model: its row has every field an inference row has, and more.
    out_json = tmp_path / "models.json"
    rc = bench.main(["--models", "gru_forecaster", "--tiny", "--quick", "--pairs", "2",
                     "--json", str(out_json)])
    assert rc == 0
    printed = capsys.readouterr().out
    for text in ("simd_target", "torch", "lstmfast threads", "speed-up", "RNN share", "RNN in model",
                 "RNN alone", "alone f+b", "gru_forecaster", "max relative difference", "(min-max)",
                 "expected", "process pairs per model"):
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
    for ratio, seconds in (("rnn_ratio_in_model", "rnn_seconds_in_model"),
                           ("rnn_ratio_alone", "rnn_alone_seconds"),
                           ("rnn_ratio_alone_step", "rnn_alone_step_seconds")):
        assert row[ratio] == pytest.approx(row[seconds]["torch"] / row[seconds]["accelerated"]), ratio
    # Two process pairs: each implementation's median over its processes, the speed-up
    # the median of the pairs' ratios, and the range of those.
    per_process = row["seconds_per_process"]
    assert row["pairs"] == 2 and all(len(per_process[impl]) == 2 for impl in per_process)
    for impl in ("torch", "accelerated"):
        assert row["seconds"][impl] == pytest.approx(np.median(per_process[impl]))
    pair_ratios = [t / a for t, a in zip(per_process["torch"], per_process["accelerated"])]
    assert row["ratio"] == pytest.approx(np.median(pair_ratios))
    assert (row["ratio_min"], row["ratio_max"]) == pytest.approx((min(pair_ratios), max(pair_ratios)))
    # The share-weighted expectation (Amdahl) from the RNN alone, forward and backward here.
    share = row["rnn_alone_step_seconds"]["torch"] / row["seconds"]["torch"]
    assert row["rnn_share_alone"] == pytest.approx(min(1.0, share))
    expected = 1 / ((1 - row["rnn_share_alone"]) + row["rnn_share_alone"] / row["rnn_ratio_alone_step"])
    assert row["expected"] == pytest.approx(expected)
    assert row["of_expected"] == pytest.approx(row["ratio"] / expected)
    assert row["accelerated_modules"] == row["rnn_modules"] == 1
    assert row["rnn_calls_per_step"] == 1


def test_numpy_pipeline_workers_run_with_each_variants_environment(monkeypatch):
    from lstmfast.bench import patterns

    monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    job = {"kind": "numpy_pipeline", "threads": 1, "calls": 1, "cell": "GRU",
           "shape": [2, 1, 4, 4], "product": 8}
    seen = {name: patterns.run_worker({**job, **update})["openblas_thread_timeout"]
            for name, update in patterns.PIPELINE_VARIANTS.items()}
    assert seen == {"OpenBLAS default": None, "OPENBLAS_THREAD_TIMEOUT=4": "4"}


def test_patterns_prints_and_writes_every_figure(tmp_path, capsys):
    pytest.importorskip("torch")
    out_json = tmp_path / "patterns.json"
    # One process pair per case: the slowest test of the suite at two (each worker
    # starts an interpreter and imports torch), and one pair makes every ratio exact.
    rc = bench.main(["--patterns", "--tiny", "--cells", "GRU", "--shapes", "stream", "--pairs", "1",
                     "--json", str(out_json)])
    assert rc == 0
    printed = capsys.readouterr().out
    for text in ("call patterns", "cpu features", "process pairs per case", "gap", "after pools",
                 "numpy pipeline", "timeout=4", "cell loop", "frame loop", "frozen chunk loop", "adapter training",
                 "frame training", "vs torch", "x own"):
        assert text in printed
    data = json.loads(out_json.read_text())
    assert data["pairs"] == 1
    rows = data["rows"]
    gaps = [r for r in rows if r["pattern"] == "gap"]
    assert [r["gap_ms"] for r in gaps] == [0, 1]  # --tiny: the first two gaps
    assert all(r["vs_back_to_back"][impl] == pytest.approx(1.0) for impl in ("torch", "lstmfast")
               for r in gaps[:1])
    (after,) = [r for r in rows if r["pattern"] == "after pools"]
    assert set(after["seconds"]) == {"fresh", "after torch+OpenBLAS"}
    (pipeline,) = [r for r in rows if r["pattern"] == "numpy pipeline"]
    assert set(pipeline["seconds"]) == {"OpenBLAS default", "OPENBLAS_THREAD_TIMEOUT=4"}
    assert {r["pattern"] for r in rows} == {"gap", "after pools", "numpy pipeline", "cell loop",
                                            "frame loop", "chunk loop", "frozen cell loop",
                                            "frozen frame loop", "frozen chunk loop",
                                            "adapter training", "frame training"}
    for r in rows:
        seconds, q = r["seconds"], r["ratio"]
        assert all(v > 0 for v in seconds.values())
        over, under = {"after pools": ("after torch+OpenBLAS", "fresh"),
                       "numpy pipeline": ("OpenBLAS default", "OPENBLAS_THREAD_TIMEOUT=4")}.get(
                           r["pattern"], ("torch", "lstmfast"))
        assert q["min"] == q["median"] == q["max"] == pytest.approx(seconds[over] / seconds[under])


def test_models_refuses_a_model_whose_outputs_disagree(tmp_path, capsys, monkeypatch, models):
    real_load = models.load_check_outputs

    def load_with_a_wrong_accelerated_output(path):
        outputs = real_load(path)
        for key, value in outputs["accelerated"].items():
            outputs["accelerated"][key] = value * (1 + 10 * models.AGREEMENT_RTOL)
        return outputs

    jobs = []
    real_run_worker = models.run_worker

    def recording_run_worker(job):
        jobs.append(job["kind"])
        return real_run_worker(job)

    monkeypatch.setattr(models, "load_check_outputs", load_with_a_wrong_accelerated_output)
    monkeypatch.setattr(models, "run_worker", recording_run_worker)
    out_json = tmp_path / "models.json"
    rc = bench.main(["--models", "wavernn_gen", "--tiny", "--quick", "--json", str(out_json)])
    assert rc != 0
    assert "REFUSED" in capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert data["results"] == []
    (refused,) = data["refused"]
    assert refused["model"] == "wavernn_gen" and refused["max_rel_diff"] > data["agreement_rtol"]
    assert jobs == ["check"]  # nothing was timed


def test_models_frozen_times_freezes_copy_for_inference(tmp_path, capsys, models, torch_threads_restored):
    # --frozen: the inference rows time lstmfast.torch.freeze's copy, the training rows
    # accelerate(model) as without it; the agreement check compares the same forms.
    model, _, _ = models.build("cell_loop", True)
    frozen = models._accelerated(model, "inference", True)
    assert frozen is not model and all(m._lstmfast_frozen for m in models.rnn_modules(frozen))
    trained = models._accelerated(model, "training", True)
    assert trained is model and not any(m._lstmfast_frozen for m in models.rnn_modules(model))
    assert all(p.requires_grad for p in model.parameters())
    outputs_path = tmp_path / "outputs.npz"
    models.model_outputs("cell_loop", True, 1, outputs_path, frozen=True)
    error, _ = models.compare_outputs(models.load_check_outputs(outputs_path))
    assert error <= models.AGREEMENT_RTOL
    out_json = tmp_path / "models.json"
    rc = bench.main(["--models", "wavernn_gen", "--tiny", "--quick", "--pairs", "1", "--frozen",
                     "--json", str(out_json)])
    assert rc == 0
    assert "inference frozen (lstmfast.torch.freeze)" in capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert "freeze" in data["config"]["accelerated"]
    (row,) = data["results"]
    assert row["mode"] == "inference" and row["frozen"] is True
    with pytest.raises(SystemExit):
        bench.main(["--frozen"])
    assert "--frozen goes with --models" in capsys.readouterr().err


def test_models_time_the_modes_asked_for(tmp_path, capsys, models, monkeypatch):
    # Which (model, mode) pairs run is all this tests: the measurements are stand-ins.
    measured = []

    def measure(name, mode, threads, tiny, repeats, pairs, frozen):
        measured.append((name, mode))
        return {"model": name, "mode": mode, "threads": threads, "seconds": {"torch": 2.0, "accelerated": 1.0},
                "ratio": 2.0, "ratio_min": 2.0, "ratio_max": 2.0, "expected": None, "of_expected": None,
                "rnn_share": {"torch": 0.5, "accelerated": 0.5}, "rnn_share_of": "call",
                "rnn_ratio_in_model": None, "rnn_ratio_alone": None, "accelerated_modules": 1, "rnn_modules": 1}

    monkeypatch.setattr(models, "measure", measure)
    monkeypatch.setattr(models, "check_agreement", lambda name, tiny, threads, frozen: {
        "agree": True, "compared": 1, "max_rel_diff": 0.0, "where": "-"})
    assert bench.main(["--models", "cell_loop,wavernn_gen", "--modes", "training", "--tiny", "--quick",
                       "--threads", "1"]) == 0
    assert measured == [("cell_loop", "training")]
    assert "not timed: it runs inference only, and --modes asked for training" in capsys.readouterr().out
    measured.clear()
    assert bench.main(["--models", "cell_loop", "--tiny", "--quick", "--threads", "1"]) == 0
    assert measured == [("cell_loop", "inference"), ("cell_loop", "training")]  # every mode by default


def test_models_rejects_unknown_names(models, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--models", "crnn,no_such_model", "--tiny"])
    assert "no_such_model" in capsys.readouterr().err


def _tiny_job(models, name, mode, impl):
    repeats = models.Repeats.for_run(quick=True, tiny=True)
    return {"model": name, "mode": mode, "impl": impl, "threads": 1, "tiny": True, "repeats": repeats.__dict__}


@pytest.mark.parametrize("name", ["crnn", "crnn_int8", "gru_forecaster", "bilstm3", "deepspeech", "wavernn_gen",
                                  "tacotron_dec", "cell_loop"])
def test_every_model_agrees_and_measures_in_process(name, tmp_path, models, torch_threads_restored):
    # The workers' own functions, in this process and at tiny sizes: every model builds,
    # its accelerated outputs (and gradients) agree with torch's, and each measure is sane.
    spec = models.MODELS[name]
    path = tmp_path / "outputs.npz"
    models.model_outputs(name, True, 1, str(path))
    error, where = models.compare_outputs(models.load_check_outputs(path))
    assert error <= spec.agreement_rtol, f"{name}: {where} differs by {error:.3g}"
    if name == "crnn_int8":  # torch's int8 LSTMs, run by lstmfast's int8 kernels once accelerated
        model, _, _ = models.build(name, tiny=True)
        assert {type(m).__name__ for m in models.rnn_modules(model)} == {"LSTM"}
        assert models.accelerated_count(lstmfast_torch().accelerate(model)) == 2

    model, inputs, _ = models.build(name, tiny=True)
    rnn_calls = []
    for m in models.rnn_modules(model):
        m.register_forward_hook(lambda *args: rnn_calls.append(1))
    with __import__("torch").no_grad():
        model(*inputs)
    for mode in spec.modes:
        for impl in models.IMPLEMENTATIONS:
            measured = models.measure_model(_tiny_job(models, name, mode, impl))
            assert measured["seconds"] > 0 and 0 < measured["rnn_share"] <= 1
            assert measured["rnn_modules"] == len(models.rnn_modules(model))
            alone = models.measure_rnn_alone(_tiny_job(models, name, mode, impl))
            assert alone["seconds"] > 0 and alone["calls"] == len(rnn_calls)
            assert ("step_seconds" in alone) == (mode == "training")


def lstmfast_torch():
    import lstmfast.torch

    return lstmfast.torch


# --- python -m lstmfast.bench --peers ---------------------------------------------

@pytest.fixture
def peers(monkeypatch):
    from lstmfast.bench import peers

    # Blocks of one call at tiny sizes: the pause for spinning thread pools would be
    # nearly all of the test's time.
    monkeypatch.setattr(common, "PAUSE", 0.0)
    return peers


def _run_peers(tmp_path, *options):
    out_json = tmp_path / "peers.json"
    rc = bench.main(["--peers", "--tiny", "--threads", "1", "--rounds", "1", "--min-time", "0",
                     "--json", str(out_json), *options])
    assert rc == 0
    return json.loads(out_json.read_text())


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_onnx_graph_computes_torch_layer(cell, bias, peers):
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    T, N, I, H = 6, 3, 5, 7  # noqa: E741  (I != H: a transposed weight cannot pass)
    module = getattr(torch.nn, cell)(I, H, bias=bias).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            # Biases as large as the weights' products: a bias in the wrong gate must show.
            p.copy_(torch.randn(p.shape, generator=generator) * (1.0 if name.startswith("bias") else 0.5))
    state = {k: v.numpy() for k, v in module.state_dict().items()}
    x = np.random.default_rng(1).standard_normal((T, N, I)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x))[0].numpy()

    model = peers.onnx_model(cell, state, I, H)
    assert [n.input for n in model.graph.node][0][-1] == ("B" if bias else "R")
    (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})
    assert y.shape == (T, 1, N, H)
    err = np.abs(y[:, 0] - expected).max()
    assert err <= 1e-4, f"{cell}: ORT differs from torch by {err:.3g}"


def test_onnx_graph_refuses_what_one_node_cannot_hold(peers):
    state = {"weight_ih_l0": np.zeros((8, 3)), "weight_hh_l0": np.zeros((8, 2)),
             "weight_ih_l0_reverse": np.zeros((8, 3)), "weight_hh_l0_reverse": np.zeros((8, 2))}
    with pytest.raises(ValueError, match="one direction"):
        peers.onnx_model("LSTM", state, 3, 2)
    with pytest.raises(ValueError, match="LSTM or GRU"):
        peers.onnx_model("RNN", state, 3, 2)


def test_peers_time_every_precision_on_a_tiny_shape(tmp_path, capsys, peers):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import lstmfast

    data = _run_peers(tmp_path)
    printed = capsys.readouterr().out
    simd = lstmfast._config.simd_target()
    for text in ("simd_target", "onnxruntime", "torch quantized engine", "vs torch", "vs ORT", "int8/float32",
                 "frozen/float32", "lstmfast frozen vs onnxruntime float32: geomean",
                 f"peers, inference, 1 thread, simd {simd}:", "lstmfast int8 vs torch int8: geomean",
                 "lstmfast float32 vs onnxruntime float32: geomean"):
        assert text in printed, text

    lstmfast_keys = {"lstmfast float32", "lstmfast frozen"} | (
        {"lstmfast int8", "lstmfast bfloat16"} if hasattr(lstmfast, "quantize") else set())
    rows = {r["cell"]: r for r in data["results"]}
    assert sorted(rows) == ["GRU", "LSTM"]
    peer_keys = {"torch float32", "torch int8", "torch bfloat16", "onnxruntime float32"}
    assert set(rows["LSTM"]["seconds"]) == lstmfast_keys | peer_keys | {"onnxruntime int8"}
    # ORT has no integer GRU: its quantize_dynamic leaves the node alone, and the bench says so.
    assert set(rows["GRU"]["seconds"]) == lstmfast_keys | peer_keys
    assert any("onnxruntime int8 GRU" in note and "float32" in note for note in data["notes"])
    assert any("DynamicQuantizeLSTM" in note for note in data["notes"])

    for r in data["results"]:
        assert r["simd_target"] == simd and r["threads"] == 1
        assert all(s > 0 for s in r["seconds"].values())
        for name, diff in r["max_rel_diff"].items():
            precision = name.split()[1]
            assert diff <= peers.TOLERANCE[precision], name
            if precision in ("int8", "bfloat16"):
                # really reduced: a peer that quietly stayed float32 would agree to 1e-6
                assert diff > 1e-5, name
        s = r["seconds"]
        for ratio_name, ratio in r["ratios"].items():
            mine, theirs = ratio_name.split(" vs ")
            assert ratio == pytest.approx(s[theirs] / s[f"lstmfast {mine}"]), ratio_name
        assert "float32 vs torch float32" in r["ratios"] and "float32 vs onnxruntime float32" in r["ratios"]
        assert "frozen vs torch float32" in r["ratios"] and "frozen vs onnxruntime float32" in r["ratios"]
        if "lstmfast int8" in s:
            assert {"int8 vs torch int8", "int8 vs torch float32", "bfloat16 vs torch bfloat16"} <= set(r["ratios"])
    assert "int8 vs onnxruntime int8" in rows["LSTM"]["ratios"]
    assert "int8 vs onnxruntime int8" not in rows["GRU"]["ratios"]
    assert data["summary"]["float32 vs torch float32, 1 threads"]["cases"] == 2


def test_time_interleaved_runs_before_each_ahead_of_every_timed_call(monkeypatch):
    monkeypatch.setattr(common, "PAUSE", 0.0)
    log = []
    seconds = common.time_interleaved({"a": lambda: log.append("a"), "b": lambda: log.append("b")},
                                      1, 2, 0.0, None, None, before_each=lambda: log.append("-"))
    assert set(seconds) == {"a", "b"}
    # each block: one warm call, then timed calls, each right after a sweep
    text = "".join(log)
    assert text.count("-") == len(text) - text.count("-") - 4  # 2 rounds x 2 runners warm
    assert "--" not in text and not text.endswith("-")
    assert all(text[i + 1] in "ab" for i, c in enumerate(text) if c == "-")


def test_evict_caches_writes_more_than_a_last_level_cache():
    common.evict_caches()
    assert common._sweep.nbytes == common.SWEEP_BYTES >= 64 << 20


def test_peers_cold_says_so(tmp_path, capsys, peers):
    data = _run_peers(tmp_path, "--cells", "GRU", "--cold", "--no-torch")
    printed = capsys.readouterr().out
    assert "caches cold" in printed and "sweep of 64 MB" in data["config"]["calls"]
    (row,) = data["results"]
    assert row["seconds"]["lstmfast frozen"] > 0
    with pytest.raises(SystemExit):
        bench.main(["--cold"])
    assert "--cold goes with --peers" in capsys.readouterr().err


def test_peers_time_the_chunk_shape_when_asked_and_the_grid_by_default(tmp_path, peers,
                                                                     monkeypatch):
    # chunk (a stream fed ten frames per call) is no grid shape: only by name.
    from lstmfast.bench import grid

    asked = {}
    monkeypatch.setattr(grid, "run", lambda cells, shapes, *a, **k: asked.setdefault("shapes", shapes) and 0)
    bench.main([])
    assert asked["shapes"] == ["stream", "small", "medium", "large", "wide"]
    out_json = tmp_path / "chunk.json"
    assert bench.main(["--peers", "--cells", "GRU", "--shapes", "chunk", "--threads", "1",
                       "--rounds", "1", "--min-time", "0", "--no-torch", "--json",
                       str(out_json)]) == 0
    (row,) = json.loads(out_json.read_text())["results"]
    assert (row["shape"], row["T"], row["N"], row["I"], row["H"]) == ("chunk", 10, 1, 128, 128)
    assert {"lstmfast float32", "lstmfast frozen"} <= set(row["seconds"])


@pytest.mark.parametrize("missing", ["onnxruntime", "torch", "lstmfast.quantize", "lstmfast.freeze"])
def test_peers_skip_a_missing_package_with_a_note(missing, tmp_path, capsys, monkeypatch, peers):
    import lstmfast

    installed = {who for who in ("torch", "onnxruntime") if importlib.util.find_spec(who)}
    if missing.startswith("lstmfast."):
        monkeypatch.delattr(lstmfast, missing.removeprefix("lstmfast."), raising=False)
    else:
        # None in sys.modules makes `import` raise ImportError, as when it is not installed.
        monkeypatch.setitem(sys.modules, missing, None)
    data = _run_peers(tmp_path, "--cells", "LSTM")
    printed = capsys.readouterr().out

    (row,) = data["results"]
    assert "lstmfast float32" in row["seconds"]
    if missing == "lstmfast.quantize":
        gone, note = {"lstmfast int8", "lstmfast bfloat16"}, "lstmfast int8: this lstmfast has no lstmfast.quantize"
    elif missing == "lstmfast.freeze":
        gone, note = {"lstmfast frozen"}, "lstmfast frozen: this lstmfast has no lstmfast.freeze"
    else:
        gone = {f"{missing} {p}" for p in ("float32", "int8", "bfloat16")}
        note = f"{missing}: not installed" if missing == "torch" else "onnxruntime: onnxruntime is not installed"
    assert not gone & set(row["seconds"]) and not gone & set(row["max_rel_diff"])
    assert not any(name.split(" vs ")[1] in gone or f"lstmfast {name.split()[0]}" in gone for name in row["ratios"])
    assert note in printed and any(n.startswith(note) for n in data["notes"])
    # the peers that are there still run
    for who in installed - {missing}:
        assert f"{who} float32" in row["seconds"], who


def _peers_row(cell, seconds):
    ratios = {f"{mine.split()[1]} vs {theirs}": seconds[theirs] / seconds[mine]
              for mine in seconds if mine.startswith("lstmfast") for theirs in seconds
              if not theirs.startswith("lstmfast")}
    return {"cell": cell, "shape": "tiny", "threads": 1, "T": 4, "N": 2, "I": 8, "H": 8, "simd_target": "x",
            "seconds": dict(seconds), "max_rel_diff": {name: 1e-7 for name in seconds}, "ratios": ratios}


def test_combine_runs_gives_median_times_and_each_ratios_range(peers):
    runs = [[_peers_row("LSTM", {"lstmfast float32": a, "onnxruntime float32": b, "torch float32": 5.0})]
            for a, b in ((1.0, 3.0), (2.0, 2.0), (4.0, 2.5))]
    del runs[1][0]["seconds"]["torch float32"]  # left out of one run: out of the combined row
    (row,) = peers.combine_runs(runs)
    assert row["seconds"] == {"lstmfast float32": 2.0, "onnxruntime float32": 2.5}
    # the ratio of the median times, with the range of the runs' own ratios
    assert row["ratios"] == {"float32 vs onnxruntime float32": 1.25}
    assert row["ratio_range"] == {"float32 vs onnxruntime float32": [0.625, 3.0]}
    with pytest.raises(ValueError, match="same cases"):
        peers.combine_runs([runs[0], [_peers_row("GRU", {"lstmfast float32": 1.0})]])


def test_peers_repeat_runs_each_time_in_a_fresh_process(tmp_path, capsys, peers, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")

    def not_here(*args, **kwargs):
        raise AssertionError("--repeat measured in the parent process")
    monkeypatch.setattr(peers, "measure_case", not_here)
    out_json = tmp_path / "repeat.json"
    assert bench.main(["--peers", "--tiny", "--repeat", "2", "--cells", "GRU", "--threads", "1", "--rounds", "1",
                       "--min-time", "0", "--no-torch", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert len(data["runs"]) == 2
    (row,) = data["results"]
    for name, seconds in row["seconds"].items():
        assert seconds == pytest.approx(np.median([run[0]["seconds"][name] for run in data["runs"]])), name
    for name, (least, most) in row["ratio_range"].items():
        assert [least, most] == [min(run[0]["ratios"][name] for run in data["runs"]),
                                 max(run[0]["ratios"][name] for run in data["runs"])], name
    assert {"lstmfast float32", "lstmfast frozen", "onnxruntime float32"} <= set(row["seconds"])
    for text in ("2 runs, each in a fresh process", "each ratio over the 2 runs",
                 "the median times of 2 runs", "float32 vs onnxruntime float32"):
        assert text in printed, text


def test_repeat_goes_with_peers_and_is_positive(capsys):
    for options in (["--repeat", "2"], ["--peers", "--repeat", "0"]):
        with pytest.raises(SystemExit):
            bench.main(options)
    err = capsys.readouterr().err
    assert "--repeat goes with --peers" in err and "--repeat must be positive, got 0" in err


def test_peers_refuse_training_and_the_grid_only_options(peers, capsys):
    for options in (["--modes", "training"], ["--memory"]):
        with pytest.raises(SystemExit):
            bench.main(["--peers", "--tiny", *options])
    assert "--peers" in capsys.readouterr().err


# --- python -m lstmfast.bench --variants ------------------------------------------

def test_variants_time_every_variant_after_checking_it(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setattr(common, "PAUSE", 0.0)
    out_json = tmp_path / "variants.json"
    rc = bench.main(["--variants", "--tiny", "--threads", "1", "--rounds", "1", "--min-time", "0",
                     "--json", str(out_json)])
    assert rc == 0
    rows = json.loads(out_json.read_text())["results"]
    assert {(r["variant"], r["mode"]) for r in rows} == {
        (v, m) for v in ("peephole", "ln_lstm", "ctrnn", "hard_sigmoid")
        for m in ("inference", "training")} | {
        ("rec_dropout", "training"), ("zoneout", "training")}
    for row in rows:
        assert row["max_rel_diff"] <= 1e-4
        assert set(row["seconds"]) == {"torch loop", "lstmfast", "plain"}
        assert all(t > 0 for t in row["seconds"].values())
    assert "vs loop" in capsys.readouterr().out


def test_variants_take_a_subset_by_name(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    monkeypatch.setattr(common, "PAUSE", 0.0)
    out_json = tmp_path / "variants.json"
    rc = bench.main(["--variants", "hard_sigmoid,ctrnn", "--tiny", "--threads", "1", "--rounds",
                     "1", "--min-time", "0", "--modes", "inference", "--json", str(out_json)])
    assert rc == 0
    rows = json.loads(out_json.read_text())["results"]
    assert {r["variant"] for r in rows} == {"hard_sigmoid", "ctrnn"}
    with pytest.raises(SystemExit):
        bench.main(["--variants", "hard_sigmoid,nonesuch", "--tiny"])
    assert "unknown nonesuch" in capsys.readouterr().err


def test_variants_refuse_an_implementation_that_disagrees(monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    from lstmfast.bench import variants

    real = variants._peephole_modules

    def broken(sizes):
        loop, ours, plain = real(sizes)
        with torch.no_grad():
            ours.weight_co_l0.add_(0.5)
        return loop, ours, plain

    monkeypatch.setitem(variants.VARIANTS["peephole"], "modules", broken)
    assert variants.run(["peephole"], [1], 1, 0.0, tiny=True) == 1
    assert "REFUSED" in capsys.readouterr().out


def test_onnx_file_times_every_recurrent_node(tmp_path, capsys, monkeypatch, threads_restored):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import onnx

    import lstmfast
    from lstmfast.bench import main

    monkeypatch.setattr(common, "PAUSE", 0.0)
    lstm = lstmfast.LSTM(3, 4, num_layers=2, seed=0).to_onnx()
    gru = lstmfast.GRU(3, 5, seed=1, linear_before_reset=False).to_onnx()
    for node in gru.graph.node:  # a second model's nodes and weights, renamed, in the first
        node.name = "g_" + node.name
    for t in gru.graph.initializer:
        if t.name.startswith(("W", "R", "B")):
            t.name = "g_" + t.name
            lstm.graph.initializer.append(t)
    recurrent = [n for n in gru.graph.node if n.op_type == "GRU"][0]
    recurrent.input[1:4] = ["g_" + name for name in recurrent.input[1:4]]
    recurrent.input[0] = "input"
    recurrent.input[5] = ""
    recurrent.output[:] = ["gY", "gY_h"]
    lstm.graph.node.append(recurrent)
    path, out = tmp_path / "m.onnx", tmp_path / "r.json"
    onnx.save(lstm, str(path))
    assert main(["--onnx", str(path), "--onnx-shape", "4,2", "--threads", "1", "--rounds", "1",
                 "--min-time", "0.001", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "against ONNX Runtime" in printed and "vs ORT" in printed
    rows = json.loads(out.read_text())["results"]
    assert [(r["node"], r["op"], r["precision"]) for r in rows] == [
        ("lstm_l0", "LSTM", "float32"), ("lstm_l0", "LSTM", "frozen"), ("lstm_l0", "LSTM", "int8"),
        ("lstm_l1", "LSTM", "float32"), ("lstm_l1", "LSTM", "frozen"), ("lstm_l1", "LSTM", "int8"),
        ("g_gru_l0", "GRU", "float32"), ("g_gru_l0", "GRU", "frozen")]
    for r in rows:
        assert (r["T"], r["N"]) == (4, 2) and set(r["seconds"]) == {"lstmfast", "onnxruntime"}
        assert r["ratio"] > 0


def test_onnx_mode_refuses_a_bad_shape(capsys, tmp_path):
    from lstmfast.bench import main

    with pytest.raises(SystemExit):
        main(["--onnx", str(tmp_path / "m.onnx"), "--onnx-shape", "4"])
    assert "--onnx-shape: expected T,N" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--onnx-shape", "4,2"])
    assert "--onnx-shape goes with --onnx" in capsys.readouterr().err
