"""``python -m lstmfast.bench --variants``: recurrent cells torch.nn lacks, against
the loop of torch ops each community runs today, and against lstmfast's plain
LSTM at the same shape (what the variant costs).

Per variant, thread count and mode (inference: forward under inference_mode;
training: forward, then backward of a fixed random projection of the outputs, with
every gradient), three implementations are timed in interleaved blocks
(``lstmfast.bench.common.time_interleaved``) after their outputs are checked against
each other:

* ``torch loop``: the variant written as users write it, a Python loop over torch ops
  with autograd, from ``lstmfast.oracles`` (for the peephole LSTM: the ONNX/TensorFlow
  equations of docs/cells.md, Peephole LSTM; for the hard-sigmoid LSTM: Keras 2's LSTM
  ported to torch; for the CTRNN: Yang & Wang's primer module,
  as published; for the layer-normalized LSTM: torchaudio's RNN-T
  ``_CustomLSTM(layer_norm=True)``, itself when torchaudio imports, else its code
  transcribed, ``CustomLSTMLoop``; for the regularizers (docs/cells.md, Recurrent
  dropout and zoneout): a loop over ``nn.LSTMCell`` with one recurrent dropout mask on h
  per sequence, and ESPnet's ZoneOutCell around ``nn.LSTMCell``);
* ``lstmfast``: the variant's lstmfast.torch module (fused forward and BPTT);
* ``plain``: lstmfast.torch's plain layer of the same shape (LSTM; RNN for the CTRNN;
  the LSTM without the regularizer for the regularizers).

The regularizers are timed in training mode, each implementation drawing its own masks
every call; they are checked with the same masks given to both.

This module imports torch; ``lstmfast.bench.cli`` imports it only for ``--variants``.
"""

import json
import sys

import torch
from torch import nn

import lstmfast
import lstmfast.interop
import lstmfast.torch
from lstmfast.bench import common
from lstmfast.oracles import (CustomLSTMLoop, HardSigmoidLSTMLoop, PeepholeLoop, PrimerCTRNN,
                              RecurrentDropoutLoop, ZoneoutLoop)

AGREEMENT_RTOL = 1e-4
MODES = ("inference", "training")


def _lstm_loop_modules(loop, ours, s):
    """(loop, ours with the loop's weights, the plain LSTM) for an LSTM loop of
    lstmfast.oracles, whose parameters are ours without "_l0"."""
    with torch.no_grad():
        for name, p in loop.named_parameters():
            getattr(ours, name + "_l0").copy_(p)
    return loop, ours, lstmfast.torch.LSTM(s["I"], s["H"])


def _peephole_modules(s):
    return _lstm_loop_modules(PeepholeLoop(s["I"], s["H"]),
                              lstmfast.torch.PeepholeLSTM(s["I"], s["H"]), s)


def _hard_sigmoid_modules(s):
    return _lstm_loop_modules(
        HardSigmoidLSTMLoop(s["I"], s["H"]),
        lstmfast.torch.LSTM(s["I"], s["H"], activations=["HardSigmoid", "Tanh", "Tanh"]), s)


def _ctrnn_modules(s):
    loop = PrimerCTRNN(s["I"], s["H"])
    ours = lstmfast.torch.CTRNN(s["I"], s["H"], alpha=loop.alpha, leak="inside")
    with torch.no_grad():
        for theirs, mine in _CTRNN_NAMES.items():
            ours.get_parameter(mine).copy_(loop.get_parameter(theirs))
    return loop, ours, lstmfast.torch.RNN(s["I"], s["H"], nonlinearity="relu")


_CTRNN_NAMES = {"input2h.weight": "weight_ih_l0", "input2h.bias": "bias_ih_l0",
                "h2h.weight": "weight_hh_l0", "h2h.bias": "bias_hh_l0"}


def _custom_lstm_class():
    try:
        from torchaudio.models.rnnt import _CustomLSTM
    except Exception:  # noqa: BLE001  (not installed, or built for another torch)
        return CustomLSTMLoop
    return _CustomLSTM


