"""The output directory: build aside, check, then appear at ``-o`` in one rename.

Artifacts are written into a staging directory next to the target (same file system,
so the final ``os.rename`` is atomic). On any failure, Ctrl-C or SIGTERM the staging
directory is removed; a staging directory left by a killed process (SIGKILL) is
hidden (``.<name>.partial-<pid>``) and removed by the next compile to the same target.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
from pathlib import Path

from gfcompiler.errors import ArtifactError, OutputError, UnsupportedModelError
from gfcompiler.manifest import FILES, TWO_STAGE_FILES, TensorRecord, dtype_name


def check_writable_target(target: Path, force: bool) -> None:
    """Refuse an output path that is a file, non-empty (without ``force``) or not writable."""
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise OutputError(f"{target}: exists and is not empty (use --force to replace it)")
    parent = target.resolve().parent
    if not parent.is_dir():
        raise OutputError(f"{parent}: parent directory does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent}: not writable")


def _remove_stale_partials(target: Path) -> None:
    prefix = f".{target.name}.partial-"
    for entry in target.resolve().parent.glob(f"{prefix}*"):
        pid = entry.name[len(prefix):]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _sigterm_as_exit():
    """Turn SIGTERM into SystemExit inside the block so cleanup code runs."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def staging_directory(target: Path, force: bool):
    """Yield an empty staging directory; on success it replaces ``target`` atomically."""
    target = Path(target)
    _remove_stale_partials(target)
    staging = target.resolve().parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    with _sigterm_as_exit():  # from before mkdir on, a SIGTERM still removes the staging directory
        try:
            _make_directory(staging)
            yield staging
            _replace(staging, target, force)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _make_directory(path: Path) -> None:
    try:
        path.mkdir()
    except OSError as error:
        raise OutputError(f"{path.parent}: cannot create the output ({error.strerror})") from None


def _replace(staging: Path, target: Path, force: bool) -> None:
    if target.exists():
        if not target.is_dir() or (any(target.iterdir()) and not force):
            raise OutputError(f"{target}: appeared while compiling; not overwritten")
        old = target.resolve().parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, target)


def session_io(model_path: Path) -> dict[str, list[TensorRecord]]:
    """Input/output names, shapes and dtypes of a model as onnxruntime sees them: {"inputs": [...], "outputs": [...]}."""
    from gfcompiler.ort_training import onnxruntime

    ort = onnxruntime()

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers are noise here
    session = ort.InferenceSession(os.fspath(model_path), options, providers=["CPUExecutionProvider"])

    def record(arg) -> TensorRecord:
        return TensorRecord(arg.name, tuple(d if isinstance(d, int) else None for d in arg.shape), dtype_name(arg.type))

    return {"inputs": [record(a) for a in session.get_inputs()], "outputs": [record(a) for a in session.get_outputs()]}


def check_loadable(directory: Path) -> None:
    """Open the artifacts with onnxruntime's training API: we never emit what ORT refuses."""
    from gfcompiler import ort_training

    ort = ort_training.onnxruntime()
    api = ort_training.api()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    paths = {key: os.fspath(directory / name) for key, name in FILES.items()}
    try:
        state = api.CheckpointState.load_checkpoint(paths["checkpoint"])
        module = api.Module(paths["training_model"], state, paths["eval_model"], device="cpu", session_options=options)
        api.Optimizer(paths["optimizer_model"], module)
        for key, name in TWO_STAGE_FILES.items():
            if (directory / name).exists():
                if key == "export_model":
                    api.Module(paths["training_model"], state, os.fspath(directory / name), device="cpu",
                               session_options=options)
                else:
                    ort.InferenceSession(os.fspath(directory / name), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types
        raise _refusal(error, "onnxruntime-training", "artifacts") from None


def _refusal(error: Exception, runtime: str, what: str) -> Exception:
    """onnxruntime's refusal of a generated model in the model's terms: a missing kernel names its op."""
    missing = re.search(r"Could not find an implementation for (\w+)\(\d+\) node with name '([^']+)'", str(error))
    if missing:
        kernel, node = missing.groups()
        return UnsupportedModelError(
            f"{runtime} has no CPU kernel for {kernel} (node {node}), needed to train through that op; "
            "train fewer layers (--layers) so it stays frozen"
        )
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ArtifactError(f"internal error: onnxruntime refuses the generated {what}: {first[-400:]}")


def check_models_loadable(directory: Path, names: list[str]) -> None:
    """Open plain ONNX models in an onnxruntime InferenceSession: we never emit what ORT refuses."""
    from gfcompiler.ort_training import onnxruntime

    ort = onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    for name in names:
        try:
            ort.InferenceSession(os.fspath(directory / name), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types
            raise _refusal(error, "onnxruntime", name) from None
