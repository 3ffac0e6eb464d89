"""User-facing errors and their exit codes (documented in the README).

Every problem a user can cause (bad input, an unsupported model, an unusable output
path) is raised as a `GfcError` subclass; the CLI prints its message as one line on
stderr and exits with its code. Anything else is a bug and exits with 1 (with a
traceback only under ``--debug``). Only the standard library is imported: the
runtime uses these too.
"""

from __future__ import annotations


class GfcError(Exception):
    """An error the user can act on; ``str(error)`` is the one-line message."""

    exit_code = 1


class InputError(GfcError):
    """Bad command-line arguments or input files (missing, not ONNX, wrong shape...)."""

    exit_code = 2


class UnsupportedModelError(GfcError):
    """A valid model the compiler refuses, with the obstacle named (an op, a shape)."""

    exit_code = 3


class OutputError(GfcError):
    """The output path exists, is a file, or cannot be written."""

    exit_code = 4


class ArtifactError(GfcError):
    """Compiled artifacts that are missing, edited, corrupted or from another version."""

    exit_code = 5


class TrainingError(GfcError):
    """Training cannot go on: a NaN/Inf loss, an unusable device."""

    exit_code = 6


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its type's name when the message is empty): a library's
    exception text cut to what fits in a one-line refusal."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


EXIT_INTERRUPTED = 130
EXIT_CODES = {
    0: "success",
    1: "internal error (a bug: please report it with the --debug traceback)",
    InputError.exit_code: "bad input or arguments",
    UnsupportedModelError.exit_code: "model refused: the message names the obstacle",
    OutputError.exit_code: "output path unusable",
    ArtifactError.exit_code: "artifacts missing, corrupted or from another gfcompiler version",
    TrainingError.exit_code: "training stopped (NaN/Inf loss, device unavailable)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}
EXIT_HELP = "exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items())
