"""``gfc bench`` on the command line, and the memory probe's entry point."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from gfcompiler.bench.options import BACKEND_CHOICES, BENCH_DESCRIPTION, DEFAULT_BATCH, BenchOptions, parse_patches
from gfcompiler.errors import EXIT_HELP, GfcError, OutputError


def _check_output_path(path: str | None, flag: str) -> None:
    if path is None:
        return
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise OutputError(f"{flag} {path}: directory {parent} does not exist")
    if Path(path).is_dir():
        raise OutputError(f"{flag} {path}: is a directory")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{flag} {path}: directory {parent} is not writable")


def add_command(subparsers) -> None:
    """Register ``gfc bench`` on the top-level CLI's sub-parsers."""
    parser = subparsers.add_parser(
        "bench",
        help="time and measure the exact baseline and filtered variants of a model, side by side",
        description=BENCH_DESCRIPTION,
        epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="input .onnx model")
    parser.add_argument("--layers", default=None, help="as in gfc compile (default: last 4 convs)")
    parser.add_argument("--patch", default="4",
                        help="comma-separated patch sizes, e.g. 2,4,7 (the exact baseline always runs; default 4)")
    parser.add_argument("--backend", choices=BACKEND_CHOICES, default=None,
                        help="compile and measure every variant for this backend, or both side by side "
                             "(default: both where onnxruntime-training is installed, else onnx)")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"batch size (default: the model's static batch, else {DEFAULT_BATCH})")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved timed rounds (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads per session (default: onnxruntime's)")
    parser.add_argument("--profile-steps", type=int, default=5, help="profiled steps per variant (default 5; 0: no profile)")
    parser.add_argument("--memory-runs", type=int, default=3,
                        help="fresh processes per variant measuring peak memory; the median is reported (default 3; 0: skip)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each round wait up to this long for other processes to leave the CPUs idle, "
                             "and measure again a round during which they were busy (default 0: off)")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=N,C,H,W", help="as in gfc compile")
    parser.add_argument("--compare-single-graph", action="store_true",
                        help="also compile every ort-training variant with --single-graph (the whole forward in the "
                             "training session) and report two-stage / single-graph ratios")
    parser.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="write a chart (needs matplotlib: the bench extra)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    parser.set_defaults(handler=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from gfcompiler.bench.plot import plot, require_matplotlib
    from gfcompiler.bench.report import render_table
    from gfcompiler.bench.run import run_bench
    from gfcompiler.loading import InputShape

    options = BenchOptions(
        layers=args.layers, patches=parse_patches(args.patch), batch=args.batch, repeats=args.repeats,
        warmup=args.warmup, threads=args.threads, profile_steps=args.profile_steps, wait_idle=args.wait_idle,
        memory_runs=args.memory_runs, input_shapes=[InputShape.parse(text) for text in args.input_shape],
        single_graph=args.compare_single_graph, backend=args.backend,
    )
    options.check()
    _check_output_path(args.json, "--json")
    _check_output_path(args.plot, "--plot")
    if args.plot:
        require_matplotlib()

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"gfc: bench: {message}", file=sys.stderr, flush=True)

    report = run_bench(args.model, options, progress)
    print(render_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot([report], args.plot)
    return 0


def probe_main(argv: list[str]) -> int:
    """``python -m gfcompiler.bench --probe-memory DIR BATCH THREADS``: one JSON line on stdout."""
    from gfcompiler.bench.memory import probe_memory

    directory, batch, threads = Path(argv[0]), int(argv[1]), int(argv[2])
    try:
        print(json.dumps(probe_memory(directory, batch, threads or None)))
    except GfcError as error:
        print(f"gfc: error: {error}", file=sys.stderr)
        return error.exit_code
    return 0
