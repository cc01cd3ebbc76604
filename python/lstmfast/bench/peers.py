"""``python -m lstmfast.bench --peers``: lstmfast's inference against what a user would
pick instead of it, precision matched with precision.

The implementations, over the grid's cells, shapes and thread counts:

* lstmfast float32 (the fused kernels), the same layer frozen (``lstmfast.freeze``: its
  weights packed once, as ONNX Runtime's session packs them), and
  ``lstmfast.quantize(layer, "int8")`` and ``"bfloat16"``;
* torch float32: ``nn.LSTM`` / ``nn.GRU`` in eval mode under ``torch.inference_mode()``;
* torch int8: ``torch.ao.quantization.quantize_dynamic`` with qint8 weights;
* torch bfloat16: the float32 module under ``torch.autocast("cpu", dtype=torch.bfloat16)``;
* ONNX Runtime float32: a graph of one ``LSTM`` / ``GRU`` node built with ``onnx.helper``,
  its weights initializers, so that ORT packs them once when the session is created;
* ONNX Runtime int8: ``onnxruntime.quantization.quantize_dynamic`` of that graph.

With ``--cold`` every timed call comes after a sweep of memory that evicts the caches
(``common.evict_caches``), as a server's call finds them after other work. With
``--repeat R`` the same cases run R times, each time in a fresh process, and the table
gives each time's median over the runs and each ratio's range: one run cannot tell a
change of a few percent from the host's moods.

A peer whose package is missing, or that cannot run a case as asked, is left out with
a printed note that says why. Every implementation starts from the same weights and
input, and its output is checked against the NumPy reference before any figure is
taken: float32 to 1e-4, the reduced precisions to ``TOLERANCE``; each one's difference
is printed beside its time, since a reduced precision is judged by both.
"""

import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import warnings

import numpy as np

import lstmfast
from lstmfast.bench import common

PRECISIONS = ("float32", "int8", "bfloat16")
# lstmfast's, with "frozen": float32 from lstmfast.freeze.
LSTMFAST_PRECISIONS = ("float32", "frozen", "int8", "bfloat16")
PEERS = ("torch", "onnxruntime")
# max |output - reference| / max(1, max |reference|): float32 as the rest of the bench;
# the reduced bounds sit a few times above what int8 and bfloat16 weights give on the
# grid (about 0.02 and 0.01), and far below what a mistake (a gate out of order) gives.
TOLERANCE = {"float32": 1e-4, "frozen": 1e-4, "int8": 0.1, "bfloat16": 0.05}
# The table's lines: lstmfast in one precision against the peers in another.
PAIRINGS = (("float32", "float32"), ("frozen", "float32"), ("int8", "int8"), ("bfloat16", "bfloat16"),
            ("int8", "float32"))
TINY_SHAPE = (4, 2, 8, 8)

# ONNX's gate blocks in torch's: LSTM iofc from ifgo, GRU zrh from rzn.
ONNX_GATE_ORDER = {"LSTM": (0, 3, 1, 2), "GRU": (1, 0, 2)}
ONNX_OPSET = 17
# onnxruntime refuses a model whose IR version is newer than it knows; opset 17 needs 8.
ONNX_IR_VERSION = 8


class Skipped(Exception):
    """An implementation left out of a case; the message is the note printed."""


def key(who, precision):
    return f"{who} {precision}"


# ---------------------------------------------------------------------------
# ONNX graphs


def _onnx_gates(cell, array):
    blocks = np.split(np.asarray(array, dtype=np.float32), len(ONNX_GATE_ORDER[cell]), axis=0)
    return np.concatenate([blocks[k] for k in ONNX_GATE_ORDER[cell]], axis=0)


