"""``python -m lstmfast.bench.contention``: lstmfast sharing the cores with others.

Two questions the grid of ``python -m lstmfast.bench`` does not ask:

* **Inside a torch program.** A CRNN-like recognizer (a Conv2d/BatchNorm/ReLU/
  MaxPool stack over a 1 x 32 x W image, W/4 columns, two bidirectional
  ``nn.LSTM(., 256)``, linear layers), batch 1, torch and lstmfast on the same
  thread count: the whole model and the time spent inside its LSTMs (forward
  hooks), torch's LSTMs against ``lstmfast.torch.accelerate``; and the same two
  LSTMs alone on the features. Here lstmfast's pool meets torch's OpenMP workers,
  which keep spinning for a while after each of torch's parallel regions.
* **More runnable threads than cores.** The NumPy API's LSTM at the ``small`` and
  ``stream`` shapes, inference and training: the time with ``set_num_threads(k)``
  for k above the cores, and with a busy process pinned on one core, each as a
  ratio to the time with as many threads as cores and no busy process of ours.

Every figure comes from a fresh process (thread pools, OpenMP's and ours, keep
state between calls), and the alternatives of a comparison run in interleaved
rounds, so that the noise of the machine hits them alike; the figure is the
median over rounds of each process's median. Each process checks its result
(accelerated against torch's LSTMs, the fused LSTM against the NumPy reference)
before timing.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from lstmfast.bench import common

# name -> (T, N, I, H): two of the grid's shapes
SHAPES = {name: common.SHAPES[name] for name in ("stream", "small")}


def _cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------
# One measurement (runs in its own process)


def _crnn(torch, width):
    from torch import nn

    def block(i, o):
        return [nn.Conv2d(i, o, 3, 1, 1), nn.BatchNorm2d(o), nn.ReLU(True)]

    class CRNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.cnn = nn.Sequential(
                *block(1, 64), nn.MaxPool2d(2, 2),            # 16 x W/2
                *block(64, 128), nn.MaxPool2d(2, 2),          # 8 x W/4
                *block(128, 256), *block(256, 256), nn.MaxPool2d((2, 1)),  # 4 x W/4
                *block(256, 512), nn.MaxPool2d((2, 1)),       # 2 x W/4
                nn.Conv2d(512, 512, (2, 1)), nn.BatchNorm2d(512), nn.ReLU(True))  # 1 x W/4
            self.rnn1 = nn.LSTM(512, 256, bidirectional=True)
            self.embed1 = nn.Linear(512, 256)
            self.rnn2 = nn.LSTM(256, 256, bidirectional=True)
            self.embed2 = nn.Linear(512, 96)

        def features(self, image):
            return self.cnn(image).squeeze(2).permute(2, 0, 1)  # (W/4, 1, 512)

        def sequence(self, features):
            y, _ = self.rnn1(features)
            y, _ = self.rnn2(self.embed1(y))
            return self.embed2(y)

        def forward(self, image):
            return self.sequence(self.features(image))

    torch.manual_seed(0)
    model = CRNN().eval()
    image = torch.randn(1, 1, 32, width)
    return model, image


def measure_crnn(impl, threads, width, iters, isolated):
    """Median seconds per image of the whole model and of its LSTMs."""
    import torch

    import lstmfast
    from lstmfast.torch import accelerate

    torch.set_num_threads(threads)
    lstmfast.set_num_threads(threads)
    model, image = _crnn(torch, width)
    with torch.no_grad():
        features = model.features(image)
        expected = model.sequence(features)
        if impl == "lstmfast":
            accelerate(model)
            got = model.sequence(features)
            error = float((got - expected).abs().max())
            if error > 1e-4:
                raise AssertionError(f"accelerated CRNN differs from torch's by {error:.3g}")
    inside, started = [0.0], [0.0]

    def enter(module, args):
        started[0] = time.perf_counter()

    def leave(module, args, output):
        inside[0] += time.perf_counter() - started[0]

    for rnn in (model.rnn1, model.rnn2):
        rnn.register_forward_pre_hook(enter)
        rnn.register_forward_hook(leave)
    run = (lambda: model.sequence(features)) if isolated else (lambda: model(image))
    totals, lstms = [], []
    with torch.no_grad():
        for i in range(iters + max(2, iters // 4)):  # the first calls are warm-up
            inside[0] = 0.0
            t0 = time.perf_counter()
            run()
            total = time.perf_counter() - t0
            if i >= max(2, iters // 4):
                totals.append(total)
                lstms.append(inside[0])
    return {"total": statistics.median(totals), "lstm": statistics.median(lstms)}


def measure_numpy_lstm(shape, training, threads, min_time):
    """Median seconds per call of a one-layer LSTM through the NumPy API."""
    import numpy as np

    import lstmfast

    lstmfast.set_num_threads(threads)
    T, N, I, H = SHAPES[shape]  # noqa: E741
    layer = lstmfast.LSTM(I, H, seed=0).train(training)
    x = np.random.default_rng(0).standard_normal((T, N, I)).astype(np.float32)
    reference = lstmfast.LSTM(I, H, seed=0, backend="numpy").eval()
    error = float(np.abs(layer(x)[0] - reference(x)[0]).max())
    if error > 1e-4:
        raise AssertionError(f"fused LSTM differs from the reference by {error:.3g}")

    def call():
        out, _ = layer(x)
        if training:
            layer.backward(np.ones_like(out))

    call()
    call()
    times, end = [], time.perf_counter() + min_time
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"time": statistics.median(times)}


def _measure(spec):
    if spec["what"] == "crnn":
        return measure_crnn(spec["impl"], spec["threads"], spec["width"], spec["iters"],
                            spec["isolated"])
    return measure_numpy_lstm(spec["shape"], spec["training"], spec["threads"], spec["min_time"])


# ------------------------------------------------------------------------------------------
# The driver


def _in_process(spec, env=None):
    """Runs one measurement in a fresh interpreter; its result, or None if it failed."""
    out = subprocess.run([sys.executable, "-m", "lstmfast.bench.contention", "--measure",
                          json.dumps(spec)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(f"  measurement failed: {spec}\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


class _BusyCore:
    """A process that spins on one core (the first this process may use) while in use."""

    def __enter__(self):
        code = ("import os\n"
                "if hasattr(os, 'sched_setaffinity'):\n"
                "    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
                "while True:\n    pass\n")
        self.process = subprocess.Popen([sys.executable, "-c", code])
        time.sleep(0.2)  # started and spinning
        return self

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait()


def _median(results, key):
    values = [r[key] for r in results if r is not None]
    return statistics.median(values) if values else None


def _ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:8.2f} ms"


def _ratio(a, b):
    return "-" if a is None or b is None else f"{a / b:5.2f}x"


def run_crnn(args, report):
    threads = args.threads
    columns = args.width // 4
    for isolated in (False, True):
        what = "the two BiLSTMs alone" if isolated else "CRNN whole model"
        print(f"\n{what}: 1x32x{args.width} image, {columns} columns, batch 1, "
              f"{threads} threads (torch and lstmfast); rounds: {args.rounds}")
        results = {"torch": [], "lstmfast": []}
        for _ in range(args.rounds):
            for impl in results:
                results[impl].append(_in_process(dict(
                    what="crnn", impl=impl, threads=threads, width=args.width,
                    iters=args.iters, isolated=isolated)))
        t, f = results["torch"], results["lstmfast"]
        key = "isolated" if isolated else "crnn"
        report[key] = {impl: {"total": _median(r, "total"), "lstm": _median(r, "lstm")}
                       for impl, r in results.items()}
        if not isolated:
            print(f"  whole model   torch {_ms(_median(t, 'total'))}   lstmfast "
                  f"{_ms(_median(f, 'total'))}   speedup {_ratio(_median(t, 'total'), _median(f, 'total'))}")
        print(f"  in the LSTMs  torch {_ms(_median(t, 'lstm'))}   lstmfast "
              f"{_ms(_median(f, 'lstm'))}   speedup {_ratio(_median(t, 'lstm'), _median(f, 'lstm'))}")


def run_oversubscription(args, report):
    cores = args.threads
    counts = sorted({cores, 2 * cores, 4 * cores})
    print(f"\nmore threads than cores: NumPy API LSTM, float32; time at {cores} threads, then "
          f"ratios to it at k threads and beside a busy core; rounds: {args.rounds}")
    print(f"  {'case':34s} {'time':>11s}  " + "  ".join(
        f"{'k=' + str(k):>7s}" for k in counts if k != cores) + "  busy core")
    report["oversubscription"] = []
    for shape in args.shapes:
        for training in (False, True):
            results = {k: [] for k in counts}
            results["busy"] = []
            for _ in range(args.rounds):
                spec = dict(what="lstm", shape=shape, training=training, min_time=args.min_time)
                for k in counts:
                    results[k].append(_in_process(dict(spec, threads=k)))
                with _BusyCore():
                    results["busy"].append(_in_process(dict(spec, threads=cores)))
            base = _median(results[cores], "time")
            row = {k: _median(v, "time") for k, v in results.items()}
            T, N, I, H = SHAPES[shape]  # noqa: E741
            label = f"{shape} T={T} N={N} I=H={H} {'training' if training else 'inference'}"
            print(f"  {label:34s} {_ms(base)}  " + "  ".join(
                f"{_ratio(row[k], base):>7s}" for k in counts if k != cores) +
                f"  {_ratio(row['busy'], base):>7s}")
            report["oversubscription"].append(dict(
                shape=shape, training=training, threads=cores,
                times={str(k): v for k, v in row.items()}))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lstmfast.bench.contention",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # one measurement (internal)
    parser.add_argument("--threads", type=int, default=_cpus(),
                        help="threads for torch and lstmfast (default: the CPUs available)")
    parser.add_argument("--rounds", type=int, default=3, help="processes per measurement")
    parser.add_argument("--width", type=int, default=1000, help="image width (columns x 4)")
    parser.add_argument("--iters", type=int, default=20, help="timed images per process")
    parser.add_argument("--min-time", type=float, default=1.0,
                        help="seconds of timing per NumPy API process")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--skip", nargs="+", choices=["crnn", "oversubscription"], default=[])
    parser.add_argument("--quick", action="store_true", help="1 round, fewer images, shorter timing")
    parser.add_argument("--json", metavar="FILE", help="write the configuration and figures to FILE")
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(_measure(json.loads(args.measure))))
        return 0
    if args.quick:
        args.rounds, args.iters, args.min_time = 1, 8, 0.3

    import lstmfast

    try:
        import torch
    except ImportError:
        torch = None
    print(f"cpus available: {_cpus()}; threads: {args.threads}; "
          f"torch {torch.__version__ if torch else 'not installed'}")
    lstmfast.show_config()
    report = {"cpus": _cpus(), "threads": args.threads,
              "simd_target": lstmfast._config.simd_target(),
              "torch": torch.__version__ if torch else None}
    if "crnn" not in args.skip:
        if torch is None:
            print("\nCRNN: skipped (torch is not installed)")
        else:
            run_crnn(args, report)
    if "oversubscription" not in args.skip:
        run_oversubscription(args, report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