class _StateAsTuple(nn.Module):
    """Calls a _CustomLSTM as the bench calls every module, ``module(x)``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x, None)


def _ln_lstm_modules(s):
    loop = _custom_lstm_class()(s["I"], s["H"], layer_norm=True, layer_norm_epsilon=1e-3)
    with torch.no_grad():  # the layer norms away from their identity start
        for name, p in loop.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ours = lstmfast.torch.LayerNormLSTM(s["I"], s["H"], layer_norm_eps=1e-3)
    with torch.no_grad():
        for theirs, mine in lstmfast.interop.TORCHAUDIO_LSTM_KEYS.items():
            ours.get_parameter(mine + "_l0").copy_(loop.get_parameter(theirs))
    return _StateAsTuple(loop), ours, lstmfast.torch.LSTM(s["I"], s["H"])


_LN_LSTM_NAMES = {"module." + key: name + "_l0" for key, name in
                  lstmfast.interop.TORCHAUDIO_LSTM_KEYS.items()}


class _Ours(nn.Module):
    """lstmfast.torch.LSTM with a regularizer, given the check's masks when fixed (as the
    regularized loops of lstmfast.oracles are)."""

    fixed = None

    def __init__(self, layer):
        super().__init__()
        self.lstm = layer

    def forward(self, x):
        return self.lstm(x, **(self.fixed or {}))


def _regularizer_modules(loop_cls, p, options):
    def make(s):
        loop = loop_cls(s["I"], s["H"], p)
        ours = _Ours(lstmfast.torch.LSTM(s["I"], s["H"], **options))
        with torch.no_grad():
            for theirs, mine in _CELL_NAMES.items():
                ours.get_parameter(mine).copy_(loop.get_parameter(theirs))
        return loop, ours, lstmfast.torch.LSTM(s["I"], s["H"])
    return make


def _check_masks(option, s):
    """The same masks for both implementations during the check."""
    generator = torch.Generator().manual_seed(2)
    if option == "recurrent_dropout":
        keep = (torch.rand(1, s["N"], s["H"], generator=generator) >= 0.25).float()
        return {"recurrent_dropout_mask": keep / 0.75}
    shape = (1, s["T"], s["N"], s["H"])
    return {"zoneout_mask": tuple((torch.rand(shape, generator=generator) < 0.1).float()
                                  for _ in range(2))}


_CELL_NAMES = {"cell.weight_ih": "lstm.weight_ih_l0", "cell.weight_hh": "lstm.weight_hh_l0",
               "cell.bias_ih": "lstm.bias_ih_l0", "cell.bias_hh": "lstm.bias_hh_l0"}

VARIANTS = {
    "peephole": {
        "describe": "peephole LSTM (docs/cells.md, Peephole LSTM)",
        "sizes": {"full": dict(T=100, N=8, I=256, H=256), "tiny": dict(T=4, N=2, I=3, H=5)},
        "modules": _peephole_modules,
        "loop_names": {},  # the loop's parameter names are ours without _l0
    },
    "ln_lstm": {
        "describe": "layer-normalized LSTM (docs/cells.md, Layer-normalized LSTM), torchaudio's RNN-T form, eps 1e-3",
        "sizes": {"full": dict(T=100, N=8, I=512, H=512), "tiny": dict(T=4, N=2, I=3, H=5)},
        "modules": _ln_lstm_modules,
        "loop_names": _LN_LSTM_NAMES,
    },
    "ctrnn": {
        "describe": "continuous-time RNN (docs/cells.md, Continuous-time RNN), leak inside the relu, alpha 0.2",
        "sizes": {"full": dict(T=100, N=16, I=3, H=64), "tiny": dict(T=4, N=2, I=3, H=5)},
        "modules": _ctrnn_modules,
        "loop_names": _CTRNN_NAMES,
    },
    "hard_sigmoid": {
        "describe": "LSTM with Keras 2's hard-sigmoid gates (ONNX's HardSigmoid, alpha 0.2, beta 0.5)",
        "sizes": {"full": dict(T=100, N=8, I=256, H=256), "tiny": dict(T=4, N=2, I=3, H=5)},
        "modules": _hard_sigmoid_modules,
        "loop_names": {},  # the loop's parameter names are ours without _l0
    },
    "rec_dropout": {
        "describe": "LSTM with recurrent dropout 0.25 (docs/cells.md, Recurrent dropout and zoneout), one mask per sequence",
        "sizes": {"full": dict(T=100, N=16, I=256, H=256), "tiny": dict(T=4, N=2, I=3, H=5)},
        "modules": _regularizer_modules(RecurrentDropoutLoop, 0.25, {"recurrent_dropout": 0.25}),
        "loop_names": _CELL_NAMES,
        "modes": ("training",),
        "check_masks": lambda s: _check_masks("recurrent_dropout", s),
    },
    "zoneout": {
        "describe": "LSTM with zoneout (0.1, 0.1) (docs/cells.md, Recurrent dropout and zoneout), ESPnet's convention",
        "sizes": {"full": dict(T=100, N=16, I=256, H=256), "tiny": dict(T=4, N=2, I=3, H=5)},
        "modules": _regularizer_modules(ZoneoutLoop, 0.1, {"zoneout": (0.1, 0.1)}),
        "loop_names": _CELL_NAMES,
        "modes": ("training",),
        "check_masks": lambda s: _check_masks("zoneout", s),
    },
}


def _runner(module, x, upstream, mode):
    if mode == "inference":
        def run():
            with torch.inference_mode():
                module(x)
        return run

    def run():
        module.zero_grad(set_to_none=True)
        (module(x)[0] * upstream).sum().backward()
    return run


def check(loop, ours, x, upstream, loop_names):
    """The worst relative difference of lstmfast's output and gradients from the loop's.
    loop_names: the loop's parameter names -> ours (default: ours without "_l0")."""
    worst = 0.0
    outputs = []
    for module in (loop, ours):
        module.zero_grad(set_to_none=True)
        out = module(x)[0]
        (out * upstream).sum().backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters()}
        outputs.append((out.detach(), grads))
    (a, ga), (b, gb) = outputs
    assert len(ga) == len(gb), "the loop and lstmfast have different parameters"
    ours_of = {k: loop_names.get(k, k + "_l0") for k in ga}
    for got, expected in [(b, a)] + [(gb[ours_of[k]], ga[k]) for k in ga]:
        worst = max(worst, ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item())
    return worst