def onnx_model(cell, state_dict, input_size, hidden_size):
    """An ONNX model of one ``LSTM`` or ``GRU`` node computing torch's one-layer,
    one-direction layer of ``state_dict`` (torch's names and layout): input ``X`` (T, N, I),
    output ``Y`` (T, 1, N, H), zero initial state."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if cell not in ONNX_GATE_ORDER:
        raise ValueError(f"onnx_model: cell must be LSTM or GRU, got {cell!r}")
    extra = sorted(k for k in state_dict if not k.endswith("_l0"))
    if extra:
        raise ValueError(f"onnx_model: one layer in one direction only; the state also holds {extra}")
    # ONNX keeps a leading axis for the direction.
    weights = {"W": _onnx_gates(cell, state_dict["weight_ih_l0"])[None],
               "R": _onnx_gates(cell, state_dict["weight_hh_l0"])[None]}
    if "bias_ih_l0" in state_dict:
        weights["B"] = np.concatenate([_onnx_gates(cell, state_dict["bias_ih_l0"]),
                                       _onnx_gates(cell, state_dict["bias_hh_l0"])])[None]
    attributes = {"hidden_size": hidden_size}
    if cell == "GRU":
        # torch applies the reset gate after the recurrent product and its bias.
        attributes["linear_before_reset"] = 1
    node = helper.make_node(cell, ["X", *weights], ["Y"], **attributes)
    graph = helper.make_graph(
        [node], cell.lower(),
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "N", input_size])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["T", 1, "N", hidden_size])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                              ir_version=ONNX_IR_VERSION)
    onnx.checker.check_model(model)
    return model


# ---------------------------------------------------------------------------
# The implementations. Each builder returns a function of no argument that runs the
# case's input through it and returns the output (T, N, H); or raises Skipped.


def _build_lstmfast(ctx, case, layer, x, precision):
    if precision == "frozen":
        freeze = getattr(lstmfast, "freeze", None)
        if freeze is None:
            raise Skipped("lstmfast frozen: this lstmfast has no lstmfast.freeze")
        layer = freeze(layer)
    elif precision != "float32":
        quantize = getattr(lstmfast, "quantize", None)
        if quantize is None:
            raise Skipped(f"lstmfast {precision}: this lstmfast has no lstmfast.quantize")
        layer = quantize(layer, precision)

    def run():
        return layer(x)[0]
    return run


def _torch_module(torch, case, state):
    module = getattr(torch.nn, case.cell)(case.I, case.H)
    module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
    return module.eval()


def _build_torch(ctx, case, state, x, precision):
    torch = ctx["torch"]
    module = _torch_module(torch, case, state)
    xt = torch.from_numpy(x)
    if precision == "int8":
        module = _torch_int8(torch, case, module)
    elif precision == "bfloat16":
        return _torch_bfloat16(ctx, torch, case, module, xt)

    def run():
        with torch.inference_mode():
            return module(xt)[0]
    return run


def _torch_int8(torch, case, module):
    with warnings.catch_warnings():
        # torch.ao.quantization and its quantized tensors are deprecated for torchao, which
        # has no dynamic LSTM or GRU: this is still the way to an int8 LSTM in torch.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)
        try:
            from torch.ao.quantization import quantize_dynamic
        except ImportError:
            raise Skipped("torch int8: this torch has no torch.ao.quantization.quantize_dynamic") from None
        # It swaps the children of the module it is given, never that module itself: a
        # bare nn.LSTM would come back unchanged, in float32.
        wrapped = quantize_dynamic(torch.nn.Sequential(module), {torch.nn.LSTM, torch.nn.GRU}, dtype=torch.qint8)
    quantized = wrapped[0]
    if type(quantized) is type(module):
        raise Skipped(f"torch int8 {case.cell}: quantize_dynamic left the module in float32")
    return quantized


def _torch_bfloat16(ctx, torch, case, module, xt):
    def autocast_run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return module(xt)[0]

    try:
        autocast_run()
        return autocast_run
    except RuntimeError as error:
        reason = str(error).split(". ")[0].splitlines()[0] if str(error) else type(error).__name__
    # Autocast sends the LSTM to oneDNN, which on some CPUs (AVX2 ones, for a start) has
    # no bfloat16 LSTM to give; a user would then cast the module instead.
    ctx["note"](f"torch bfloat16 {case.cell}: autocast fails here ({reason}); timed instead: the module "
                f"cast to bfloat16, with the input cast to bfloat16 and the output to float32 in the call")
    module = copy.deepcopy(module).to(torch.bfloat16)

    def cast_run():
        with torch.inference_mode():
            return module(xt.to(torch.bfloat16))[0].float()
    return cast_run


def _build_onnxruntime(ctx, case, state, x, precision):
    ort = ctx["onnxruntime"]
    model = onnx_model(case.cell, state, case.I, case.H)
    if precision == "float32":
        session = common.ort_session(ort, model.SerializeToString(), case.threads)
    else:
        path, op_types = common.onnx_int8_model(model, ctx["workdir"], f"{case.cell}_{case.shape_name}")
        if not any(op.startswith("DynamicQuantize") for op in op_types):
            raise Skipped(f"onnxruntime int8 {case.cell}: quantize_dynamic leaves the {case.cell} node in "
                          f"float32 (its graph: {', '.join(op_types)}); nothing int8 to time")
        ctx["note"](f"onnxruntime int8 {case.cell}: quantize_dynamic(reduce_range=True) made the "
                    f"{case.cell} node {', '.join(op_types)}")
        session = common.ort_session(ort, path, case.threads)

    def run():
        return session.run(None, {"X": x})[0][:, 0]
    return run


BUILDERS = {"lstmfast": _build_lstmfast, "torch": _build_torch, "onnxruntime": _build_onnxruntime}


def _as_array(output):
    if hasattr(output, "detach"):
        output = output.detach().float().numpy()
    return np.asarray(output, dtype=np.float64)


# ---------------------------------------------------------------------------
# The run


def import_peers(no_torch=False):
    """(modules by peer name, notes): the peers' packages that import, and a note for each
    one that does not."""
    modules, notes = {}, []
    if no_torch:
        notes.append("torch: left out (--no-torch)")
    else:
        torch = common.try_import_torch()
        if torch is None:
            notes.append("torch: not installed; no torch figures (pip install torch)")
        else:
            modules["torch"] = torch
    try:
        import onnx  # noqa: F401  (builds the graphs)
        import onnxruntime
        import onnxruntime.quantization  # noqa: F401
    except ImportError as error:
        notes.append(f"onnxruntime: {error.name or 'onnx or onnxruntime'} is not installed; no ONNX Runtime "
                     f"figures (pip install onnx onnxruntime)")
    else:
        modules["onnxruntime"] = onnxruntime
    return modules, notes


def measure_case(case, ctx, rounds, min_time, limiter, cold=False):
    """One row: each implementation checked against the reference, then timed."""
    x, _ = case.make_inputs()
    reference_layer = getattr(lstmfast, case.cell)(case.I, case.H, backend="numpy", seed=0).eval()
    state = reference_layer.state_dict()
    reference = np.asarray(reference_layer(x)[0], dtype=np.float64)
    scale = max(1.0, np.abs(reference).max())
    layer = getattr(lstmfast, case.cell)(case.I, case.H, backend=ctx["backend"], seed=0).eval()
    layer.load_state_dict(state)

    runners, differences = {}, {}
    for who in ("lstmfast", *PEERS):
        if who != "lstmfast" and who not in ctx:
            continue
        for precision in LSTMFAST_PRECISIONS if who == "lstmfast" else PRECISIONS:
            if who == "onnxruntime" and precision == "bfloat16":
                continue  # ORT's CPU LSTM and GRU kernels are float32 only
            try:
                run = BUILDERS[who](ctx, case, layer if who == "lstmfast" else state, x, precision)
            except Skipped as skipped:
                ctx["note"](str(skipped))
                continue
            difference = np.abs(_as_array(run()) - reference).max() / scale
            if not difference <= TOLERANCE[precision]:
                raise AssertionError(f"{case.label}: {key(who, precision)} differs from the reference by "
                                     f"{difference:.3g} (tolerance {TOLERANCE[precision]})")
            runners[key(who, precision)] = run
            differences[key(who, precision)] = float(difference)
    seconds = common.time_interleaved(runners, case.threads, rounds, min_time, ctx.get("torch"), limiter,
                                      before_each=common.evict_caches if cold else None)
    ratios = {}
    for mine, theirs in PAIRINGS:
        for who in PEERS:
            if key("lstmfast", mine) in seconds and key(who, theirs) in seconds:
                ratios[f"{mine} vs {key(who, theirs)}"] = seconds[key(who, theirs)] / seconds[key("lstmfast", mine)]
    return {"cell": case.cell, "shape": case.shape_name, "threads": case.threads,
            "T": case.T, "N": case.N, "I": case.I, "H": case.H, "simd_target": lstmfast._config.simd_target(),
            "seconds": seconds, "max_rel_diff": differences, "ratios": ratios}


def run(cells, shapes, threads, rounds, min_time, no_torch=False, tiny=False, json_path=None, cold=False):
    modules, notes = import_peers(no_torch)
    torch = modules.get("torch")
    limiter = common.blas_thread_limiter()
    backend = "fused" if common.fused_available() else "numpy"
    if backend == "numpy":
        notes.append("lstmfast: the fused kernels are not built; its figures are the NumPy reference's")

    config = common.configuration(torch, limiter)
    if torch is not None:
        config["torch cpu capability"] = torch.backends.cpu.get_cpu_capability()
        config["torch quantized engine"] = torch.backends.quantized.engine
    if "onnxruntime" in modules:
        import onnx

        config["onnx"] = onnx.__version__
        config["onnxruntime"] = modules["onnxruntime"].__version__
    config["implementations"] = ", ".join(["lstmfast", *modules])
    config["calls"] = (f"each after a sweep of {common.SWEEP_BYTES >> 20} MB of memory (caches cold)"
                       if cold else "back to back (caches warm)")
    print_header("lstmfast benchmark: inference against its peers", config, notes)

    case_notes = []

    def note(text):
        if text not in case_notes:
            case_notes.append(text)

    if tiny:
        cases = [common.Case(c, "tiny", "inference", t, shape=TINY_SHAPE) for t in threads for c in cells]
    else:
        cases = [common.Case(c, s, "inference", t) for t in threads for s in shapes for c in cells]
    results = []
    saved_threads = lstmfast.get_num_threads()
    saved_torch_threads = torch.get_num_threads() if torch is not None else None
    try:
        with tempfile.TemporaryDirectory(prefix="lstmfast-peers-") as workdir:
            ctx = dict(modules, backend=backend, workdir=workdir, note=note)
            for i, case in enumerate(cases, 1):
                print(f"[{i}/{len(cases)}] {case.label} ...", file=sys.stderr, flush=True)
                results.append(measure_case(case, ctx, rounds, min_time, limiter, cold))
    finally:
        lstmfast.set_num_threads(saved_threads)
        if torch is not None:
            torch.set_num_threads(saved_torch_threads)

    report(results, case_notes, notes + case_notes, config, json_path, cold)
    return 0


def print_header(title, config, notes):
    print(title)
    for name, value in config.items():
        print(f"  {name:31s} {value}")
    for note in notes:
        print(f"  note: {note}")
    print()
    sys.stdout.flush()


def report(results, printed_notes, notes, config, json_path, cold=False, runs=None):
    """The table of ``results``, the notes of its cases, with ``runs`` (each run's
    results, --repeat) each ratio's range over them, the summary; and the JSON."""
    print_table(results)
    if printed_notes:
        print()
        print("notes:")
        for text in printed_notes:
            print(f"  {text}")
    print()
    if runs is not None:
        print_ratio_ranges(results, len(runs))
        print()
    summary = summarize(results, cold, runs=1 if runs is None else len(runs))
    for line in summary["lines"]:
        print(line)
    if json_path:
        data = {"config": config, "notes": notes, "tolerance": TOLERANCE, "results": results,
                "summary": summary["figures"]}
        if runs is not None:
            data["runs"] = runs
        with open(json_path, "w") as f:
            json.dump(data, f, indent=2)
        print(f"wrote {json_path}")


