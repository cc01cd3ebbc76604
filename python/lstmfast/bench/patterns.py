"""``python -m lstmfast.bench --patterns``: lstmfast against torch in the call patterns
users meet, not only back to back.

The grid times one call after another. Users call otherwise, and a thread pool's
state between calls decides how fast the next one is:

* ``gap``: calls with an idle gap before each (0, 1, 10 and 100 ms), as a server
  answering requests: the figure is the median call, and each implementation's
  slowdown against its own back-to-back call;
* ``after pools``: lstmfast's back-to-back call in a process where torch's and
  NumPy's OpenBLAS's thread pools have run first, against a fresh process;
* ``numpy pipeline``: a NumPy program without torch, a product of NumPy's own
  OpenBLAS before every call of lstmfast's NumPy layer, its OpenBLAS threads
  spinning for their default time after each product (they hold the cores, and
  lstmfast's call runs on fewer threads) against ``OPENBLAS_THREAD_TIMEOUT=4`` (they
  sleep at once): the median of the product and the call together;
* ``cell loop``: a decoder stepping a cell once per token, its output fed back
  through a linear layer (``lstmfast.torch``'s cell against torch's);
* ``frame loop``: a streaming model feeding its layer one frame per call, the state
  carried from call to call (``lstmfast.torch``'s layer against torch's); ``chunk
  loop``: the same fed ten frames per call; ``frozen ...``: the cell loop and these
  two with ``lstmfast.torch.freeze``'s copy of the module (weights packed once)
  against torch's;
* ``adapter training``: a training step (forward and backward) through
  ``lstmfast.torch``'s layer against torch's; ``frame training``: the same for a
  layer fed one frame per call, its state carried, and backpropagated through all
  the frames at once (a recurrent agent's rollout).

Every measurement is a fresh Python process, and the two implementations of a case
run as process pairs, A B A B: the ratio of each pair is taken, and the table gives
their median and their range. Workers are started as ``python -m
lstmfast.bench.patterns --worker JOB`` and print one JSON line.
"""

import json
import os
import statistics
import sys
import time

import numpy as np

from lstmfast.bench import common

GAPS_MS = (0, 1, 10, 100)
CELLS = ("LSTM", "GRU")
SHAPES = ("stream", "small", "medium")
IMPLEMENTATIONS = ("torch", "lstmfast")
PIPELINE_PRODUCT = 384  # NumPy's float64 product between calls: (384 x 384) @ (384 x 384)
PIPELINE_VARIANTS = {"OpenBLAS default": {}, "OPENBLAS_THREAD_TIMEOUT=4": {
    "env": {"OPENBLAS_THREAD_TIMEOUT": "4"}}}
CELL_LOOP = {"I": 64, "H": 512, "N": 1, "steps": 100}  # a decoder's cell, stepped per token
FRAME_LOOP = {"I": 64, "H": 128, "N": 1, "frames": 100, "per_call": 1}  # a stream, a frame a call
CHUNK_LOOP = {**FRAME_LOOP, "per_call": 10}  # the same stream fed ten frames per call
TRAINING = {"T": 100, "N": 32, "I": 256, "H": 256}
# A layer fed a frame per call in training (a recurrent agent's rollout over 16
# environments, backpropagated through all its frames at once)
FRAME_TRAINING = {"I": 64, "H": 256, "N": 16, "frames": 64}
TINY_SHAPE = (4, 2, 8, 8)


# ---------------------------------------------------------------------------
# Workers (one process each)


def _torch(threads):
    import torch

    torch.set_num_threads(threads)
    return torch


def _layer(torch, impl, cell, I, H):  # noqa: E741
    """torch's layer or lstmfast.torch's, with the same weights."""
    torch.manual_seed(0)
    module = getattr(torch.nn, cell)(I, H)
    if impl == "lstmfast":
        import lstmfast.torch as lt

        fast = getattr(lt, cell)(I, H)
        fast.load_state_dict(module.state_dict())
        module = fast
    return module


def _frozen_if_asked(job, module):
    """lstmfast.torch.freeze's copy of lstmfast's module for a job of a frozen row; torch's
    module, and any module of another row, as it is."""
    if not (job.get("frozen") and job["impl"] == "lstmfast"):
        return module
    import lstmfast.torch as lt

    return lt.freeze(module)


