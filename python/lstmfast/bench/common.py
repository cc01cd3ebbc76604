"""What the modes of ``python -m lstmfast.bench`` share: the grid's shapes and cells,
FLOP counts, the machine's description (CPU, BLAS, the GEMM ceiling, the OpenBLAS
variables that force a kernel), a case of the grid and how lstmfast and torch run it,
interleaved timing, and the formatting of figures.

Every mode imports this module and this module imports none of them, so that no mode
depends on the command line or on another mode. Optional packages (torch,
threadpoolctl) are imported only inside the functions that use them, so that the grid
runs with ``--no-torch`` where torch is not installed.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np

import lstmfast
from lstmfast import _core

# name -> (T, N, I, H): the grid's five (GRID_SHAPES, every mode's default), and
# "chunk", a stream fed ten frames per call (--shapes chunk), where a call's fixed
# costs (laying out the weights: lstmfast.freeze) weigh most.
SHAPES = {
    "stream": (100, 1, 128, 128),
    "small": (100, 8, 256, 256),
    "medium": (100, 32, 256, 256),
    "large": (100, 64, 512, 512),
    "wide": (50, 16, 1024, 1024),
    "chunk": (10, 1, 128, 128),
}
GRID_SHAPES = ("stream", "small", "medium", "large", "wide")
CELLS = ("LSTM", "GRU")
MODES = ("inference", "training")
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
PAUSE = 0.2  # seconds between timed blocks (see time_interleaved)


def forward_flops(cell, T, N, I, H, P=0):
    """2*T*N*G*H*(I+H): the two GEMMs of every step; pointwise work is not counted.
    With a projection (P > 0) the recurrent product reads P features, and the
    projection adds 2*T*N*P*H."""
    if P:
        return 2.0 * T * N * (GATES[cell] * H * (I + P) + P * H)
    return 2.0 * T * N * GATES[cell] * H * (I + H)


def case_flops(cell, mode, T, N, I, H, P=0):
    # Training is counted as three forwards: forward, and the two GEMMs of backward.
    return forward_flops(cell, T, N, I, H, P) * (3 if mode == "training" else 1)


def try_import_torch():
    """torch, or None where it is not installed."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def blas_thread_limiter():
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
        code = ("from lstmfast import _core; from lstmfast.bench import common; "
                f"print(common.gemm_gflops({int(threads)}, {str(dtype)!r}, {int(size)}, {float(min_time)}), "
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
    a PackedSequence for torch, packed inside the timed call as a user must);
    ``proj`` (an LSTM with ``proj_size=H // 4``, as speech models' LSTMP layers).
    """

    def __init__(self, cell, shape_name, mode, threads, variant="", shape=None):
        self.cell, self.shape_name, self.mode, self.threads, self.variant = cell, shape_name, mode, threads, variant
        self.T, self.N, self.I, self.H = shape or SHAPES[shape_name]
        self.dtype = "float64" if variant == "float64" else "float32"
        self.bidirectional = variant == "bidir"
        self.num_layers = 2 if variant == "2layer" else 1
        self.D = 2 if self.bidirectional else 1
        self.P = self.H // 4 if variant == "proj" else 0
        self.H_out = self.P or self.H

    @property
    def label(self):
        return f"{self.cell:4s} {self.shape_name:6s} {self.variant or '-':8s} {self.mode:9s} t={self.threads}"

    @property
    def kwargs(self):
        extra = dict(proj_size=self.P) if self.P else {}
        return dict(num_layers=self.num_layers, bidirectional=self.bidirectional, **extra)

    def flops(self):
        f = case_flops(self.cell, self.mode, self.T, self.N, self.I, self.H, self.P) * self.D
        if self.num_layers == 2:  # the second layer reads D*H features
            f += case_flops(self.cell, self.mode, self.T, self.N, self.D * self.H, self.H) * self.D
        if self.lengths is not None:
            f *= self.lengths.sum() / (self.T * self.N)
        return f

    def make_inputs(self):
        rng = np.random.default_rng(1)
        x = rng.standard_normal((self.T, self.N, self.I)).astype(self.dtype)
        d_out = rng.standard_normal((self.T, self.N, self.D * self.H_out)).astype(self.dtype)
        return x, d_out

    @property
    def lengths(self):
        if self.variant != "lengths":
            return None
        return np.random.default_rng(2).integers(1, self.T + 1, size=self.N)


def lstmfast_runner(case, backend, x, d_out):
    """The lstmfast layer of ``case`` on ``backend`` (seed 0), and a function of no argument
    that makes one call (inference) or one forward and backward (training) of it."""
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


def torch_runner(torch, case, state_dict, x, d_out):
    """torch.nn's layer of ``case`` with the weights of ``state_dict``, as a function of no
    argument like lstmfast_runner's."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    module = getattr(torch.nn, case.cell)(case.I, case.H, **case.kwargs)
    module = module.to(getattr(torch, case.dtype))
    module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()})
    xt = torch.from_numpy(x)
    gt = torch.from_numpy(d_out)
    lengths = None if case.lengths is None else torch.from_numpy(case.lengths)

    def call(inp):
        if case.P:  # torch says, at every call, that its LSTM with a projection runs without oneDNN
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "LSTM with projections is not supported")
                return module(inp)[0]
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