def _fmt_difference(value):
    return "-" if value is None else f"{value:.1e}"


def print_table(results):
    header = (f"{'cell':4s} {'shape':7s} {'T':>4s} {'N':>3s} {'I':>5s} {'H':>5s} {'thr':>3s} {'precision':14s} "
              f"{'lstmfast':>9s} {'diff':>7s} {'torch':>9s} {'diff':>7s} {'vs torch':>8s} "
              f"{'onnxruntime':>11s} {'diff':>7s} {'vs ORT':>7s}")
    print("precision a/b: lstmfast in a against the peers in b (frozen: float32, lstmfast.freeze);")
    print("vs: the peer's time over lstmfast's;")
    print("diff: max |output - NumPy float32 reference| / max(1, max |reference|)")
    print(header)
    print("-" * len(header))
    for r in results:
        s, d = r["seconds"], r["max_rel_diff"]
        for mine, theirs in PAIRINGS:
            lf, tt, ort = key("lstmfast", mine), key("torch", theirs), key("onnxruntime", theirs)
            if not {lf, tt, ort} & set(s):
                continue
            label = mine if mine == theirs else f"{mine}/{theirs}"
            print(f"{r['cell']:4s} {r['shape']:7s} {r['T']:4d} {r['N']:3d} {r['I']:5d} {r['H']:5d} {r['threads']:3d} "
                  f"{label:14s} {common.fmt_time(s.get(lf)):>9s} {_fmt_difference(d.get(lf)):>7s} "
                  f"{common.fmt_time(s.get(tt)):>9s} {_fmt_difference(d.get(tt)):>7s} "
                  f"{common.fmt_ratio(s.get(lf), s.get(tt)):>8s} "
                  f"{common.fmt_time(s.get(ort)):>11s} {_fmt_difference(d.get(ort)):>7s} "
                  f"{common.fmt_ratio(s.get(lf), s.get(ort)):>7s}")


