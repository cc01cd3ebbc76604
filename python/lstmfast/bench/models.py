"""``python -m lstmfast.bench --models``: whole torch models, torch against ``accelerate(model)``.

A layer benchmark says how fast the recurrent kernels are; a user wants to know
what ``lstmfast.torch.accelerate`` does to a model, where convolutions, linear
layers, attention, losses and optimizer steps take their own share. Seven small
models in the shape of common recurrent architectures are timed here as users run
them: every measurement is a fresh Python process, so the thread pools, caches and
allocator state one implementation leaves behind never touch the other.

For each model and mode, in this order:

1. one process builds the model from its seed twice, accelerates one copy, runs
   both on the same input and writes their outputs (and, for training, the loss and
   every parameter gradient) to a file; the parent compares them and refuses to
   time a model whose accelerated outputs disagree with torch's;
2. one process per implementation times the model: warm-up calls, then repeats of
   the plain call (the figure), then a separate repeat with forward hooks on the RNN
   modules that measures their share of the time (hooks cost a little per call, so
   they stay out of the main figure);
3. one process per implementation times the RNN modules alone: the same modules,
   called with the very inputs they received inside the model (recorded during one
   call), and nothing else.

Comparing the RNN speed-up inside the model with the speed-up of the same RNN alone
shows whether the model lets the kernels' speed through.

The models are in ``lstmfast.bench.model_zoo``. Workers are started as ``python -m
lstmfast.bench.models --worker JOB`` and print one JSON line; this module imports
torch, so ``lstmfast.bench.cli`` imports it only for ``--models``.
"""

import copy
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

import lstmfast
import lstmfast.torch
from lstmfast.bench import common
from lstmfast.bench.model_zoo import (
    AGREEMENT_RTOL, INPUT_SEED, INT8_AGREEMENT_RTOL, MODELS, accelerated_count, build, rnn_modules)

IMPLEMENTATIONS = ("torch", "accelerated")


# ---------------------------------------------------------------------------
# What the worker processes do.


def make_step(spec, model, inputs, target, mode):
    """One call (inference) or one training step; it returns the seconds of its forward
    part, loss included, which is where hooks can attribute time to modules."""
    if mode == "inference":
        model.eval()

        def step():
            t0 = time.perf_counter()
            with torch.inference_mode():
                model(*inputs)
            return time.perf_counter() - t0
        return step

    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = spec.loss(model(*inputs), target)
        forward_seconds = time.perf_counter() - t0
        loss.backward()
        optimizer.step()
        return forward_seconds
    return step


