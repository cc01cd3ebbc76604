"""The grid of ``python -m lstmfast.bench`` (its default mode): lstmfast against the
NumPy reference and torch.

Every figure comes from one process and one run: each case times the
implementations in interleaved rounds (so machine noise hits them alike), takes
the median per implementation, and prints ratios. Before timing, the fused result
of each case is checked against the reference.

The grid is the one of docs/performance.md: float32, one layer, one direction unless
said; a full run adds the variant cases (``VARIANTS``). torch is optional: without it,
or with ``--no-torch``, the grid times the kernels against the reference alone.
"""

import json
import sys

import numpy as np

import lstmfast
from lstmfast.bench.common import (
    MODES, Case, blas_thread_limiter, configuration, cpu_name, fmt_ratio, fmt_time, fused_available,
    gemm_ceiling, geomean, lstmfast_runner, time_interleaved, torch_runner, try_import_torch)


# Variant cases run in a full run (not with --quick): (cell, shape name, variant, (T, N, I, H) or None)
VARIANTS = [
    ("LSTM", "lengths", "lengths", (200, 16, 256, 256)),
    ("LSTM", "small", "float64", None),
    ("GRU", "small", "float64", None),
    ("LSTM", "small", "bidir", None),
    ("GRU", "small", "bidir", None),
    ("LSTM", "small", "2layer", None),
    ("GRU", "small", "2layer", None),
    ("LSTM", "proj", "proj", (100, 8, 256, 512)),
]