def summarize(results, cold=False, runs=1):
    """Geometric means of each ratio over the cases that have it, per thread count."""
    lines, figures = [], {}
    for threads in sorted({r["threads"] for r in results}):
        rows = [r for r in results if r["threads"] == threads]
        simd = ", ".join(sorted({r["simd_target"] for r in rows}))
        parts = []
        for mine, theirs in PAIRINGS:
            for who in PEERS:
                name = f"{mine} vs {key(who, theirs)}"
                ratios = [r["ratios"][name] for r in rows if name in r["ratios"]]
                if not ratios:
                    continue
                geomean = common.geomean(ratios)
                figures[f"{name}, {threads} threads"] = {"geomean": geomean, "min": min(ratios), "cases": len(ratios)}
                parts.append(f"  lstmfast {name}: geomean {geomean:.2f}x, min {min(ratios):.2f}x ({len(ratios)} case{'s' if len(ratios) > 1 else ''})")
        if parts:
            lines.append(f"peers, inference, {threads} thread{'s' if threads > 1 else ''}, simd {simd}"
                         f"{', caches cold' if cold else ''}"
                         f"{f', the median times of {runs} runs' if runs > 1 else ''}:")
            lines += parts
    return {"lines": lines, "figures": figures}


# ---------------------------------------------------------------------------
# --repeat: the same cases in several fresh processes


