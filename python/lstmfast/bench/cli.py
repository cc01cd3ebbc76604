"""``python -m lstmfast.bench``: lstmfast against the NumPy reference and torch.

The command line of the benchmark: its options, their checks, and the dispatch to a
mode: the grid (``lstmfast.bench.grid``) by default, or ``--models``, ``--peers``,
``--variants`` or ``--patterns``. A mode's module is imported only when that mode
runs, since the torch-only ones import torch and the grid must run without it.
"""

import argparse

from lstmfast.bench.common import CELLS, GRID_SHAPES, MODES, SHAPES, SWEEP_BYTES, try_import_torch


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lstmfast.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a reduced grid that finishes in under a minute; with --models, fewer repeats")
    parser.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS))
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(GRID_SHAPES),
                        help="default: the grid's five; chunk (T=10, N=1, I=H=128) is asked for by name")
    parser.add_argument("--modes", nargs="+", choices=MODES, help="default: both")
    parser.add_argument("--threads", nargs="+", type=int,
                        help="thread counts (default: 1 2, and 2 with --models)")
    parser.add_argument("--rounds", type=int, default=5, help="minimum timed rounds per case")
    parser.add_argument("--min-time", type=float, default=0.5, help="minimum seconds of timing per case")
    parser.add_argument("--no-torch", action="store_true", help="do not benchmark torch even when installed")
    parser.add_argument("--json", metavar="FILE", help="write the configuration and all figures to FILE")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the speedups (needs matplotlib)")
    parser.add_argument("--no-variants", action="store_true",
                        help="skip the variant cases (lengths, float64, bidirectional, 2 layers, "
                             "an LSTM with a projection)")
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
                             "float32 and int8, against lstmfast float32 (also frozen) and lstmfast.quantize's "
                             "int8 and bfloat16")
    parser.add_argument("--frozen", action="store_true",
                        help="with --models: the accelerated model of the inference rows is "
                             "lstmfast.torch.freeze(model), its recurrent weights packed once")
    parser.add_argument("--cold", action="store_true",
                        help=f"with --peers: every timed call comes after a sweep of {SWEEP_BYTES >> 20} MB of "
                             "memory, which leaves the caches cold, as a call after other work finds them")
    parser.add_argument("--repeat", type=int, default=1, metavar="R",
                        help="with --peers: run the cases R times, each time in a fresh process, and give "
                             "each time's median over the runs and the range of each ratio (default 1: one "
                             "run, in this process)")
    parser.add_argument("--variants", nargs="?", const="all", metavar="NAME,...",
                        help="instead of the grid, time the cells and options torch.nn lacks against the "
                             "torch loop users run today and against lstmfast's plain layer, training and "
                             "inference; all of them, or a comma-separated subset of: peephole, ln_lstm, "
                             "ctrnn, rec_dropout, zoneout, hard_sigmoid")
    parser.add_argument("--patterns", action="store_true",
                        help="instead of the grid, time the call patterns users meet, torch against "
                             "lstmfast.torch, one process per measurement: calls after idle gaps, after "
                             "torch's and OpenBLAS's pools ran, a one-step cell loop and a layer fed "
                             "one frame or ten frames per call (each also frozen: "
                             "lstmfast.torch.freeze), the adapter's training step, of a whole "
                             "sequence and of a layer fed a frame per call")
    parser.add_argument("--pairs", type=int,
                        help="with --patterns or --models: process pairs (A B A B) per case (default 5; "
                             "2 with --quick, 1 with --tiny)")
    parser.add_argument("--onnx", metavar="FILE",
                        help="time every LSTM, GRU and RNN node of an ONNX model: lstmfast "
                             "(from_onnx) against ONNX Runtime running the node")
    parser.add_argument("--onnx-shape", metavar="T,N",
                        help="with --onnx: the sequence length and batch (default: the file's "
                             "input shape where it gives it whole, else 100,8)")
    parser.add_argument("--tiny", action="store_true",
                        help="with --models, --patterns, --peers or --variants: tiny sizes, to test the command (the "
                             "figures mean nothing)")
    args = parser.parse_args(argv)
    if args.cold and not args.peers:
        parser.error("--cold goes with --peers")
    if args.repeat != 1 and not args.peers:
        parser.error("--repeat goes with --peers")
    if args.frozen and args.models is None:
        parser.error("--frozen goes with --models")

    if args.onnx is not None:
        return _main_onnx(parser, args)
    if args.onnx_shape is not None:
        parser.error("--onnx-shape goes with --onnx")
    if args.models is not None:
        return _main_models(parser, args)
    if args.patterns:
        return _main_patterns(parser, args)
    if args.tiny and not (args.peers or args.variants is not None):
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
    if args.variants is not None:
        return _main_variants(parser, args)
    args.modes = args.modes or list(MODES)
    from lstmfast.bench import grid

    return grid.run(args.cells, args.shapes, args.modes, args.threads, args.rounds, args.min_time,
                    no_torch=args.no_torch, variants=not args.no_variants, memory=args.memory,
                    json_path=args.json, plot_path=args.plot)