def _call_times(fn, calls, gap_s=0.0, warmup=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def measure_gap(job):
    torch = _torch(job["threads"])
    import lstmfast

    lstmfast.set_num_threads(job["threads"])
    T, N, I, H = job["shape"]  # noqa: E741
    module = _layer(torch, job["impl"], job["cell"], I, H).eval()
    x = torch.randn(T, N, I)
    with torch.inference_mode():
        times = _call_times(lambda: module(x), job["calls"], job["gap_ms"] / 1000)
    return {"median": statistics.median(times), "times": times}


def measure_after_pools(job):
    """lstmfast's back-to-back call, in a fresh process or after torch's and NumPy's
    OpenBLAS's pools ran (their threads stay, spinning or asleep)."""
    torch = _torch(job["threads"])
    import lstmfast

    lstmfast.set_num_threads(job["threads"])
    T, N, I, H = job["shape"]  # noqa: E741
    if job["after"]:
        other = getattr(torch.nn, job["cell"])(I, H).eval()
        a = np.random.default_rng(0).standard_normal((512, 512))
        with torch.inference_mode():
            for _ in range(10):
                other(torch.randn(T, N, I))
                torch.randn(512, 512) @ torch.randn(512, 512)
                a @ a  # NumPy's own OpenBLAS
    module = _layer(torch, "lstmfast", job["cell"], I, H).eval()
    x = torch.randn(T, N, I)
    with torch.inference_mode():
        times = _call_times(lambda: module(x), job["calls"])
    return {"median": statistics.median(times), "times": times}


def measure_numpy_pipeline(job):
    """A NumPy program's loop: NumPy's product, then lstmfast's NumPy layer. torch is
    never imported (nor its OpenMP runtime loaded, which changes how lstmfast's pool
    reads the machine: docs/architecture.md)."""
    import lstmfast

    lstmfast.set_num_threads(job["threads"])
    T, N, I, H = job["shape"]  # noqa: E741
    layer = getattr(lstmfast, job["cell"])(I, H, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((T, N, I)).astype(np.float32)
    a = np.random.default_rng(1).standard_normal((job["product"], job["product"]))
    calls = []

    def iteration():
        a @ a
        t0 = time.perf_counter()
        layer(x)
        calls.append(time.perf_counter() - t0)

    times = _call_times(iteration, job["calls"])
    assert "torch" not in sys.modules
    return {"median": statistics.median(times), "times": times,
            "call_median": statistics.median(calls[-len(times):]),
            "openblas_thread_timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT")}


def measure_cell_loop(job):
    torch = _torch(job["threads"])
    import lstmfast

    lstmfast.set_num_threads(job["threads"])
    I, H, N, steps = (job["loop"][k] for k in ("I", "H", "N", "steps"))  # noqa: E741
    cell = _frozen_if_asked(job, _layer(torch, job["impl"], job["cell"] + "Cell", I, H).eval())
    feedback = torch.nn.Linear(H, I)
    x0 = torch.randn(N, I)

    def generate():
        x, h = x0, None
        for _ in range(steps):
            state = cell(x, h)
            h = state
            x = torch.tanh(feedback(state[0] if isinstance(state, tuple) else state))

    with torch.inference_mode():
        times = _call_times(generate, job["calls"], warmup=2)
    return {"median": statistics.median(times), "times": times}


def measure_frame_loop(job):
    torch = _torch(job["threads"])
    import lstmfast

    lstmfast.set_num_threads(job["threads"])
    I, H, N, frames, per_call = (job["loop"][k] for k in ("I", "H", "N", "frames", "per_call"))  # noqa: E741
    layer = _frozen_if_asked(job, _layer(torch, job["impl"], job["cell"], I, H).eval())
    stream = torch.randn(frames // per_call, per_call, N, I)  # (T = per_call, N, I) per call

    def feed():
        state = None
        for chunk in stream:
            _, state = layer(chunk, state)

    with torch.inference_mode():
        times = _call_times(feed, job["calls"], warmup=2)
    return {"median": statistics.median(times), "times": times}


def measure_training(job):
    torch = _torch(job["threads"])
    import lstmfast

    lstmfast.set_num_threads(job["threads"])
    T, N, I, H = (job["train"][k] for k in ("T", "N", "I", "H"))  # noqa: E741
    module = _layer(torch, job["impl"], job["cell"], I, H).train()
    x = torch.randn(T, N, I, requires_grad=True)

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x)[0].sum().backward()

    times = _call_times(step, job["calls"], warmup=2)
    return {"median": statistics.median(times), "times": times}


def measure_frame_training(job):
    torch = _torch(job["threads"])
    import lstmfast

    lstmfast.set_num_threads(job["threads"])
    I, H, N, frames = (job["loop"][k] for k in ("I", "H", "N", "frames"))  # noqa: E741
    layer = _layer(torch, job["impl"], job["cell"], I, H).train()
    stream = torch.randn(frames, 1, N, I)

    def step():
        layer.zero_grad(set_to_none=True)
        state, outputs = None, []
        for frame in stream:
            y, state = layer(frame, state)
            outputs.append(y)
        torch.cat(outputs).square().mean().backward()

    times = _call_times(step, job["calls"], warmup=2)
    return {"median": statistics.median(times), "times": times}


WORKERS = {"gap": measure_gap, "after_pools": measure_after_pools,
           "numpy_pipeline": measure_numpy_pipeline, "cell_loop": measure_cell_loop,
           "frame_loop": measure_frame_loop, "training": measure_training,
           "frame_training": measure_frame_training}


def worker_main(argv):
    return common.worker_main(argv, WORKERS, "--patterns")


# ---------------------------------------------------------------------------
# The parent: process pairs, ratios, the table


def run_worker(job):
    return common.run_worker("lstmfast.bench.patterns", job, job["kind"])


def pairs(job, variants, count, label):
    """``count`` rounds of one process per variant (dict name -> job update), A B A B;
    returns {name: [median per process]}."""
    medians = {name: [] for name in variants}
    for _ in range(count):
        for name, update in variants.items():
            print(f"      {label} {name} ...", file=sys.stderr, flush=True)
            medians[name].append(run_worker({**job, **update})["median"])
    return medians


def _ratios(numerators, denominators):
    return [a / b for a, b in zip(numerators, denominators)]


def versus_torch(pattern, case, got, **extra):
    """A row of torch against lstmfast.torch (got: each one's median per process):
    the median of each, and the pairs' ratios."""
    return {"pattern": pattern, "case": case, **extra,
            "seconds": {impl: statistics.median(got[impl]) for impl in IMPLEMENTATIONS},
            "ratio": summary(_ratios(got["torch"], got["lstmfast"]))}


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def cases(shapes, cells, threads, tiny):
    for cell in cells:
        for shape in shapes:
            yield cell, shape, TINY_SHAPE if tiny else common.SHAPES[shape]


def run(cells, shapes, threads, pair_count, calls, tiny=False, json_path=None):
    import torch

    gaps = GAPS_MS[:2] if tiny else GAPS_MS
    config = common.configuration(torch, None)
    print("lstmfast benchmark: call patterns, torch against lstmfast.torch, one process per measurement")
    for key, value in config.items():
        print(f"  {key:31s} {value}")
    print(f"  {'threads':31s} {threads}")
    print(f"  {'process pairs per case':31s} {pair_count}")
    print(f"  {'timed calls per process':31s} {calls}")
    print()
    rows = []
    base = {"threads": threads, "calls": calls}
    impls = {impl: {"impl": impl} for impl in IMPLEMENTATIONS}
    for cell, shape, dims in cases(shapes, cells, threads, tiny):
        own_gap0 = {}
        for gap in gaps:
            label = f"gap {gap} ms {cell} {shape}"
            got = pairs({**base, "kind": "gap", "cell": cell, "shape": dims, "gap_ms": gap}, impls,
                        pair_count, label)
            if gap == 0:
                own_gap0 = {impl: statistics.median(got[impl]) for impl in IMPLEMENTATIONS}
            rows.append(versus_torch("gap", f"{cell} {shape}", got, gap_ms=gap, vs_back_to_back={
                impl: statistics.median(got[impl]) / own_gap0[impl] for impl in IMPLEMENTATIONS}))
        got = pairs({**base, "kind": "after_pools", "cell": cell, "shape": dims},
                    {"fresh": {"after": False}, "after torch+OpenBLAS": {"after": True}}, pair_count,
                    f"after pools {cell} {shape}")
        rows.append({"pattern": "after pools", "case": f"{cell} {shape}",
                     "seconds": {k: statistics.median(v) for k, v in got.items()},
                     "ratio": summary(_ratios(got["after torch+OpenBLAS"], got["fresh"]))})
        product = 8 if tiny else PIPELINE_PRODUCT
        got = pairs({**base, "kind": "numpy_pipeline", "cell": cell, "shape": dims,
                     "product": product}, PIPELINE_VARIANTS, pair_count,
                    f"numpy pipeline {cell} {shape}")
        default, timeout = PIPELINE_VARIANTS
        rows.append({"pattern": "numpy pipeline", "case": f"{cell} {shape}, {product}^2 product",
                     "seconds": {k: statistics.median(v) for k, v in got.items()},
                     "ratio": summary(_ratios(got[default], got[timeout]))})
    loop = {k: (2 if tiny else v) for k, v in CELL_LOOP.items()}
    frames = {k: (min(v, 2) if tiny else v) for k, v in FRAME_LOOP.items()}
    chunks = {k: (min(v, 2) if tiny else v) for k, v in CHUNK_LOOP.items()}
    train = dict(zip("TNIH", TINY_SHAPE)) if tiny else TRAINING
    for cell in cells:
        loops = []
        for frozen in ("", "frozen "):
            loops += [
                (f"{frozen}cell loop", "cell_loop", {"loop": loop, "frozen": bool(frozen)},
                 f"{cell}Cell({loop['I']}, {loop['H']}) N={loop['N']}, {loop['steps']} steps")]
            loops += [
                (f"{frozen}{name} loop", "frame_loop", {"loop": of, "frozen": bool(frozen)},
                 f"{cell}({of['I']}, {of['H']}) N={of['N']}, {of['frames']} frames, "
                 f"{of['per_call']} a call") for name, of in (("frame", frames), ("chunk", chunks))]
        loops.append(("adapter training", "training", {"train": train},
                      f"{cell} T={train['T']} N={train['N']} I={train['I']} H={train['H']}"))
        rollout = {k: (min(v, 2) if tiny else v) for k, v in FRAME_TRAINING.items()}
        loops.append(("frame training", "frame_training", {"loop": rollout},
                      f"{cell}({rollout['I']}, {rollout['H']}) N={rollout['N']}, "
                      f"{rollout['frames']} frames"))
        for pattern, kind, job, case in loops:
            got = pairs({**base, "kind": kind, "cell": cell, **job}, impls, pair_count,
                        f"{pattern} {cell}")
            rows.append(versus_torch(pattern, case, got))
    print_table(rows)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"config": config, "threads": threads, "pairs": pair_count, "calls": calls,
                       "rows": rows}, f, indent=2)
        print(f"wrote {json_path}")
    return 0


