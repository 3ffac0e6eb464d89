"""What every ``gfc`` command shares: help texts used by several commands, and `run_command`.

`run_command` is the one way a command runs, whichever entry point parsed it (``gfc``,
``python -m gfcompiler.cli``, ``python -m gfcompiler.runtime.cli`` on a device with only
the runtime, ``python -m gfcompiler.demo``): a `GfcError` is printed as one line
``gfc: error: ...`` on stderr and exits with its code, ``--debug`` adds the traceback,
Ctrl-C exits 130, and any other exception is a bug (one line, exit 1; the traceback
under ``--debug``). Exit codes are in gfcompiler.errors.

Imports only the standard library and gfcompiler.errors: the runtime's CLI uses it.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from gfcompiler.errors import EXIT_INTERRUPTED, GfcError

SELECTION_HELP = """\
Layer selection: --layers N trains the last N Conv nodes in the graph's node order
(ONNX nodes are topologically sorted and exporters list them in forward order, so
this matches "the last N layers" of the source model; default 4, or every conv of a
smaller model); --layers a,b names Conv nodes;
--layers all trains every conv. The weights and biases of those convs and every
parameter downstream of them (the head: Conv, Gemm, MatMul weights and biases) are
trainable; everything else is frozen and gets no backward. BatchNorm is folded into
the preceding conv (or frozen as a constant affine) and never uses batch statistics.
"""

DATA_HELP = (
    "a .npz with x (N×C×H×W float) and y (labels), an image folder with one sub-folder per class, "
    "or builtin:digits / builtin:mnist (add /train or /test for a fixed 80/20 split); segmentation models: "
    "y N×H×W class indices (255 ignored), a folder with images/ and masks/ (class-index PNGs, same file stems), "
    "or builtin:digit-scenes[/train|/test]"
)
DEVICE_HELP = "cpu, cuda, cuda:N or auto (CUDA when it really works, else CPU; default: auto)"


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug``, read by `run_command`."""
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen ``handler(args) -> exit code``; errors as described above."""
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        return int(args.handler(args) or 0)
    except GfcError as error:
        if debug:
            traceback.print_exc()
        print(f"gfc: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("gfc: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # a bug: say so in one line, details under --debug
        if debug:
            traceback.print_exc()
        print(f"gfc: internal error: {type(error).__name__}: {error} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
