"""Training checkpoints in a run directory, saved atomically.

A run directory (default ``<artifacts>/run``) holds::

    state.json               the record: which checkpoint is current, its sha256, the
                             training position (epoch, batch, step, config, data)
    checkpoint-<step>-<tag>  parameters and optimizer state: an onnxruntime checkpoint
                             (ort-training artifacts), or ``checkpoint-<step>-<tag>.npz``
                             with every state tensor and the step count (``--backend onnx``)
    metrics.jsonl            one JSON object per event (gfcompiler.runtime.progress)
    writer.lock              while a process writes the directory: its pid and start (`RunLock`)

What a checkpoint holds is the backend engine's business: `RunDir.save` asks the
trainer to write it (``save_checkpoint``) and only handles names, atomicity and digests.

Saving writes the new checkpoint under a fresh name (via a temporary file and
``os.replace``), then replaces ``state.json`` the same way, and only then deletes the
previous checkpoint. ``state.json`` is the commit point: a crash or a Ctrl-C at any moment
leaves the previous record and its checkpoint intact.

onnxruntime loads a checkpoint whose tensor bytes were damaged without complaint, so the
record keeps the checkpoint's sha256 and `RunDir.latest` checks it, together with the
identity of the artifacts the checkpoint was trained from.

One writer per run directory: `RunDir.writing` holds an exclusive ``fcntl.flock`` on
``writer.lock`` (``gfc train`` holds it from before it looks at the directory until it
ends; `RunDir.save` and `RunDir.clear` take it themselves when their caller did not). The
kernel drops the lock when the holder's process ends in any way, SIGKILL included, so a
stale lock never blocks; a second writer is refused at once with the holder's pid.
Readers (``gfc eval``, ``gfc export``) take no lock: `RunDir.reading` copies the committed
checkpoint to a private file, checking its sha256 on the copy, so a writer replacing or
deleting checkpoints meanwhile cannot hand them a half-written or vanished file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; `RunLock` says so and does not lock
    fcntl = None

from gfcompiler import __version__
from gfcompiler.errors import ArtifactError, OutputError, first_line
from gfcompiler.manifest import sha256_file
from gfcompiler.ort_training import error_message
from gfcompiler.runtime.artifacts import Artifacts

RECORD_NAME = "state.json"
RECORD_FORMAT = 1
CHECKPOINT_PREFIX = "checkpoint-"
METRICS_NAME = "metrics.jsonl"
LOCK_NAME = "writer.lock"
_READ_ATTEMPTS = 20  # a reader retries when the writer replaced the checkpoint it was reading


@dataclasses.dataclass(frozen=True)
class CheckpointRecord:
    """The current checkpoint of a run directory and where training stood."""

    path: Path
    training: dict  # see gfcompiler.runtime.loop.Position.to_dict and TrainConfig.to_dict
    copy: Path | None = None  # `RunDir.reading`: the private verified copy to load

    @property
    def load_path(self) -> Path:
        """The file to load the checkpoint from (the private copy when there is one)."""
        return self.copy or self.path

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
        self.lock = RunLock(self.path / LOCK_NAME)

    @property
    def record_path(self) -> Path:
        return self.path / RECORD_NAME

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_NAME

    def has_checkpoint(self) -> bool:
        return self.record_path.exists()

    @contextlib.contextmanager
    def writing(self) -> Iterator[RunLock]:
        """Hold the directory's writer lock in the block (re-entrant; OutputError naming the holder's pid
        when another process holds it)."""
        self.lock.acquire()
        try:
            yield self.lock
        finally:
            self.lock.release()

    def latest(self) -> CheckpointRecord | None:
        """The current checkpoint, verified in place; None when the run directory has none.

        For the directory's writer (``--resume``); a reader that may run beside a writer uses `reading`.
        """
        record = self._record()
        if record is None:
            return None
        name, digest, training = record
        path = self.path / name
        if not path.is_file():
            raise self._missing(path)
        try:
            found = sha256_file(path)
        except OSError as error:
            raise ArtifactError(f"cannot read checkpoint {path}: {error.strerror or error}") from None
        if found != digest:
            raise self._corrupted(path)
        return CheckpointRecord(path, training)

    @contextlib.contextmanager
    def reading(self) -> Iterator[CheckpointRecord | None]:
        """The committed checkpoint as a private copy whose sha256 was checked (``load_path``, deleted
        after the block); None when there is none. Safe while another process trains here."""
        with tempfile.TemporaryDirectory(prefix="gfc-checkpoint-") as scratch:
            yield self._copy_latest(Path(scratch))

    def _copy_latest(self, scratch: Path) -> CheckpointRecord | None:
        """Copy the record's checkpoint; when it vanished or changed meanwhile and the record now names
        another one (the writer saved again), copy that one instead."""
        for _ in range(_READ_ATTEMPTS):
            record = self._record()
            if record is None:
                return None
            name, digest, training = record
            source, copy = self.path / name, scratch / name
            try:
                copied = _copy_hashed(source, copy)
            except FileNotFoundError:
                copied = None
            except OSError as error:
                raise ArtifactError(f"cannot read checkpoint {source}: {error.strerror or error}") from None
            if copied == digest:
                return CheckpointRecord(source, training, copy)
            now = self._record()
            if now is None or now[0] == name:  # the record did not move on: the file itself is bad
                raise self._missing(source) if copied is None else self._corrupted(source)
        raise ArtifactError(f"the checkpoint in {self.path} changed {_READ_ATTEMPTS} times while being read; try again")

    def _record(self) -> tuple[str, str, dict] | None:
        """(checkpoint file name, its sha256, training position) from state.json; None when absent."""
        try:
            text = self.record_path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as error:
            raise self._bad_record(error) from None
        try:
            record = json.loads(text)
            name, digest, training = record["checkpoint"], record["sha256"], record["training"]
            found_format = record.get("format")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
            raise self._bad_record(error) from None
        if not (isinstance(name, str) and isinstance(digest, str) and _is_training_record(training)):
            raise self._bad_record(TypeError("an entry has the wrong type"))
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
        return Path(name).name, digest, training

    def _bad_record(self, error: Exception) -> ArtifactError:
        return corrupted_record(self.record_path, error)

    def _missing(self, path: Path) -> ArtifactError:
        return ArtifactError(f"{path} named by {self.record_path} is missing")

    def _corrupted(self, path: Path) -> ArtifactError:
        return ArtifactError(
            f"checkpoint {path} is corrupted (its sha256 differs from {RECORD_NAME}); "
            "delete the run directory or pass --overwrite to start over"
        )

    def save(self, trainer, training: dict) -> CheckpointRecord:
        """Save ``trainer``'s whole training state atomically (``trainer.save_checkpoint(path)`` writes it)."""
        with self.writing():
            return self._save(trainer, training)

    def _save(self, trainer, training: dict) -> CheckpointRecord:
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
        with self.writing():
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