class RNNClock:
    """Forward pre/post hooks that add up the wall time spent inside the RNN modules."""

    def __init__(self, modules):
        self.modules, self.seconds, self._started, self._handles = modules, 0.0, {}, []

    def _pre(self, module, args):
        self._started[id(module)] = time.perf_counter()

    def _post(self, module, args, output):
        self.seconds += time.perf_counter() - self._started.pop(id(module))

    def __enter__(self):
        for m in self.modules:
            self._handles += [m.register_forward_pre_hook(self._pre), m.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []


@dataclass(frozen=True)
class Repeats:
    """Untimed calls first (at least ``warmup``, and for at least ``warmup_seconds``: the
    first calls create oneDNN primitives, grow workspaces and wake thread pools), then
    timed calls: at least ``minimum``, more while under ``min_seconds``, up to ``maximum``."""
    warmup: int
    warmup_seconds: float
    minimum: int
    min_seconds: float
    maximum: int
    hooked: int  # calls of the separate repeat with hooks

    @classmethod
    def for_run(cls, quick, tiny=False):
        if tiny:  # a test of the command: its figures mean nothing, so take as few as possible
            return cls(1, 0.0, 1, 0.0, 1, 1)
        return cls(2, 0.3, 3, 0.5, 20, 2) if quick else cls(2, 0.5, 5, 1.0, 30, 3)


def timed_calls(fn, repeats):
    start = time.perf_counter()
    warm = 0
    while warm < repeats.warmup or time.perf_counter() - start < repeats.warmup_seconds:
        fn()
        warm += 1
    times, start = [], time.perf_counter()
    while len(times) < repeats.minimum or (
            time.perf_counter() - start < repeats.min_seconds and len(times) < repeats.maximum):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _prepare(job):
    torch.set_num_threads(job["threads"])
    lstmfast.set_num_threads(job["threads"])
    model, inputs, target = build(job["model"], job["tiny"])
    if job.get("impl") == "accelerated":
        model = _accelerated(model, job["mode"], job.get("frozen", False))
    return MODELS[job["model"]], model, inputs, target


def _accelerated(model, mode, frozen):
    """The accelerated form of ``model`` for ``mode``: with --frozen an inference copy
    from lstmfast.torch.freeze (its recurrent weights packed once), else the model
    itself, accelerated in place."""
    if frozen and mode == "inference":
        return lstmfast.torch.freeze(model)
    return lstmfast.torch.accelerate(model)


def measure_model(job):
    """Median seconds per call or step, then, in a separate repeat with hooks, the RNN
    modules' seconds and their share of the (forward) time."""
    spec, model, inputs, target = _prepare(job)
    repeats = Repeats(**job["repeats"])
    step = make_step(spec, model, inputs, target, job["mode"])
    times = timed_calls(step, repeats)
    forward_times, rnn_times = [], []
    with RNNClock(rnn_modules(model)) as clock:
        for _ in range(repeats.hooked):
            clock.seconds = 0.0
            forward_times.append(step())
            rnn_times.append(clock.seconds)
    return {
        "seconds": statistics.median(times), "repeats": len(times),
        "rnn_seconds": statistics.median(rnn_times),
        "rnn_share": sum(rnn_times) / sum(forward_times),
        "rnn_modules": len(rnn_modules(model)), "accelerated_modules": accelerated_count(model),
    }


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _first_tensor(value):
    while not isinstance(value, torch.Tensor):
        value = value[0]
    return value


def record_rnn_calls(spec, model, inputs, target, mode):
    """Every call of an RNN module during one model call: (module, args, kwargs), the
    tensors copied as they arrived (strides and requires_grad included)."""
    calls = []

    def record(module, args, kwargs):
        calls.append((module, _detached(args), _detached(kwargs)))

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in rnn_modules(model)]
    try:
        if mode == "inference":
            model.eval()
            with torch.no_grad():  # not inference_mode: the copies must be usable outside it
                model(*inputs)
        else:
            model.train()
            spec.loss(model(*inputs), target)
    finally:
        for h in handles:
            h.remove()
    return calls


def measure_rnn_alone(job):
    """The RNN modules alone, called with the inputs they had inside the model: median
    seconds of the forward calls, and for training also of forward + backward."""
    spec, model, inputs, target = _prepare(job)
    repeats = Repeats(**job["repeats"])
    calls = record_rnn_calls(spec, model, inputs, target, job["mode"])
    if job["mode"] == "inference":
        def forward():
            with torch.inference_mode():
                for module, args, kwargs in calls:
                    module(*args, **kwargs)
        return {"seconds": statistics.median(timed_calls(forward, repeats)), "calls": len(calls)}

    modules = rnn_modules(model)
    leaves = [t for _, args, kwargs in calls for t in _tensors((args, kwargs)) if t.requires_grad]
    generator = torch.Generator().manual_seed(INPUT_SEED)
    with torch.no_grad():
        upstream = [torch.randn(_first_tensor(m(*a, **k)).shape, generator=generator) for m, a, k in calls]

    def forward():
        return [_first_tensor(module(*args, **kwargs)) for module, args, kwargs in calls]

    def forward_backward():
        for m in modules:
            m.zero_grad(set_to_none=True)
        for t in leaves:
            t.grad = None
        torch.autograd.backward(forward(), upstream)

    model.train()
    return {"seconds": statistics.median(timed_calls(forward, repeats)),
            "step_seconds": statistics.median(timed_calls(forward_backward, repeats)), "calls": len(calls)}


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def model_outputs(name, tiny, threads, path, frozen=False):
    """Both implementations of ``name`` from the same seed on the same input: their outputs
    (and for training the loss and every parameter gradient), saved to ``path`` as
    ``torch/<key>`` and ``accelerated/<key>`` arrays. ``frozen``: the accelerated
    inference is lstmfast.torch.freeze's copy, as --frozen times it."""
    torch.set_num_threads(threads)
    lstmfast.set_num_threads(threads)
    spec = MODELS[name]
    reference, inputs, target = build(name, tiny)
    accelerated = {mode: _accelerated(copy.deepcopy(reference), mode, frozen)
                   for mode in spec.modes}
    arrays = {}
    for impl in IMPLEMENTATIONS:
        for mode in spec.modes:
            model = reference if impl == "torch" else accelerated[mode]
            if mode == "inference":
                model.eval()
                with torch.inference_mode():
                    arrays[f"{impl}/{mode}/output"] = model(*inputs).numpy()
            else:
                model.train()
                model.zero_grad(set_to_none=True)
                output = model(*inputs)
                loss = spec.loss(output, target)
                loss.backward()
                arrays[f"{impl}/{mode}/output"] = output.detach().numpy()
                arrays[f"{impl}/{mode}/loss"] = loss.detach().numpy()
                for pname, p in model.named_parameters():
                    arrays[f"{impl}/{mode}/grad {pname}"] = p.grad.numpy()
    np.savez(path, **arrays)
    return {"arrays": len(arrays),
            "accelerated_modules": accelerated_count(accelerated[spec.modes[0]])}