def combine_runs(runs):
    """The results of several runs of the same cases (each a list of ``measure_case``
    rows, in the same order) as one list of rows: each time the median over the runs,
    each ratio that of the median times, and under ``ratio_range`` the least and the
    most that ratio was in any one run. Implementations that a run left out are left
    out."""
    first = runs[0]
    same_cases = all([(r["cell"], r["shape"], r["threads"]) for r in run] ==
                     [(r["cell"], r["shape"], r["threads"]) for r in first] for run in runs)
    if not same_cases:
        raise ValueError("combine_runs: the runs did not time the same cases in the same order")
    combined = []
    for i, row in enumerate(first):
        rows = [run[i] for run in runs]
        names = [name for name in row["seconds"] if all(name in r["seconds"] for r in rows)]
        seconds = {name: statistics.median(r["seconds"][name] for r in rows) for name in names}
        differences = {name: max(r["max_rel_diff"][name] for r in rows) for name in names}
        ratios, ratio_range = {}, {}
        for ratio_name in row["ratios"]:
            mine, theirs = ratio_name.split(" vs ")
            if f"lstmfast {mine}" in seconds and theirs in seconds:
                ratios[ratio_name] = seconds[theirs] / seconds[f"lstmfast {mine}"]
                each = [r["ratios"][ratio_name] for r in rows]
                ratio_range[ratio_name] = [min(each), max(each)]
        combined.append({**{k: row[k] for k in ("cell", "shape", "threads", "T", "N", "I", "H", "simd_target")},
                         "seconds": seconds, "max_rel_diff": differences, "ratios": ratios,
                         "ratio_range": ratio_range})
    return combined


def print_ratio_ranges(results, runs):
    print(f"each ratio over the {runs} runs: that of the median times (as above), and the least and the most "
          f"it was in one run")
    header = f"{'cell':4s} {'shape':7s} {'thr':>3s} {'ratio':38s} {'median':>7s} {'least':>7s} {'most':>7s}"
    print(header)
    print("-" * len(header))
    for r in results:
        for name, ratio in r["ratios"].items():
            least, most = r["ratio_range"][name]
            print(f"{r['cell']:4s} {r['shape']:7s} {r['threads']:3d} {name:38s} {ratio:6.2f}x {least:6.2f}x "
                  f"{most:6.2f}x")


def run_repeated(repeat, child_options, json_path=None, cold=False):
    """``--repeat``: runs ``python -m lstmfast.bench --peers`` with ``child_options``
    ``repeat`` times, each in a fresh process, and prints what they timed together."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="lstmfast-peers-runs-") as workdir:
        for i in range(repeat):
            print(f"run {i + 1} of {repeat}, a fresh process:", file=sys.stderr, flush=True)
            path = os.path.join(workdir, f"run{i}.json")
            proc = subprocess.run([sys.executable, "-m", "lstmfast.bench", "--peers", *child_options,
                                   "--json", path], stdout=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-3000:])
                print(f"run {i + 1} of {repeat} failed (exit status {proc.returncode})", file=sys.stderr)
                return proc.returncode or 1
            with open(path) as f:
                runs.append(json.load(f))

    notes = list(dict.fromkeys(note for run in runs for note in run["notes"]))
    results_of_runs = [run["results"] for run in runs]
    print_header(f"lstmfast benchmark: inference against its peers, {repeat} runs, each in a fresh process",
                 runs[0]["config"], [])
    print(f"the median over the {repeat} runs of each time")
    report(combine_runs(results_of_runs), notes, notes, runs[0]["config"], json_path, cold, runs=results_of_runs)
    return 0
