"""``python -m lstmfast.bench``: lstmfast against the NumPy reference and torch.

Every figure comes from one process and one run: each case times the
implementations in interleaved rounds (so machine noise hits them alike), takes
the median per implementation, and prints ratios. Before timing, the fused result
of each case is checked against the reference.

The grid is the one of docs/performance.md: float32, one layer, one direction unless said.
``--models`` times whole torch models instead, torch against ``accelerate(model)``,
one process per measurement (see ``lstmfast.bench_models``). ``--peers`` times
inference against torch and ONNX Runtime, in float32, int8 and bfloat16 (see
``lstmfast.bench_peers``).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

import lstmfast
from lstmfast import _core

# name -> (T, N, I, H)
SHAPES = {
    "stream": (100, 1, 128, 128),
    "small": (100, 8, 256, 256),
    "medium": (100, 32, 256, 256),
    "large": (100, 64, 512, 512),
    "wide": (50, 16, 1024, 1024),
}
CELLS = ("LSTM", "GRU")
MODES = ("inference", "training")
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_PAUSE = 0.2  # seconds between timed blocks (see time_interleaved)


def forward_flops(cell, T, N, I, H):
    """2*T*N*G*H*(I+H): the two GEMMs of every step; pointwise work is not counted."""
    return 2.0 * T * N * GATES[cell] * H * (I + H)


def case_flops(cell, mode, T, N, I, H):
    # Training is counted as three forwards: forward, and the two GEMMs of backward.
    return forward_flops(cell, T, N, I, H) * (3 if mode == "training" else 1)


def _try_import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _blas_thread_limiter():
    """Limits NumPy's own BLAS threads for the reference, when threadpoolctl is there."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Environment variables that force OpenBLAS's kernel and cache blocking. Users do not
# set them; with OPENBLAS_CORETYPE=Haswell on an AVX-512 machine, OpenBLAS runs its
# AVX2 kernels, at half the float32 rate of its own choice there.
OPENBLAS_FORCING = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def openblas_forced():
    """The variables of OPENBLAS_FORCING set in this process, name -> value."""
    return {k: os.environ[k] for k in OPENBLAS_FORCING if os.environ.get(k)}


def openblas_warning():
    """A warning to print above any figure when OpenBLAS runs a forced kernel; None otherwise."""
    forced = openblas_forced()
    if not forced:
        return None
    settings = ", ".join(f"{k}={v}" for k, v in forced.items())
    return (f"WARNING: {settings} forces OpenBLAS's kernel (core {_core.blas_corename()}), as "
            f"users' processes do not: the OpenBLAS GEMMs below run slower than they would "
            f"for a user. For figures users meet: env -u {' -u '.join(OPENBLAS_FORCING)} "
            f"python -m lstmfast.bench ...")


