"""Training checkpoints in a run directory, saved atomically.

A run directory (default ``<artifacts>/run``) holds::

    state.json               the record: which checkpoint is current, its sha256, the
                             training position (epoch, batch, step, config, data)
    checkpoint-<step>-<tag>  parameters and optimizer state: an onnxruntime checkpoint
                             (ort-training artifacts), or ``checkpoint-<step>-<tag>.npz``
                             with every state tensor and the step count (``--backend onnx``)
    metrics.jsonl            one JSON object per event (gfcompiler.runtime.progress)

What a checkpoint holds is the backend engine's business: `RunDir.save` asks the
trainer to write it (``save_checkpoint``) and only handles names, atomicity and digests.

Saving writes the new checkpoint under a fresh name (via a temporary file and
``os.replace``), then replaces ``state.json`` the same way, and only then deletes the
previous checkpoint. ``state.json`` is the commit point: a crash or a Ctrl-C at any moment
leaves the previous record and its checkpoint intact.

onnxruntime loads a checkpoint whose tensor bytes were damaged without complaint, so the
record keeps the checkpoint's sha256 and `RunDir.latest` checks it, together with the
identity of the artifacts the checkpoint was trained from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import time
from pathlib import Path

from gfcompiler import __version__
from gfcompiler.errors import ArtifactError, OutputError
from gfcompiler.manifest import sha256_file
from gfcompiler.ort_training import error_message
from gfcompiler.runtime.artifacts import Artifacts

RECORD_NAME = "state.json"
RECORD_FORMAT = 1
CHECKPOINT_PREFIX = "checkpoint-"
METRICS_NAME = "metrics.jsonl"


@dataclasses.dataclass(frozen=True)
class CheckpointRecord:
    """The current checkpoint of a run directory and where training stood."""

    path: Path
    training: dict  # see gfcompiler.runtime.loop.Position.to_dict and TrainConfig.to_dict

    @property
    def epochs_done(self) -> int:
        return int(self.training.get("position", {}).get("epoch", 0))

    def describe(self) -> str:
        position = self.training.get("position", {})
        epochs = self.training.get("config", {}).get("epochs", "?")
        batch = position.get("batch", 0)
        where = f"epoch {position.get('epoch', 0)}/{epochs}"
        if batch:
            where = f"epoch {position.get('epoch', 0) + 1}/{epochs} at batch {batch}"
        return f"{self.path} ({where}, step {position.get('global_step', 0)})"


def default_run_dir(artifacts: Artifacts) -> Path:
    return artifacts.directory / "run"


class RunDir:
    """Checkpoints and metrics of training runs on one artifact directory."""

    def __init__(self, path: str | Path, artifacts: Artifacts):
        self.path = Path(path)
        self.artifacts = artifacts

    @property
    def record_path(self) -> Path:
        return self.path / RECORD_NAME

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_NAME

    def has_checkpoint(self) -> bool:
        return self.record_path.exists()

    def latest(self) -> CheckpointRecord | None:
        """The current checkpoint, verified; None when the run directory has none."""
        if not self.record_path.exists():
            return None
        try:
            record = json.loads(self.record_path.read_text())
            name = record["checkpoint"]
            digest = record["sha256"]
            training = record["training"]
            found_format = record.get("format")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ArtifactError(
                f"{self.record_path} is corrupted ({type(error).__name__}: {error}); "
                "delete the run directory or pass --overwrite to start over"
            ) from None
        if found_format != RECORD_FORMAT:
            raise ArtifactError(
                f"{self.record_path} is in checkpoint format {found_format}; this gfcompiler "
                f"{__version__} reads format {RECORD_FORMAT}"
            )
        if record.get("artifacts") != self.artifacts.identity:
            raise ArtifactError(
                f"the checkpoint in {self.path} was trained from other artifacts than "
                f"{self.artifacts.directory} (the training model differs); use another --run-dir"
            )
        path = self.path / Path(name).name
        if not path.is_file():
            raise ArtifactError(f"{path} named by {self.record_path} is missing")
        if sha256_file(path) != digest:
            raise ArtifactError(
                f"checkpoint {path} is corrupted (its sha256 differs from {RECORD_NAME}); "
                "delete the run directory or pass --overwrite to start over"
            )
        return CheckpointRecord(path, training)

    def save(self, trainer, training: dict) -> CheckpointRecord:
        """Save ``trainer``'s whole training state atomically (``trainer.save_checkpoint(path)`` writes it)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create run directory {self.path}: {error.strerror or error}") from None
        step = int(training.get("position", {}).get("global_step", 0))
        name = f"{CHECKPOINT_PREFIX}{step:08d}-{secrets.token_hex(3)}{getattr(trainer, 'checkpoint_suffix', '')}"
        final = self.path / name
        temporary = self.path / f".{name}.tmp"
        try:
            trainer.save_checkpoint(temporary)
            _fsync(temporary)
            os.replace(temporary, final)
            record = {
                "format": RECORD_FORMAT,
                "gfcompiler_version": __version__,
                "artifacts": self.artifacts.identity,
                "checkpoint": name,
                "sha256": sha256_file(final),
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "training": training,
            }
            write_text_atomic(self.record_path, json.dumps(record, indent=2) + "\n")
        except OSError as error:
            raise OutputError(f"cannot save a checkpoint in {self.path}: {error.strerror or error}") from None
        except RuntimeError as error:  # onnxruntime's own write failures
            raise OutputError(f"cannot save a checkpoint in {self.path}: {error_message(error)}") from None
        finally:
            if temporary.exists():
                temporary.unlink()
        self._remove_stale(keep=name)
        return CheckpointRecord(final, training)

    def clear(self) -> None:
        """Forget the current checkpoint (``--overwrite``); metrics are kept."""
        for path in [self.record_path, *self._checkpoint_files()]:
            path.unlink(missing_ok=True)

    def _checkpoint_files(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        return [p for p in self.path.iterdir() if p.name.startswith((CHECKPOINT_PREFIX, f".{CHECKPOINT_PREFIX}"))]

    def _remove_stale(self, keep: str) -> None:
        for path in self._checkpoint_files():
            if path.name != keep:
                try:
                    path.unlink()
                except OSError:
                    pass  # a leftover file costs disk space, not correctness


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(3)}.tmp")
    try:
        with open(temporary, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