def peak_memory_mb(case, impl):
    """Extra resident memory (MB) of two training steps, measured in a fresh process.

    A tiny warm-up case first initialises the libraries (BLAS buffers, thread
    pools) so they are not counted; then the layer and its inputs are built, the
    resident set is the baseline, the kernel's high-water mark is reset (Linux
    ``clear_refs``), two training steps run, and the figure is the high-water mark
    minus the baseline. The same measure for every implementation, whoever
    allocates the memory. None where the platform has no such counters.
    """
    import subprocess

    code = f"""
import gc, numpy as np
from lstmfast.bench import common
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
def runner(case):
    x, d_out = case.make_inputs()
    if impl == 'torch':
        import torch
        torch.set_num_threads(case.threads)
        layer, _ = common.lstmfast_runner(case, 'numpy', x, d_out)
        return common.torch_runner(torch, case, layer.state_dict(), x, d_out)
    import lstmfast
    lstmfast.set_num_threads(case.threads)
    return common.lstmfast_runner(case, 'fused' if impl == 'fused' else 'numpy', x, d_out)[1]
impl = {impl!r}
warm = runner(common.Case({case.cell!r}, 'tiny', 'training', {case.threads}, {case.variant!r}, (2, 1, 4, 4)))
warm(); warm()
del warm
run = runner(common.Case({case.cell!r}, {case.shape_name!r}, 'training', {case.threads}, {case.variant!r},
                         {(case.T, case.N, case.I, case.H)!r}))
gc.collect()
base = status('VmRSS')
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')
run(); run()
print((status('VmHWM') - base) / 2**20)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return float(out.stdout.strip().splitlines()[-1])


def time_case(case, impls, rounds, min_time, torch, limiter):
    """Median seconds per call for each implementation, timed in interleaved rounds."""
    x, d_out = case.make_inputs()
    runners = {}
    ref_layer, ref_run = lstmfast_runner(case, "numpy", x, d_out)
    state = ref_layer.state_dict()
    if "fused" in impls:
        fused_layer, fused_run = lstmfast_runner(case, "fused", x, d_out)
        fused_layer.load_state_dict(state)
        # Each timed case checks its result before any figure is taken.
        ref_out = np.asarray(ref_run(), dtype=np.float64)
        fused_out = np.asarray(fused_run(), dtype=np.float64)
        err = np.abs(ref_out - fused_out).max() / max(1.0, np.abs(ref_out).max())
        if err > 1e-4:
            raise AssertionError(f"{case.label}: fused differs from the reference by {err:.3g}")
        runners["fused"] = fused_run
    if "reference" in impls:
        runners["reference"] = ref_run
    if "torch" in impls and torch is not None:
        runners["torch"] = torch_runner(torch, case, state, x, d_out)
    return time_interleaved(runners, case.threads, rounds, min_time, torch, limiter)


def run(cells, shapes, modes, threads, rounds, min_time, no_torch=False, variants=True, memory=False,
        json_path=None, plot_path=None):
    """The whole grid; returns the exit code. ``variants``: add the variant cases; ``memory``:
    the peak memory of each plain training case, in fresh processes."""
    torch = None if no_torch else try_import_torch()
    limiter = blas_thread_limiter()
    impls = ["reference"] + (["fused"] if fused_available() else []) + (["torch"] if torch else [])

    config = configuration(torch, limiter)
    print("lstmfast benchmark")
    for key, value in config.items():
        print(f"  {key:31s} {value}")
    print(f"  {'implementations':31s} {', '.join(impls)}")
    if "fused" not in impls:
        print("  note: the fused kernels are not built yet; timing the reference and torch only")
    sys.stdout.flush()

    cases = [Case(c, s, m, t) for t in threads for m in modes for s in shapes for c in cells]
    if variants:
        cases += [Case(c, s, m, t, variant, shape) for t in threads for m in modes
                  for c, s, variant, shape in VARIANTS if c in cells]
    ceilings = {}  # (dtype name, threads) -> GFLOP/s of the best 1024^3 GEMM of that dtype
    for dtype in ("float32", "float64"):
        if any(case.dtype == dtype for case in cases):
            for t in threads:
                g, core = gemm_ceiling(t, dtype)
                ceilings[dtype, t] = g
                name = "sgemm" if dtype == "float32" else "dgemm"
                print(f"  {name + ' ceiling (1024^3, ' + str(t) + ' thr)':31s} {g:.1f} GFLOP/s (OpenBLAS core {core})")
    print()
    results = []
    saved_threads = lstmfast.get_num_threads()
    try:
        for i, case in enumerate(cases, 1):
            print(f"[{i}/{len(cases)}] {case.label} ...", file=sys.stderr, flush=True)
            medians = time_case(case, impls, rounds, min_time, torch, limiter)
            best = medians.get("fused", medians.get("reference"))
            row = {
                "cell": case.cell, "shape": case.shape_name, "variant": case.variant, "mode": case.mode,
                "threads": case.threads, "T": case.T, "N": case.N, "I": case.I, "H": case.H,
                "dtype": case.dtype, "seconds": medians,
                "gflops": case.flops() / best / 1e9,
                "gemm_gflops": ceilings[case.dtype, case.threads],
            }
            if memory and case.mode == "training" and not case.variant:
                print(f"      peak memory of {case.label} ...", file=sys.stderr, flush=True)
                row["peak_mb"] = {impl: peak_memory_mb(case, impl) for impl in impls}
            results.append(row)
    finally:
        lstmfast.set_num_threads(saved_threads)

    header = (f"{'cell':4s} {'shape':7s} {'variant':7s} {'T':>4s} {'N':>3s} {'I':>5s} {'H':>5s} {'mode':9s} {'thr':>3s} "
              f"{'fused':>9s} {'reference':>10s} {'torch':>9s} {'vs torch':>8s} {'vs ref':>8s} "
              f"{'GFLOP/s':>8s} {'% gemm':>7s}")
    print(header)
    print("-" * len(header))
    for r in results:
        s = r["seconds"]
        fused, ref, tt = s.get("fused"), s.get("reference"), s.get("torch")
        mine = fused if fused is not None else ref
        print(f"{r['cell']:4s} {r['shape']:7s} {r['variant'] or '-':7s} {r['T']:4d} {r['N']:3d} {r['I']:5d} {r['H']:5d} {r['mode']:9s} "
              f"{r['threads']:3d} {fmt_time(fused):>9s} {fmt_time(ref):>10s} {fmt_time(tt):>9s} "
              f"{fmt_ratio(mine, tt):>8s} {fmt_ratio(fused, ref):>8s} "
              f"{r['gflops']:8.1f} {100 * r['gflops'] / r['gemm_gflops']:6.0f}%")
    memory_rows = [r for r in results if "peak_mb" in r]
    if memory_rows:
        print()
        print("peak extra memory of one training step (MB, resident set, fresh process):")
        for r in memory_rows:
            figures = "  ".join(f"{k} {v:8.1f}" if v is not None else f"{k} -" for k, v in r["peak_mb"].items())
            print(f"  {r['cell']:4s} {r['shape']:7s} t={r['threads']}  {figures}")
    print()
    summary = summarize(results)
    for line in summary["lines"]:
        print(line)

    if json_path:
        with open(json_path, "w") as f:
            json.dump({"config": config,
                       "gemm_gflops": {f"{d} {t}": g for (d, t), g in ceilings.items()},
                       "results": results,
                       "summary": summary["figures"]}, f, indent=2)
        print(f"wrote {json_path}")
    if plot_path:
        plot(results, plot_path)
        print(f"wrote {plot_path}")
    return 0


def summarize(results):
    """Geometric-mean speedups over the grid of docs/performance.md (no variants), per mode and thread count.

    lstmfast here is the fused kernels when built, else the reference.
    """
    lines, figures = [], {}
    for threads in sorted({r["threads"] for r in results}):
        for mode in MODES:
            rows = [r for r in results if r["mode"] == mode and r["threads"] == threads and not r["variant"]]
            if not rows:
                continue
            vs_torch = [r["seconds"]["torch"] / r["seconds"].get("fused", r["seconds"]["reference"])
                        for r in rows if "torch" in r["seconds"]]
            vs_ref = [r["seconds"]["reference"] / r["seconds"]["fused"] for r in rows if "fused" in r["seconds"]]
            g_t, g_r = geomean(vs_torch), geomean(vs_ref)
            figures[f"{mode}, {threads} threads"] = {
                "geomean_vs_torch": g_t, "min_vs_torch": min(vs_torch) if vs_torch else None,
                "geomean_vs_reference": g_r}
            parts = []
            if g_t is not None:
                parts.append(f"vs torch geomean {g_t:.2f}x (min {min(vs_torch):.2f}x)")
            if g_r is not None:
                parts.append(f"vs reference geomean {g_r:.2f}x")
            if parts:
                lines.append(f"grid, {mode}, {threads} thread{'s' if threads > 1 else ''}: " + ", ".join(parts))
    return {"lines": lines, "figures": figures}


def plot(results, path):
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'lstmfast[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if "torch" in r["seconds"]]
    if not rows:
        raise SystemExit("--plot: nothing to plot (torch was not benchmarked)")
    labels = [f"{r['cell']} {r['shape']} {r['variant']}\n{r['mode'][:5]} t={r['threads']}" for r in rows]
    speedups = [r["seconds"]["torch"] / r["seconds"].get("fused", r["seconds"]["reference"]) for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(rows)), 4.5))
    colors = ["tab:green" if s >= 1 else "tab:red" for s in speedups]
    ax.bar(range(len(rows)), speedups, color=colors)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_ylabel("speedup over torch (x, log scale)")
    ax.set_title(f"lstmfast {lstmfast.__version__} vs torch, float32, {cpu_name()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