def _main_onnx(parser, args):
    if (args.models is not None or args.peers or args.variants is not None or args.patterns
            or args.plot):
        parser.error("--onnx is a mode of its own")
    shape = None
    if args.onnx_shape is not None:
        try:
            shape = [int(v) for v in args.onnx_shape.split(",")]
        except ValueError:
            shape = []
        if len(shape) != 2 or min(shape) < 1:
            parser.error(f"--onnx-shape: expected T,N (two positive ints), got {args.onnx_shape!r}")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        parser.error(f"--onnx needs onnx and onnxruntime ({exc})")
    from lstmfast.bench import onnx_file

    return onnx_file.run(args.onnx, args.threads or [1, 2], shape, args.rounds, args.min_time,
                         json_path=args.json)


def _main_models(parser, args):
    if args.plot or args.memory or args.no_torch:
        parser.error("--models times torch models; --plot, --memory and --no-torch do not apply")
    if try_import_torch() is None:
        parser.error("--models needs torch: pip install 'lstmfast[torch]'")
    from lstmfast.bench import models

    names = list(models.MODELS) if args.models == "all" else args.models.split(",")
    unknown = [n for n in names if n not in models.MODELS]
    if unknown or not names:
        parser.error(f"--models: unknown model {', '.join(unknown)!r}; choose from {', '.join(models.MODELS)}")
    threads = args.threads or [2]
    if any(t < 1 for t in threads):
        parser.error("--threads must be positive")
    pairs = _pairs(parser, args)
    return models.run(names, threads, quick=args.quick, tiny=args.tiny, json_path=args.json, pairs=pairs,
                      frozen=args.frozen, modes=args.modes)


def _main_patterns(parser, args):
    if args.plot or args.memory or args.no_torch:
        parser.error("--patterns times torch against lstmfast.torch; --plot, --memory and --no-torch do not apply")
    if try_import_torch() is None:
        parser.error("--patterns needs torch: pip install 'lstmfast[torch]'")
    threads = args.threads or [2]
    if len(threads) != 1 or threads[0] < 1:
        parser.error("--patterns takes one positive --threads count")
    pairs = _pairs(parser, args)
    from lstmfast.bench import patterns

    shapes = [s for s in args.shapes if s in patterns.SHAPES]
    if not shapes:
        parser.error(f"--patterns: --shapes among {', '.join(patterns.SHAPES)}")
    return patterns.run(args.cells, shapes, threads[0], pairs, calls=10 if args.quick else 30,
                        tiny=args.tiny, json_path=args.json)


def _pairs(parser, args):
    """Process pairs per case: --pairs, else 1 with --tiny, 2 with --quick, 5."""
    pairs = args.pairs if args.pairs is not None else 1 if args.tiny else 2 if args.quick else 5
    if pairs < 1:
        parser.error("--pairs must be positive")
    return pairs


def _main_peers(parser, args):
    if args.plot or args.memory:
        parser.error("--peers: --plot and --memory do not apply")
    if args.modes and args.modes != ["inference"]:
        parser.error("--peers times inference only")
    if args.repeat < 1:
        parser.error(f"--repeat must be positive, got {args.repeat}")
    from lstmfast.bench import peers

    if args.repeat > 1:
        # The options of one run, as parsed (--quick already applied).
        child = ["--cells", *args.cells, "--shapes", *args.shapes, "--threads", *map(str, args.threads),
                 "--rounds", str(args.rounds), "--min-time", str(args.min_time)]
        child += [flag for flag, on in (("--no-torch", args.no_torch), ("--tiny", args.tiny),
                                        ("--cold", args.cold)) if on]
        return peers.run_repeated(args.repeat, child, json_path=args.json, cold=args.cold)
    return peers.run(args.cells, args.shapes, args.threads, args.rounds, args.min_time,
                     no_torch=args.no_torch, tiny=args.tiny, json_path=args.json, cold=args.cold)


def _main_variants(parser, args):
    if args.plot or args.memory or args.no_torch:
        parser.error("--variants times torch modules; --plot, --memory and --no-torch do not apply")
    if try_import_torch() is None:
        parser.error("--variants needs torch: pip install 'lstmfast[torch]'")
    from lstmfast.bench import variants

    names = list(variants.VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [n for n in names if n not in variants.VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(variants.VARIANTS)})")
    return variants.run(names, args.threads, args.rounds, args.min_time,
                        modes=args.modes or variants.MODES, tiny=args.tiny, json_path=args.json)