WORKERS = {"model": measure_model, "alone": measure_rnn_alone,
           "check": lambda job: model_outputs(job["model"], job["tiny"], job["threads"], job["path"],
                                              job.get("frozen", False))}


def worker_main(argv):
    return common.worker_main(argv, WORKERS, "--models")


# ---------------------------------------------------------------------------
# The parent: starts the workers, checks, tabulates.


def run_worker(job):
    """Run one job in a fresh Python process; its last line of output is the JSON result."""
    return common.run_worker("lstmfast.bench.models", job, f"{job['kind']} {job['model']}")


def load_check_outputs(path):
    """The arrays a check worker saved: {impl: {key: array}}."""
    outputs = {impl: {} for impl in IMPLEMENTATIONS}
    with np.load(path) as saved:
        for name in saved.files:
            impl, key = name.split("/", 1)
            outputs[impl][key] = saved[name]
    return outputs


def compare_outputs(outputs):
    """The worst relative difference of the accelerated arrays from torch's, and where."""
    worst, where = 0.0, None
    expected, actual = outputs["torch"], outputs["accelerated"]
    if set(expected) != set(actual):
        return float("inf"), f"different outputs: {sorted(set(expected) ^ set(actual))}"
    for key, ref in expected.items():
        a, e = np.asarray(actual[key], np.float64), np.asarray(ref, np.float64)
        if a.shape != e.shape:
            return float("inf"), f"{key}: shape {a.shape} != {e.shape}"
        if not (np.isfinite(a).all() and np.isfinite(e).all()):
            return float("inf"), f"{key}: non-finite values"
        diff = np.abs(a - e).max(initial=0.0)
        scale = np.abs(e).max(initial=0.0)
        error = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
        if where is None or error > worst:
            worst, where = error, key
    return worst, where


def check_agreement(name, tiny, threads, frozen=False):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "outputs.npz")
        info = run_worker({"kind": "check", "model": name, "tiny": tiny, "threads": threads,
                           "path": path, "frozen": frozen})
        outputs = load_check_outputs(path)
    error, where = compare_outputs(outputs)
    return {"max_rel_diff": float(error), "where": where, "compared": info["arrays"] // 2,
            "agree": bool(error <= MODELS[name].agreement_rtol)}


def _ratio(a, b):
    return a / b if a and b else None


def expected_speedup(share, rnn_ratio):
    """The model's speed-up if only its RNN modules got faster, by rnn_ratio, and they
    took `share` of torch's time (Amdahl); None when either is unknown."""
    if not share or not rnn_ratio:
        return None
    return 1.0 / ((1.0 - share) + share / rnn_ratio)