# The rows of lstmfast alone in two kinds of process, printed on two lines: the label
# and the key in the row's seconds of each.
TWO_VARIANT_ROWS = {
    "after pools": (("fresh", "fresh"), ("after", "after torch+OpenBLAS")),
    "numpy pipeline": tuple(zip(("default", "timeout=4"), PIPELINE_VARIANTS)),
}


def _ms(seconds):
    return f"{seconds * 1e3:9.3f}"


def print_table(rows, file=None):
    print("gap: median call after an idle gap; x own: against the same implementation back to back;",
          file=file)
    print("vs torch: torch's time over lstmfast's, median (min-max) over the process pairs", file=file)
    print("numpy pipeline (no torch): NumPy's product and lstmfast's call, OpenBLAS's threads spinning",
          file=file)
    print("  for their default time after each product against OPENBLAS_THREAD_TIMEOUT=4; vs: default"
          " over 4", file=file)
    header = (f"{'pattern':17s} {'case':40s} {'gap':>5s} {'torch ms':>9s} {'x own':>6s} "
              f"{'lstmfast ms':>11s} {'x own':>6s} {'vs torch':>20s}")
    print(header, file=file)
    print("-" * len(header), file=file)
    for r in rows:
        s, q = r["seconds"], r["ratio"]
        spread = f"{q['median']:.2f}x ({q['min']:.2f}-{q['max']:.2f})"
        if r["pattern"] in TWO_VARIANT_ROWS:  # lstmfast alone, in two kinds of process
            (first, first_key), (second, second_key) = TWO_VARIANT_ROWS[r["pattern"]]
            ratio = f"after/fresh {q['median']:.2f}x" if r["pattern"] == "after pools" else spread
            print(f"{r['pattern']:17s} {r['case']:40s} {'-':>5s} {first:>9s} {'':6s} "
                  f"{_ms(s[first_key]):>11s} {'':6s} {'':>20s}", file=file)
            print(f"{'':17s} {'':40s} {'-':>5s} {second:>9s} {'':6s} "
                  f"{_ms(s[second_key]):>11s} {'':6s} {ratio:>20s}", file=file)
            continue
        gap = f"{r['gap_ms']}" if "gap_ms" in r else "-"
        own = r.get("vs_back_to_back", {})
        own_t = f"{own['torch']:.2f}x" if own else ""
        own_l = f"{own['lstmfast']:.2f}x" if own else ""
        print(f"{r['pattern']:17s} {r['case']:40s} {gap:>5s} {_ms(s['torch'])} {own_t:>6s} "
              f"{_ms(s['lstmfast']):>11s} {own_l:>6s} {spread:>20s}", file=file)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv))