class RunLock:
    """An exclusive ``fcntl.flock`` on ``path`` (re-entrant within one object).

    The lock file holds the holder's pid, host, start time and command line (JSON), which a
    refused writer reports. The kernel releases the lock when the holder's process ends,
    SIGKILL included; the file of a killed holder stays and the next writer takes it over.
    A clean release deletes the file (and the run directory when the lock created it and it
    is still empty); since a waiter may have opened the old file meanwhile, `acquire` checks
    that the file it locked is still the one at ``path``. Without ``fcntl`` (Windows)
    nothing is locked and ``enforced`` is False.
    """

    UNENFORCED_NOTE = "note: this platform has no fcntl: the run directory is not locked against a second writer"

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None
        self._depth = 0
        self._created_directory = False

    @property
    def held(self) -> bool:
        return self._depth > 0

    @property
    def enforced(self) -> bool:
        """Whether this platform can lock (it has ``fcntl``)."""
        return fcntl is not None

    def acquire(self) -> None:
        """Take the lock (or count one more holder in this process); OutputError when another writer holds it."""
        if self._depth == 0 and self.enforced:
            self._fd = self._lock_file()
        self._depth += 1

    def release(self) -> None:
        self._depth -= 1
        if self._depth > 0 or self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)  # still locked: a waiter that opened it retries on the new file
            if self._created_directory:
                self.path.parent.rmdir()  # only when empty: nothing was saved
        except OSError:
            pass
        finally:
            os.close(fd)  # releases the flock

    def holder(self) -> dict:
        """What the holder wrote into the lock file ({} when unreadable); waits briefly for a holder
        that has locked but not yet written."""
        for _ in range(20):
            try:
                holder = json.loads(self.path.read_text())
                if isinstance(holder, dict):
                    return holder
            except (OSError, ValueError):
                pass
            time.sleep(0.025)
        return {}

    def _lock_file(self) -> int:
        directory = self.path.parent
        for _ in range(_READ_ATTEMPTS):
            self._created_directory = not directory.exists()
            try:
                directory.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue  # the previous holder removed the directory between our mkdir and open
            except OSError as error:
                raise OutputError(f"cannot create run directory {directory}: {error.strerror or error}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(self._refusal()) from None
            except OSError as error:
                os.close(fd)
                raise OutputError(f"cannot lock {self.path}: {error.strerror or error}") from None
            if _same_file(fd, self.path):
                self._write_holder(fd)
                return fd
            os.close(fd)  # we locked a file its previous holder had just removed
        raise OutputError(f"cannot lock {self.path}: it keeps being replaced by other writers")

    def _write_holder(self, fd: int) -> None:
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python",
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)

    def _refusal(self) -> str:
        holder = self.holder()
        pid = holder.get("pid", "unknown")
        details = [f"started {holder['started']}" if "started" in holder else "",
                   f"on host {holder['host']}" if holder.get("host") not in (None, socket.gethostname()) else ""]
        details = ", ".join(d for d in details if d)
        return (
            f"run directory {self.path.parent} is being written by another process (pid {pid}"
            + (f", {details}" if details else "") + "); wait for it to end or pass another --run-dir"
        )


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino)


def _copy_hashed(source: Path, target: Path) -> str:
    """Copy ``source`` to ``target``; the sha256 of the bytes copied."""
    digest = hashlib.sha256()
    with open(source, "rb") as reader, open(target, "wb") as writer:
        while chunk := reader.read(1 << 20):
            digest.update(chunk)
            writer.write(chunk)
    return digest.hexdigest()


def _is_training_record(training) -> bool:
    """``training`` is a dict whose position (if any) is a dict of non-negative numbers and config (if any)
    a dict (`gfcompiler.runtime.loop` checks their fields when it resumes)."""
    if not isinstance(training, dict):
        return False
    position, config = training.get("position", {}), training.get("config", {})
    numbers = isinstance(position, dict) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in position.values()
    )
    return numbers and isinstance(config, dict) and isinstance(training.get("data", {}), dict)


def corrupted_record(record_path: Path, error: Exception) -> ArtifactError:
    """The refusal of a run directory whose ``state.json`` cannot be used, ``error`` saying why."""
    return ArtifactError(
        f"{record_path} is corrupted ({type(error).__name__}: {first_line(error)}); "
        "delete the run directory or pass --overwrite to start over"
    )