def measure(name, mode, threads, tiny, repeats, pairs, frozen=False):
    """The model in `pairs` process pairs, torch and accelerated in turn (A B A B), then
    its RNN modules alone, one process per implementation."""
    base = {"model": name, "mode": mode, "threads": threads, "tiny": tiny, "repeats": repeats.__dict__,
            "frozen": frozen}
    runs = {impl: [] for impl in IMPLEMENTATIONS}
    for p in range(pairs):
        for impl in IMPLEMENTATIONS:
            print(f"      {name} {mode} t={threads}: model {impl} (pair {p + 1}/{pairs}) ...",
                  file=sys.stderr, flush=True)
            runs[impl].append(run_worker({**base, "kind": "model", "impl": impl}))
    alone = {}
    for impl in IMPLEMENTATIONS:
        print(f"      {name} {mode} t={threads}: alone {impl} ...", file=sys.stderr, flush=True)
        alone[impl] = run_worker({**base, "kind": "alone", "impl": impl})

    def median_of(key):
        return {impl: statistics.median(r[key] for r in runs[impl]) for impl in IMPLEMENTATIONS}

    pair_ratios = [t["seconds"] / a["seconds"] for t, a in zip(runs["torch"], runs["accelerated"])]
    row = {
        "model": name, "mode": mode, "threads": threads, "dtype": "float32", "pairs": pairs,
        "frozen": frozen and mode == "inference",
        "seconds": median_of("seconds"),
        "seconds_per_process": {impl: [r["seconds"] for r in runs[impl]] for impl in IMPLEMENTATIONS},
        "repeats": {impl: runs[impl][0]["repeats"] for impl in IMPLEMENTATIONS},
        "rnn_share": median_of("rnn_share"),
        # Hooks see module calls; backward runs in autograd's engine, outside them.
        "rnn_share_of": "call" if mode == "inference" else "forward",
        "rnn_seconds_in_model": median_of("rnn_seconds"),
        "rnn_alone_seconds": {impl: alone[impl]["seconds"] for impl in IMPLEMENTATIONS},
        "rnn_modules": runs["torch"][0]["rnn_modules"],
        "accelerated_modules": runs["accelerated"][0]["accelerated_modules"],
        "rnn_calls_per_step": alone["torch"]["calls"],
        "ratio": statistics.median(pair_ratios),
        "ratio_min": min(pair_ratios), "ratio_max": max(pair_ratios),
    }
    row["rnn_ratio_in_model"] = _ratio(*(row["rnn_seconds_in_model"][i] for i in IMPLEMENTATIONS))
    row["rnn_ratio_alone"] = _ratio(*(row["rnn_alone_seconds"][i] for i in IMPLEMENTATIONS))
    # The share of torch's time its RNN modules take, from the RNN alone: their forward
    # (inference) or forward and backward (training, whose backward hooks cannot see),
    # over torch's call or step.
    if mode == "training":
        row["rnn_alone_step_seconds"] = {impl: alone[impl]["step_seconds"] for impl in IMPLEMENTATIONS}
        row["rnn_ratio_alone_step"] = _ratio(*(row["rnn_alone_step_seconds"][i] for i in IMPLEMENTATIONS))
        rnn_torch, rnn_ratio = row["rnn_alone_step_seconds"]["torch"], row["rnn_ratio_alone_step"]
    else:
        rnn_torch, rnn_ratio = row["rnn_alone_seconds"]["torch"], row["rnn_ratio_alone"]
    row["rnn_share_alone"] = min(1.0, rnn_torch / row["seconds"]["torch"])
    row["expected"] = expected_speedup(row["rnn_share_alone"], rnn_ratio)
    row["of_expected"] = _ratio(row["ratio"], row["expected"])
    return row


def configuration(threads):
    config = common.configuration(torch, None)
    del config["reference_blas_threads_limited"]  # no NumPy reference runs here
    config["torch threads (intra-op)"] = config["lstmfast threads"] = ", ".join(map(str, threads))
    config["dtype"] = "float32"
    return config


def _fmt(value, spec, none="-"):
    return none if value is None else format(value, spec)


def print_table(rows, file=None):
    header = (f"{'model':14s} {'mode':10s} {'thr':>3s} {'torch':>9s} {'accel':>9s} {'speed-up':>8s} "
              f"{'(min-max)':>11s} {'expected':>8s} {'of exp.':>7s} "
              f"{'RNN share':>9s} {'(accel)':>7s} {'RNN in model':>12s} {'RNN alone':>9s} {'alone f+b':>9s} "
              f"{'swapped':>7s}")
    print(header, file=file)
    print("-" * len(header), file=file)
    for r in rows:
        star = "*" if r["rnn_share_of"] == "forward" else ""
        spread = f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
        of_expected = _fmt(None if r["of_expected"] is None else 100 * r["of_expected"], ".0f") + "%"
        print(f"{r['model']:14s} {r['mode'] + star:10s} {r['threads']:3d} "
              f"{common.fmt_time(r['seconds']['torch']):>9s} {common.fmt_time(r['seconds']['accelerated']):>9s} "
              f"{_fmt(r['ratio'], '.2f') + 'x':>8s} {spread:>11s} "
              f"{_fmt(r['expected'], '.2f') + 'x':>8s} {of_expected:>7s} "
              f"{100 * r['rnn_share']['torch']:8.0f}% {100 * r['rnn_share']['accelerated']:6.0f}% "
              f"{_fmt(r['rnn_ratio_in_model'], '.2f') + 'x':>12s} {_fmt(r['rnn_ratio_alone'], '.2f') + 'x':>9s} "
              f"{_fmt(r.get('rnn_ratio_alone_step'), '.2f') + ('x' if 'rnn_ratio_alone_step' in r else ''):>9s} "
              f"{str(r['accelerated_modules']) + '/' + str(r['rnn_modules']):>7s}", file=file)