def measure(name, threads, modes, rounds, min_time, tiny):
    spec = VARIANTS[name]
    sizes = spec["sizes"]["tiny" if tiny else "full"]
    torch.manual_seed(0)
    loop, ours, plain = spec["modules"](sizes)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(sizes["T"], sizes["N"], sizes["I"], generator=generator)
    upstream = torch.randn(sizes["T"], sizes["N"], sizes["H"], generator=generator)
    if "check_masks" in spec:
        loop.fixed = ours.fixed = spec["check_masks"](sizes)
    error = check(loop, ours, x, upstream, spec["loop_names"])
    loop.fixed = ours.fixed = None
    row_base = {"variant": name, "sizes": sizes, "max_rel_diff": error}
    if error > AGREEMENT_RTOL:
        return [dict(row_base, refused=True)]
    rows = []
    for t in threads:
        for mode in (m for m in modes if m in spec.get("modes", MODES)):
            runners = {impl: _runner(m, x, upstream, mode)
                       for impl, m in (("torch loop", loop), ("lstmfast", ours), ("plain", plain))}
            seconds = common.time_interleaved(runners, t, rounds, min_time, torch, None)
            rows.append(dict(row_base, threads=t, mode=mode, seconds=seconds,
                             speedup=seconds["torch loop"] / seconds["lstmfast"],
                             cost=seconds["lstmfast"] / seconds["plain"]))
    return rows


def run(names, threads, rounds, min_time, modes=MODES, tiny=False, json_path=None):
    config = common.configuration(torch, None)
    del config["reference_blas_threads_limited"]
    print("lstmfast benchmark: cell variants against the torch loops users run today")
    for key, value in config.items():
        print(f"  {key:31s} {value}")
    print(f"  {'dtype':31s} float32")
    print(f"  {'sizes':31s} {'tiny (a test of the command, not a benchmark)' if tiny else 'full'}")
    print()
    rows = []
    for name in names:
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        rows += measure(name, threads, modes, rounds, min_time, tiny)
    header = (f"{'variant':10s} {'T':>4s} {'N':>3s} {'I':>5s} {'H':>5s} {'mode':9s} {'thr':>3s} "
              f"{'torch loop':>11s} {'lstmfast':>10s} {'plain':>11s} {'vs loop':>8s} {'vs plain':>9s}")
    print(header)
    print("-" * len(header))
    for row in rows:
        s = row["sizes"]
        lead = f"{row['variant']:10s} {s['T']:4d} {s['N']:3d} {s['I']:5d} {s['H']:5d}"
        if row.get("refused"):
            print(f"{lead} REFUSED: lstmfast differs from the loop by {row['max_rel_diff']:.2g}")
            continue
        sec = row["seconds"]
        print(f"{lead} {row['mode']:9s} {row['threads']:3d} {common.fmt_time(sec['torch loop']):>11s} "
              f"{common.fmt_time(sec['lstmfast']):>10s} {common.fmt_time(sec['plain']):>11s} "
              f"{row['speedup']:7.2f}x {row['cost']:8.2f}x")
    print()
    print("vs loop: the torch loop's time over lstmfast's (above 1x: lstmfast faster); vs plain: "
          "lstmfast's variant\nover lstmfast's plain layer (LSTM; RNN for ctrnn; the LSTM without the "
          "regularizer) at the same shape "
          "(what the variant costs). "
          "Output and every\nparameter gradient agree with the loop's to "
          + ", ".join(f"{name} {diff:.1g}" for name, diff in
                      {r["variant"]: r["max_rel_diff"] for r in rows}.items())
          + " (relative), checked before timing.")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"config": config, "results": rows}, f, indent=2, default=float)
        print(f"wrote {json_path}")
    return 1 if any(r.get("refused") for r in rows) else 0