def fused_available():
    try:
        from lstmfast import _fused
    except ImportError:
        return False
    return bool(getattr(_fused, "available", False))


# Bytes a sweep writes (evict_caches): more than the last-level cache of the
# machines measured (32 MB on the Zen 4 and Xeon VMs), so that no weight survives it.
SWEEP_BYTES = 64 << 20
_sweep = None


def evict_caches():
    """Writes SWEEP_BYTES of memory: what a call finds after other work ran between
    two calls (other layers of a model, other requests), its weights out of every cache."""
    global _sweep
    if _sweep is None:
        _sweep = np.zeros(SWEEP_BYTES // 4, dtype=np.float32)
    _sweep += 1.0


def time_interleaved(runners, threads, rounds, min_time, torch, limiter, before_each=None):
    """Median seconds per call of each runner (name -> function of no argument), timed in
    interleaved rounds at ``threads`` threads. A runner named "reference" gets only
    ``rounds`` blocks. ``before_each``: called, untimed, before every timed call
    (evict_caches for calls that find the caches cold)."""
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
                time.sleep(PAUSE)
                run()  # warm: workspaces, caches, woken thread pools
                block_start = time.perf_counter()
                block = []
                while not block or (time.perf_counter() - block_start < min_time / rounds and len(block) < 200):
                    if before_each is not None:
                        before_each()
                    t0 = time.perf_counter()
                    run()
                    block.append(time.perf_counter() - t0)
                times[name].append(statistics.median(block))
            r += 1
    finally:
        if limit is not None:
            limit.restore_original_limits()
    return {name: statistics.median(ts) for name, ts in times.items()}


def fmt_time(seconds):
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_ratio(a, b):
    if a is None or b is None:
        return "-"
    return f"{b / a:.2f}x"


def geomean(values):
    values = [v for v in values if v is not None and v > 0]
    return float(np.exp(np.mean(np.log(values)))) if values else None


def configuration(torch, limiter):
    """The machine and the software the figures come from, printed above them and written
    with them; a ``warning`` when OpenBLAS runs a forced kernel."""
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


# ---------------------------------------------------------------------------
# ONNX Runtime, for the modes that time it (--peers, --onnx).


def onnx_int8_model(model, workdir, name):
    """``quantize_dynamic`` of ``model``, and the op types of the graph it returned.

    ``reduce_range=True`` (7-bit weights): without it, on x86 CPUs without VNNI, ORT's
    u8 x s8 products saturate their 16-bit pair sums (VPMADDUBSW), and the LSTM output
    was off by about 0.2 on the grid; with it, by about 0.02, as torch's int8.
    """
    import logging

    import onnx
    from onnxruntime.quantization import quantize_dynamic

    fp32_path = os.path.join(workdir, f"{name}.onnx")
    int8_path = os.path.join(workdir, f"{name}.int8.onnx")
    onnx.save(model, fp32_path)
    # quantize_dynamic logs advice to pre-process the model (shape inference, graph
    # optimizations), which has nothing to do on a single node.
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(fp32_path, int8_path, reduce_range=True)
    finally:
        logging.disable(logging.NOTSET)
    return int8_path, [node.op_type for node in onnx.load(int8_path).graph.node]


def ort_session(ort, model, threads):
    """An ONNX Runtime session of ``model`` (bytes or a path) on ``threads`` threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------
# Modes that measure in fresh processes (--models, --patterns): the parent starts
# ``python -m MODULE --worker JOB`` and reads the JSON line the worker prints last.


def worker_main(argv, workers, mode):
    """A mode module's ``__main__``: runs ``workers[job["kind"]](job)`` for ``--worker JOB``
    and prints its result as one JSON line."""
    if len(argv) != 3 or argv[1] != "--worker":
        print(f"this is the worker of `python -m lstmfast.bench {mode}`; run that instead",
              file=sys.stderr)
        return 2
    job = json.loads(argv[2])
    print(json.dumps(workers[job["kind"]](job)))
    return 0


def run_worker(module, job, what):
    """Runs ``job`` in a fresh Python process of ``module``'s worker; its result. The
    job's ``env`` (a dict, if any) is added to the process's environment."""
    env = {**os.environ, **job["env"]} if job.get("env") else None
    proc = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(job)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} worker {what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