LEGEND = """\
torch, accel: median seconds per model call (inference) or training step (forward, loss,
  backward, Adam step), each process's median, the median over process pairs run in turn (torch,
  accelerated, torch, ...), each a fresh process; speed-up = torch / accel (above 1x:
  accelerated faster), the median of the pairs' ratios, and (min-max) their range.
expected: the speed-up if only the RNN modules got faster, as fast as alone (RNN alone, or alone
  f+b for training) and taking the share of torch's time they take alone; of exp.: speed-up over it.
RNN share: time inside the RNN modules (forward hooks, in a separate repeat) over the time of the
  call, for torch and for the accelerated model. RNN in model: torch's RNN time / accelerated's,
  inside the model. RNN alone: the same for the RNN modules called alone with the inputs they had
  in the model, in their own processes. alone f+b: the same with forward and backward.
* training: hooks cannot attribute backward to modules (it runs in autograd's engine), so RNN
  share and RNN in model cover the forward pass and loss only, compared with RNN alone (forward).
swapped: RNN modules that accelerate() replaced, of all the model's RNN modules."""


def run(names, threads, quick=False, tiny=False, json_path=None, pairs=5, frozen=False, modes=None):
    """The whole ``--models`` benchmark; returns the exit code (1 if any model was refused).
    ``frozen``: the accelerated model of the inference rows is lstmfast.torch.freeze's copy.
    ``modes``: the modes timed (of those each model has; None: all of them); the
    agreement check covers every mode of the model still."""
    repeats = Repeats.for_run(quick, tiny)
    config = configuration(threads)
    config["accelerated"] = ("lstmfast.torch.freeze(model) for inference, accelerate(model) for "
                             "training" if frozen else "lstmfast.torch.accelerate(model)")
    print("lstmfast whole-model benchmark: torch against lstmfast.torch.accelerate(model)"
          + (", inference frozen (lstmfast.torch.freeze)" if frozen else ""))
    for key, value in config.items():
        print(f"  {key:31s} {value}")
    print(f"  {'sizes':31s} {'tiny (a test of the command, not a benchmark)' if tiny else 'full'}")
    print(f"  {'process pairs per model':31s} {pairs}")
    print(f"  {'agreement tolerance':31s} max|accelerated - torch| <= {AGREEMENT_RTOL:g} * max|torch|, "
          f"per output, loss and gradient ({INT8_AGREEMENT_RTOL:g} for int8 models)")
    print()
    sys.stdout.flush()
    size_key = "tiny" if tiny else "full"
    rows, refused, checks = [], [], {}
    for name in names:
        spec = MODELS[name]
        print(f"[{name}] agreement check ...", file=sys.stderr, flush=True)
        check = checks[name] = check_agreement(name, tiny, threads[0], frozen)
        line = (f"{name:14s} {', '.join(spec.modes)}: {spec.describe(spec.sizes[size_key])}\n"
                f"{'':14s} accelerated vs torch over {check['compared']} arrays: max relative difference "
                f"{check['max_rel_diff']:.2g} ({check['where']})")
        if not check["agree"]:
            line += f"  REFUSED: above {spec.agreement_rtol:g}, not timed"
            refused.append({"model": name, **check})
        print(line, flush=True)
        if not check["agree"]:
            continue
        timed = [mode for mode in spec.modes if modes is None or mode in modes]
        if not timed:
            print(f"{'':14s} not timed: it runs {', '.join(spec.modes)} only, and --modes asked for "
                  f"{', '.join(modes)}", flush=True)
        for mode in timed:
            for t in threads:
                print(f"[{name}] {mode}, {t} threads ...", file=sys.stderr, flush=True)
                row = measure(name, mode, t, tiny, repeats, pairs, frozen)
                row["shapes"] = spec.describe(spec.sizes[size_key])
                row["max_rel_diff"] = check["max_rel_diff"]
                rows.append(row)
                print(f"      torch {common.fmt_time(row['seconds']['torch'])}, accelerated "
                      f"{common.fmt_time(row['seconds']['accelerated'])}: {row['ratio']:.2f}x "
                      f"({row['ratio_min']:.2f}-{row['ratio_max']:.2f})", file=sys.stderr, flush=True)
    print()
    print_table(rows)
    print()
    print(LEGEND)
    if refused:
        print(f"refused (accelerated outputs differ from torch's): {', '.join(r['model'] for r in refused)}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"config": config, "sizes": size_key, "agreement_rtol": AGREEMENT_RTOL,
                       "results": rows, "refused": refused}, f, indent=2)
        print(f"wrote {json_path}")
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv))
