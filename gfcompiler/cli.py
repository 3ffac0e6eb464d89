"""The ``gfc`` command line: one parser for every command, run by one error handler.

`build_parser` registers every command (compile and inspect here; train, eval and
export from gfcompiler.runtime.cli; bench from gfcompiler.bench.cli; federate from
gfcompiler.federated.cli; demo from gfcompiler.demo). Registering imports no heavy
module: each handler imports what it needs (onnx, onnxruntime, flwr) when it runs, so
``gfc --help`` stays fast. `main` runs the
chosen command through `gfcompiler.commandline.run_command`: a `GfcError` is printed as
one line on stderr (``gfc: error: ...``) and exits with its code (see
`gfcompiler.errors`), with no traceback unless ``--debug``. Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import sys

from gfcompiler import __version__, demo
from gfcompiler.bench.cli import add_command as add_bench_command
from gfcompiler.commandline import SELECTION_HELP, add_debug_flag, run_command
from gfcompiler.errors import EXIT_HELP
from gfcompiler.federated.cli import add_command as add_federate_command
from gfcompiler.manifest import LOSSES
from gfcompiler.runtime.cli import add_commands as add_runtime_commands


def _stage(message: str) -> None:
    print(f"gfc: {message}", file=sys.stderr, flush=True)


def _warnings_only(message: str) -> None:
    """``-q``: the compiler's progress is silent, its warnings are not."""
    if message.startswith("warning: "):
        _stage(message)


def _cmd_compile(args: argparse.Namespace) -> int:
    from gfcompiler.artifacts import OptimizerSpec
    from gfcompiler.driver import CompileOptions, compile_model
    from gfcompiler.inspect import render_summary
    from gfcompiler.loading import InputShape

    options = CompileOptions(
        layers=args.layers,
        patch=args.patch,
        loss=args.loss,
        optimizer=OptimizerSpec(name=args.optimizer, momentum=args.momentum, weight_decay=args.weight_decay),
        input_shapes=[InputShape.parse(text) for text in args.input_shape],
        force=args.force,
        force_forward_pooling=not args.no_forward_pooling,
        keep_softmax=args.keep_softmax,
        single_graph=args.single_graph,
        backend=args.backend,
        ignore_index=args.ignore_index,
        train_output=args.train_output,
    )
    manifest = compile_model(args.model, args.output, options, progress=_warnings_only if args.quiet else _stage)
    if not args.quiet:
        print(render_summary(manifest))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from gfcompiler import inspect

    return inspect.run(args)


def _compile_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "compile",
        help="compile an ONNX CNN into gradient-filtered training artifacts",
        description="Compile an ONNX CNN into training artifacts whose trained convs use gradient filtering.\n\n" + SELECTION_HELP,
        epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="input .onnx model (external data files next to it)")
    parser.add_argument("-o", "--output", required=True, help="output directory (created; must not exist or be empty)")
    parser.add_argument("--layers", default=None, help="last N convs, 'all', or comma-separated Conv node names (default: last 4)")
    parser.add_argument("--patch", type=int, default=4, help="patch size r (2, 4, 7 in the paper); 0 = exact backward baseline (default 4)")
    parser.add_argument("--loss", choices=LOSSES, default="cross_entropy",
                        help="cross_entropy: class indices per sample (N×C output) or per pixel (N×C×H×W output, "
                             "labels N×H×W); bce: targets shaped like the output (a binary mask for N×1×H×W); "
                             "mse, l1: targets shaped like the output")
    parser.add_argument("--ignore-index", type=int, default=None, metavar="N",
                        help="per-pixel cross_entropy: pixels labelled N are ignored (no loss, no gradient; the mean "
                             "is over the others), as torch's ignore_index (default 255)")
    parser.add_argument("--train-output", default=None, metavar="NAME",
                        help="the model output the loss trains, required when the model has several (a detector's "
                             "scores, an OCR head...): one output only; the others, and the nodes only they need, "
                             "are dropped, so the artifacts train, evaluate and export this output alone")
    parser.add_argument("--keep-softmax", action="store_true",
                        help="with --loss cross_entropy, keep a Softmax that ends the model; by default the model is "
                             "trained on the Softmax's input (the logits), as the loss applies its own softmax, and "
                             "the artifacts output logits (a warning says so)")
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    parser.add_argument("--weight-decay", type=float, default=None, help="default 0.01 for adamw (decoupled), 0 for sgd (coupled)")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=N,C,H,W",
                        help="fix an input's shape (N may stay dynamic: N or ?); repeatable")
    parser.add_argument("--backend", choices=["onnx", "ort-training"], default="onnx",
                        help="onnx (the default, as its artifacts run on any platform, so what a workstation "
                             "compiles runs on the device): one standard-ONNX training step for plain onnxruntime "
                             "(>= 1.20); ort-training: onnxruntime-training 1.19.2 artifacts (x86-64, Python <= 3.12)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--single-graph", action="store_true",
                        help="with --backend ort-training, keep the whole forward in the training graph; by "
                             "default the frozen layers before the trained ones become a separate, fully optimized "
                             "inference model (prefix_model.onnx) that the runtime runs first")
    parser.add_argument("--no-forward-pooling", action="store_true",
                        help=argparse.SUPPRESS)  # diagnostics only: shows the memory the scheduling fix saves
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress or summary (warnings still go to stderr)")
    parser.set_defaults(handler=_cmd_compile)


def _inspect_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show what the compiler did (per-layer table, one layer's gradient subgraph, DOT export)",
        description="Show the conv layers of compiled artifacts (or of a model, compiled in memory).",
        epilog=EXIT_HELP,
    )
    parser.add_argument("target", help="an artifacts directory, or an .onnx model")
    parser.add_argument("--layer", help="print the backward subgraph of this conv")
    parser.add_argument("--dot", metavar="FILE", help="with --layer: also write that subgraph as Graphviz DOT")
    parser.add_argument("--json", action="store_true", help="print the manifest's layer records as JSON")
    parser.add_argument("--layers", default=None, help="for a model: as in compile")
    parser.add_argument("--patch", type=int, default=4, help="for a model: as in compile")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=N,C,H,W")
    parser.add_argument("--train-output", default=None, metavar="NAME", help="for a model: as in compile")
    parser.set_defaults(handler=_cmd_inspect)


def _demo_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="the whole story on built-in real data (no arguments needed)",
                                   description=demo.__doc__.strip().splitlines()[0] if demo.__doc__ else None)
    demo.add_arguments(parser)
    parser.set_defaults(handler=demo.run_from_args)


def build_parser() -> argparse.ArgumentParser:
    """The ``gfc`` parser with every command; each sets ``handler`` (``args -> exit code``)."""
    parser = argparse.ArgumentParser(prog="gfc", description="gradient-filtering training compiler for ONNX CNNs", epilog=EXIT_HELP)
    parser.add_argument("--version", action="version", version=f"gfcompiler {__version__}")
    add_debug_flag(parser)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _compile_parser(subparsers)
    _inspect_parser(subparsers)
    add_runtime_commands(subparsers)
    add_bench_command(subparsers)
    add_federate_command(subparsers)
    _demo_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``gfc``: parse ``argv`` (default: the command line) and run the command; returns the exit code."""
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