def gemm_gflops(threads, dtype, size=1024, min_time=0.3):
    """The machine's sgemm (float32) or dgemm (float64) rate through this process's
    OpenBLAS at the given thread count (gemm_ceiling: the best a process can get)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(dtype)
    b = rng.standard_normal((size, size)).astype(dtype)
    matmul = _core.matmul_f32 if np.dtype(dtype) == np.float32 else _core.matmul_f64
    _core.blas_set_num_threads(threads)
    matmul(a, b)
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < 3:
        t0 = time.perf_counter()
        matmul(a, b)
        times.append(time.perf_counter() - t0)
    return 2.0 * size**3 / min(times) / 1e9


def gemm_ceiling(threads, dtype, size=1024, min_time=0.3):
    """The best GEMM rate this process could get: gemm_gflops here and, when a
    variable of OPENBLAS_FORCING is set, in a child process without them (OpenBLAS
    picks its kernel once, when it loads). Returns (GFLOP/s, OpenBLAS core that gave it)."""
    best = (gemm_gflops(threads, dtype, size, min_time), _core.blas_corename())
    if openblas_forced():
        import subprocess

        env = {k: v for k, v in os.environ.items() if k not in OPENBLAS_FORCING}
        code = ("from lstmfast import bench, _core; "
                f"print(bench.gemm_gflops({int(threads)}, {str(dtype)!r}, {int(size)}, {float(min_time)}), "
                "_core.blas_corename())")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        best = max(best, (float(out[0]), out[1]))
    return best


def cpu_features():
    """The instruction-set extensions this CPU has of those that matter here, and those it lacks."""
    features = _core.cpu_features() if hasattr(_core, "cpu_features") else {}
    has = " ".join(name for name, present in features.items() if present) or "none"
    lacks = [name for name, present in features.items() if not present]
    return has + (f" (not: {' '.join(lacks)})" if lacks else "")


class Case:
    """One benchmark case: a cell, a shape, a mode, a thread count and a variant.

    Variants beyond the plain grid: ``float64``; ``bidir`` (bidirectional);
    ``2layer`` (two stacked layers); ``lengths`` (a random length per sequence, as
    a PackedSequence for torch, packed inside the timed call as a user must).
    """

    def __init__(self, cell, shape_name, mode, threads, variant="", shape=None):
        self.cell, self.shape_name, self.mode, self.threads, self.variant = cell, shape_name, mode, threads, variant
        self.T, self.N, self.I, self.H = shape or SHAPES[shape_name]
        self.dtype = "float64" if variant == "float64" else "float32"
        self.bidirectional = variant == "bidir"
        self.num_layers = 2 if variant == "2layer" else 1
        self.D = 2 if self.bidirectional else 1

    @property
    def label(self):
        return f"{self.cell:4s} {self.shape_name:6s} {self.variant or '-':8s} {self.mode:9s} t={self.threads}"

    @property
    def kwargs(self):
        return dict(num_layers=self.num_layers, bidirectional=self.bidirectional)

    def flops(self):
        f = case_flops(self.cell, self.mode, self.T, self.N, self.I, self.H) * self.D
        if self.num_layers == 2:  # the second layer reads D*H features
            f += case_flops(self.cell, self.mode, self.T, self.N, self.D * self.H, self.H) * self.D
        if self.lengths is not None:
            f *= self.lengths.sum() / (self.T * self.N)
        return f

    def make_inputs(self):
        rng = np.random.default_rng(1)
        x = rng.standard_normal((self.T, self.N, self.I)).astype(self.dtype)
        d_out = rng.standard_normal((self.T, self.N, self.D * self.H)).astype(self.dtype)
        return x, d_out

    @property
    def lengths(self):
        if self.variant != "lengths":
            return None
        return np.random.default_rng(2).integers(1, self.T + 1, size=self.N)


# Variant cases run in a full run (not with --quick): (cell, shape name, variant, (T, N, I, H) or None)
VARIANTS = [
    ("LSTM", "lengths", "lengths", (200, 16, 256, 256)),
    ("LSTM", "small", "float64", None),
    ("GRU", "small", "float64", None),
    ("LSTM", "small", "bidir", None),
    ("GRU", "small", "bidir", None),
    ("LSTM", "small", "2layer", None),
    ("GRU", "small", "2layer", None),
]


def _lstmfast_runner(case, backend, x, d_out):
    layer = getattr(lstmfast, case.cell)(case.I, case.H, dtype=case.dtype, backend=backend, seed=0, **case.kwargs)
    lengths = case.lengths
    if case.mode == "inference":
        layer.eval()

        def run():
            return layer(x, lengths=lengths)[0]
    else:
        layer.train()

        def run():
            out = layer(x, lengths=lengths)[0]
            layer.backward(d_out)
            return out
    return layer, run


def _torch_runner(torch, case, state_dict, x, d_out):
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    module = getattr(torch.nn, case.cell)(case.I, case.H, **case.kwargs)
    module = module.to(getattr(torch, case.dtype))
    module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()})
    xt = torch.from_numpy(x)
    gt = torch.from_numpy(d_out)
    lengths = None if case.lengths is None else torch.from_numpy(case.lengths)

    def call(inp):
        if lengths is None:
            return module(inp)[0]
        packed = pack_padded_sequence(inp, lengths, enforce_sorted=False)
        return pad_packed_sequence(module(packed)[0], total_length=case.T)[0]

    if case.mode == "inference":
        module.eval()

        def run():
            with torch.inference_mode():
                return call(xt)
    else:
        module.train()
        xg = xt.clone().requires_grad_(True)

        def run():
            module.zero_grad(set_to_none=False)
            xg.grad = None
            out = call(xg)
            out.backward(gt)
            return out
    return run


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
from lstmfast import bench
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
def runner(case):
    x, d_out = case.make_inputs()
    if impl == 'torch':
        import torch
        torch.set_num_threads(case.threads)
        layer, _ = bench._lstmfast_runner(case, 'numpy', x, d_out)
        return bench._torch_runner(torch, case, layer.state_dict(), x, d_out)
    import lstmfast
    lstmfast.set_num_threads(case.threads)
    return bench._lstmfast_runner(case, 'fused' if impl == 'fused' else 'numpy', x, d_out)[1]
impl = {impl!r}
warm = runner(bench.Case({case.cell!r}, 'tiny', 'training', {case.threads}, {case.variant!r}, (2, 1, 4, 4)))
warm(); warm()
del warm
run = runner(bench.Case({case.cell!r}, {case.shape_name!r}, 'training', {case.threads}, {case.variant!r},
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


def fused_available():
    try:
        from lstmfast import _fused
    except ImportError:
        return False
    return bool(getattr(_fused, "available", False))


def time_case(case, impls, rounds, min_time, torch, limiter):
    """Median seconds per call for each implementation, timed in interleaved rounds."""
    x, d_out = case.make_inputs()
    runners = {}
    ref_layer, ref_run = _lstmfast_runner(case, "numpy", x, d_out)
    state = ref_layer.state_dict()
    if "fused" in impls:
        fused_layer, fused_run = _lstmfast_runner(case, "fused", x, d_out)
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
        runners["torch"] = _torch_runner(torch, case, state, x, d_out)
    return time_interleaved(runners, case.threads, rounds, min_time, torch, limiter)


def time_interleaved(runners, threads, rounds, min_time, torch, limiter):
    """Median seconds per call of each runner (name -> function of no argument), timed in
    interleaved rounds at ``threads`` threads. A runner named "reference" gets only
    ``rounds`` blocks."""
    lstmfast.set_num_threads(threads)
    if torch is not None:
        torch.set_num_threads(threads)
    limit = limiter(limits=threads, user_api="blas") if limiter else None
    try:
        times = {name: [] for name in runners}
        # Rounds of blocks: each implementation runs a block of calls in turn, so
        # slow drifts of the machine hit all of them alike. Between blocks the
        # process sleeps: the BLAS and OpenMP worker pools spin for a while after
        # their last job, and would otherwise steal the cores from the next block.
        start = time.perf_counter()
        r = 0
        while r < rounds or (time.perf_counter() - start < min_time * len(runners) and r < 4 * rounds):
            for name, run in runners.items():
                if name == "reference" and r >= rounds:
                    continue  # the reference is slow and steady: `rounds` blocks suffice
                time.sleep(_PAUSE)
                run()  # warm: workspaces, caches, woken thread pools
                block_start = time.perf_counter()
                block = []
                while not block or (time.perf_counter() - block_start < min_time / rounds and len(block) < 200):
                    t0 = time.perf_counter()
                    run()
                    block.append(time.perf_counter() - t0)
                times[name].append(statistics.median(block))
            r += 1
    finally:
        if limit is not None:
            limit.restore_original_limits()
    return {name: statistics.median(ts) for name, ts in times.items()}


def _fmt_time(seconds):
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _fmt_ratio(a, b):
    if a is None or b is None:
        return "-"
    return f"{b / a:.2f}x"


def configuration(torch, limiter):
    config = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "cpu features": cpu_features(),
        "python": platform.python_version(),
        "lstmfast": lstmfast.__version__,
        "simd_target": lstmfast._config.simd_target(),
        "blas": _core.blas_config(),
        "blas core": _core.blas_corename(),
        "numpy": np.__version__,
        "torch": torch.__version__ if torch is not None else None,
        "reference_blas_threads_limited": limiter is not None,
    }
    warning = openblas_warning()
    if warning:
        config["warning"] = warning
    return config


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lstmfast.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a reduced grid that finishes in under a minute; with --models, fewer repeats")
    parser.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS))
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--modes", nargs="+", choices=MODES, help="default: both")
    parser.add_argument("--threads", nargs="+", type=int,
                        help="thread counts (default: 1 2, and 2 with --models)")
    parser.add_argument("--rounds", type=int, default=5, help="minimum timed rounds per case")
    parser.add_argument("--min-time", type=float, default=0.5, help="minimum seconds of timing per case")
    parser.add_argument("--no-torch", action="store_true", help="do not benchmark torch even when installed")
    parser.add_argument("--json", metavar="FILE", help="write the configuration and all figures to FILE")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the speedups (needs matplotlib)")
    parser.add_argument("--no-variants", action="store_true",
                        help="skip the variant cases (lengths, float64, bidirectional, 2 layers)")
    parser.add_argument("--memory", action="store_true",
                        help="also measure the peak memory of a training step of each grid case (fresh processes)")
    parser.add_argument("--models", nargs="?", const="all", metavar="NAME,...",
                        help="instead of the grid, time whole torch models against accelerate(model), one fresh "
                             "process per measurement; all of them, or a comma-separated subset of: "
                             "crnn, crnn_int8, gru_forecaster, bilstm3, deepspeech, wavernn_gen, tacotron_dec, "
                             "cell_loop")
    parser.add_argument("--peers", action="store_true",
                        help="instead of the grid, time inference against what a user would pick instead: "
                             "torch float32, int8 (quantize_dynamic) and bfloat16 (autocast), ONNX Runtime "
                             "float32 and int8, against lstmfast float32 and lstmfast.quantize's int8 and bfloat16")
    parser.add_argument("--variants", action="store_true",
                        help="instead of the grid, time the cells torch.nn lacks (peephole LSTM) against the "
                             "torch loop users run today and against lstmfast's plain layer, training and inference")
    parser.add_argument("--patterns", action="store_true",
                        help="instead of the grid, time the call patterns users meet, torch against "
                             "lstmfast.torch, one process per measurement: calls after idle gaps, after "
                             "torch's and OpenBLAS's pools ran, a one-step cell loop, the adapter's training step")
    parser.add_argument("--pairs", type=int,
                        help="with --patterns or --models: process pairs (A B A B) per case (default 5; "
                             "2 with --quick, 1 with --tiny)")
    parser.add_argument("--tiny", action="store_true",
                        help="with --models, --peers or --variants: tiny sizes, to test the command (the "
                             "figures mean nothing)")
    args = parser.parse_args(argv)

    if args.models is not None:
        return _main_models(parser, args)
    if args.patterns:
        return _main_patterns(parser, args)
    if args.tiny and not (args.peers or args.variants):
        parser.error("--tiny goes with --models, --patterns, --peers or --variants")
    args.threads = args.threads or [1, 2]

    if args.quick:
        args.shapes = [s for s in args.shapes if s in ("stream", "small")] or ["stream"]
        args.threads = [max(args.threads)]
        args.rounds, args.min_time = 3, 0.2
        args.no_variants = True
    if any(t < 1 for t in args.threads):
        parser.error("--threads must be positive")
    if args.peers:
        return _main_peers(parser, args)
    if args.variants:
        return _main_variants(parser, args)
    args.modes = args.modes or list(MODES)

    torch = None if args.no_torch else _try_import_torch()
    limiter = _blas_thread_limiter()
    impls = ["reference"] + (["fused"] if fused_available() else []) + (["torch"] if torch else [])

    config = configuration(torch, limiter)
    print("lstmfast benchmark")
    for key, value in config.items():
        print(f"  {key:31s} {value}")
    print(f"  {'implementations':31s} {', '.join(impls)}")
    if "fused" not in impls:
        print("  note: the fused kernels are not built yet; timing the reference and torch only")
    sys.stdout.flush()

    cases = [Case(c, s, m, t) for t in args.threads for m in args.modes for s in args.shapes for c in args.cells]
    if not args.no_variants:
        cases += [Case(c, s, m, t, variant, shape) for t in args.threads for m in args.modes
                  for c, s, variant, shape in VARIANTS if c in args.cells]
    ceilings = {}  # (dtype name, threads) -> GFLOP/s of the best 1024^3 GEMM of that dtype
    for dtype in ("float32", "float64"):
        if any(case.dtype == dtype for case in cases):
            for t in args.threads:
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
            medians = time_case(case, impls, args.rounds, args.min_time, torch, limiter)
            best = medians.get("fused", medians.get("reference"))
            row = {
                "cell": case.cell, "shape": case.shape_name, "variant": case.variant, "mode": case.mode,
                "threads": case.threads, "T": case.T, "N": case.N, "I": case.I, "H": case.H,
                "dtype": case.dtype, "seconds": medians,
                "gflops": case.flops() / best / 1e9,
                "gemm_gflops": ceilings[case.dtype, case.threads],
            }
            if args.memory and case.mode == "training" and not case.variant:
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
              f"{r['threads']:3d} {_fmt_time(fused):>9s} {_fmt_time(ref):>10s} {_fmt_time(tt):>9s} "
              f"{_fmt_ratio(mine, tt):>8s} {_fmt_ratio(fused, ref):>8s} "
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

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config,
                       "gemm_gflops": {f"{d} {t}": g for (d, t), g in ceilings.items()},
                       "results": results,
                       "summary": summary["figures"]}, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _main_models(parser, args):
    if args.plot or args.memory or args.no_torch:
        parser.error("--models times torch models; --plot, --memory and --no-torch do not apply")
    if _try_import_torch() is None:
        parser.error("--models needs torch: pip install 'lstmfast[torch]'")
    from lstmfast import bench_models

    names = list(bench_models.MODELS) if args.models == "all" else args.models.split(",")
    unknown = [n for n in names if n not in bench_models.MODELS]
    if unknown or not names:
        parser.error(f"--models: unknown model {', '.join(unknown)!r}; choose from {', '.join(bench_models.MODELS)}")
    threads = args.threads or [2]
    if any(t < 1 for t in threads):
        parser.error("--threads must be positive")
    pairs = _pairs(parser, args)
    return bench_models.run(names, threads, quick=args.quick, tiny=args.tiny, json_path=args.json,
                            pairs=pairs)


def _main_patterns(parser, args):
    if args.plot or args.memory or args.no_torch:
        parser.error("--patterns times torch against lstmfast.torch; --plot, --memory and --no-torch do not apply")
    if _try_import_torch() is None:
        parser.error("--patterns needs torch: pip install 'lstmfast[torch]'")
    threads = args.threads or [2]
    if len(threads) != 1 or threads[0] < 1:
        parser.error("--patterns takes one positive --threads count")
    pairs = _pairs(parser, args)
    shapes = [s for s in args.shapes if s in bench_patterns_shapes()]
    if not shapes:
        parser.error(f"--patterns: --shapes among {', '.join(bench_patterns_shapes())}")
    from lstmfast import bench_patterns

    return bench_patterns.run(args.cells, shapes, threads[0], pairs, calls=10 if args.quick else 30,
                              tiny=args.tiny, json_path=args.json)


def _pairs(parser, args):
    """Process pairs per case: --pairs, else 1 with --tiny, 2 with --quick, 5."""
    pairs = args.pairs if args.pairs is not None else 1 if args.tiny else 2 if args.quick else 5
    if pairs < 1:
        parser.error("--pairs must be positive")
    return pairs


def bench_patterns_shapes():
    from lstmfast import bench_patterns

    return bench_patterns.SHAPES


def _main_peers(parser, args):
    if args.plot or args.memory:
        parser.error("--peers: --plot and --memory do not apply")
    if args.modes and args.modes != ["inference"]:
        parser.error("--peers times inference only")
    from lstmfast import bench_peers

    return bench_peers.run(args.cells, args.shapes, args.threads, args.rounds, args.min_time,
                           no_torch=args.no_torch, tiny=args.tiny, json_path=args.json)


def _main_variants(parser, args):
    if args.plot or args.memory or args.no_torch:
        parser.error("--variants times torch modules; --plot, --memory and --no-torch do not apply")
    if _try_import_torch() is None:
        parser.error("--variants needs torch: pip install 'lstmfast[torch]'")
    from lstmfast import bench_variants

    return bench_variants.run(list(bench_variants.VARIANTS), args.threads, args.rounds, args.min_time,
                              modes=args.modes or bench_variants.MODES, tiny=args.tiny,
                              json_path=args.json)


def _geomean(values):
    values = [v for v in values if v is not None and v > 0]
    return float(np.exp(np.mean(np.log(values)))) if values else None


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
            g_t, g_r = _geomean(vs_torch), _geomean(vs_ref)
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


if __name__ == "__main__":
    sys.exit(main())
