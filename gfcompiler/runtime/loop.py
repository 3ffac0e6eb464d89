"""The training loop: epochs of shuffled batches, a learning-rate schedule, checkpoints.

`fit` runs epochs on a `Trainer` from a `Position` (where a previous run stopped) and
saves a checkpoint at every epoch end and on Ctrl-C; `train` is what ``gfc train`` does
around it: open the artifacts and the data, pick the device, start fresh or resume from
the run directory's checkpoint. `train` holds the run directory's writer lock
(gfcompiler.runtime.checkpoints.RunLock) from before it looks at the directory to the end,
so a second writer is refused at once and ``--overwrite`` never clears a directory another
process trains in.

Resuming reproduces the uninterrupted run: the batches of an epoch are a function of
(seed, epoch) (gfcompiler.runtime.data.epoch_batches), the learning rate a function of the
global step (gfcompiler.runtime.schedule), the checkpoint holds the optimizer state, and
the position records the batch to continue from and the running sums of the epoch in
progress. Ctrl-C is deferred to the end of the running step so that the checkpoint is
always taken between two steps; a second Ctrl-C aborts at once.

A NaN or infinite loss stops training with a TrainingError before the bad update; the
last checkpoint saved (the previous epoch end) stays the current one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from gfcompiler.errors import InputError, OutputError, TrainingError
from gfcompiler.runtime.artifacts import Artifacts, open_artifacts
from gfcompiler.runtime.checkpoints import RECORD_NAME, CheckpointRecord, RunDir, corrupted_record, default_run_dir
from gfcompiler.runtime.data import Dataset, Preprocess, epoch_batches, load_dataset, steps_per_epoch
from gfcompiler.runtime.losses import class_scores, labelled_mask
from gfcompiler.runtime.metrics import label_classes, predicted_classes
from gfcompiler.runtime.progress import MetricsLog, Progress, status_line
from gfcompiler.runtime.schedule import LRSchedule
from gfcompiler.runtime.trainer import NonFiniteLoss, Trainer


class _JsonRecord:
    """A dataclass stored as a JSON object in state.json; unknown keys are ignored on reading."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        """ValueError when a known key holds a value of another type than its default's (or a negative count)."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        known = {k: v for k, v in values.items() if k in defaults}
        for name, value in known.items():
            if not _fits(value, defaults[name]):
                raise ValueError(f"{cls.__name__} {name} is {value!r}")
        return cls(**known)


def _fits(value, default) -> bool:
    """``value`` has the type of ``default`` (None: an optional count); counts are not negative, floats finite."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if isinstance(default, float):
        return isinstance(value, (int, float)) and math.isfinite(value)
    if isinstance(default, int) or default is None:
        return (default is None and value is None) or (isinstance(value, int) and value >= 0)
    return isinstance(value, type(default))


@dataclasses.dataclass(frozen=True)
class TrainConfig(_JsonRecord):
    """What defines a run; stored in every checkpoint and reused on ``--resume``."""

    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    schedule: str = "constant"
    warmup_steps: int | None = None
    seed: int = 0
    drop_last: bool = False


    def checked(self, artifacts: Artifacts, samples: int, progress: Progress) -> TrainConfig:
        """Validated against the model and data; a fixed-batch model drops its last partial batch."""
        if self.epochs < 1:
            raise InputError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        config = self
        fixed = artifacts.fixed_batch
        if fixed is not None:
            if self.batch_size != fixed:
                raise InputError(
                    f"the model was compiled for batch size {fixed}: pass --batch-size {fixed} "
                    "or recompile it with a dynamic batch"
                )
            if samples % fixed and not self.drop_last:
                progress.message(
                    f"note: the model has a fixed batch of {fixed}: the last {samples % fixed} "
                    "samples of each shuffled epoch are dropped"
                )
            config = dataclasses.replace(self, drop_last=True)
        if steps_per_epoch(samples, config.batch_size, config.drop_last) == 0:
            raise InputError(f"{samples} samples make no full batch of {config.batch_size}")
        LRSchedule.create(config.schedule, config.lr, 1, config.warmup_steps)  # validates
        return config


@dataclasses.dataclass(frozen=True)
class Position(_JsonRecord):
    """Where training stands: ``epoch`` in progress (0-based), next ``batch`` in it, and the
    running sums of that epoch. ``batch == 0`` means ``epoch`` epochs are complete."""

    epoch: int = 0
    batch: int = 0
    global_step: int = 0
    loss_sum: float = 0.0
    seen: int = 0
    correct: int = 0
    counted: int = 0



@dataclasses.dataclass
class FitResult:
    position: Position
    history: list[dict]  # one record per completed epoch
    interrupted: bool = False
    checkpoint: CheckpointRecord | None = None

    @property
    def last(self) -> dict:
        return self.history[-1] if self.history else {}


StepCallback = Callable[[Position, float], None]


def fit(
    trainer: Trainer,
    train: Dataset,
    config: TrainConfig,
    *,
    val: Dataset | None = None,
    run_dir: RunDir | None = None,
    start: Position | None = None,
    progress: Progress | None = None,
    metrics: MetricsLog | None = None,
    on_step: StepCallback | None = None,
    handle_sigint: bool = True,
) -> FitResult:
    """Train from ``start`` to ``config.epochs``; checkpoints go to ``run_dir`` when given."""
    progress = progress or Progress(enabled=False)
    run = _Run(trainer, train, config.checked(trainer.artifacts, len(train), progress), val, run_dir,
               progress, metrics or MetricsLog(None, ""), on_step)
    position, history = start or Position(), []
    writer = run_dir.writing() if run_dir is not None else contextlib.nullcontext()  # `train` holds it already
    with writer, _DeferredInterrupt(progress, enabled=handle_sigint) as interrupt:
        for epoch in range(position.epoch, run.config.epochs):
            position, record = run.epoch(epoch, position, interrupt)
            if record is not None:
                history.append(record)
                run.epoch_done(record, position)
            if interrupt.requested and (record is None or epoch + 1 < run.config.epochs):
                return run.interrupted(position, history)
    progress.close()
    return FitResult(position, history, checkpoint=run.checkpoint)


class _Run:
    """One `fit` call: its epochs, steps, checkpoints and reports."""

    def __init__(self, trainer: Trainer, train: Dataset, config: TrainConfig, val: Dataset | None,
                 run_dir: RunDir | None, progress: Progress, metrics: MetricsLog, on_step: StepCallback | None):
        self.trainer, self.train, self.config, self.val = trainer, train, config, val
        self.run_dir, self.progress, self.metrics, self.on_step = run_dir, progress, metrics, on_step
        self.batches = steps_per_epoch(len(train), config.batch_size, config.drop_last)
        self.schedule = LRSchedule.create(config.schedule, config.lr, config.epochs * self.batches, config.warmup_steps)
        self.classify = trainer.artifacts.loss == "cross_entropy"
        self.segmentation = trainer.artifacts.segmentation
        self.fingerprint = train.fingerprint()
        self.checkpoint: CheckpointRecord | None = None

    def epoch(self, epoch: int, position: Position, interrupt: _DeferredInterrupt) -> tuple[Position, dict | None]:
        """Run ``epoch`` from ``position``; the epoch's record, or None when Ctrl-C stopped it early."""
        started, steps, samples, seconds = time.perf_counter(), 0, 0, 0.0
        lr = self.schedule(position.global_step)
        first = position.batch if position.epoch == epoch else 0
        for batch, indices in epoch_batches(len(self.train), self.config.batch_size, seed=self.config.seed,
                                            epoch=epoch, drop_last=self.config.drop_last, start=first):
            lr = self.schedule(position.global_step)
            t0 = time.perf_counter()
            position = self._step(epoch, batch, indices, position, lr)
            seconds += time.perf_counter() - t0
            steps, samples = steps + 1, samples + len(indices)
            self.progress.update(status_line(
                epoch + 1, self.config.epochs, batch + 1, self.batches, position.loss_sum / position.seen,
                position.correct / position.counted if position.counted else None, samples / max(seconds, 1e-9),
                accuracy_label="pixel acc" if self.segmentation else "acc",
            ))
            if self.on_step is not None:
                self.on_step(position, self._last_loss)
            if interrupt.requested and batch + 1 < self.batches:
                return position, None
        record = {
            "epoch": epoch + 1,
            "step": position.global_step,
            "loss": position.loss_sum / max(position.seen, 1),
            ("pixel_accuracy" if self.segmentation else "accuracy"):
                position.correct / position.counted if position.counted else None,
            "lr": lr,
            "samples_per_s": samples / max(seconds, 1e-9),
            "step_ms": 1000 * seconds / max(steps, 1),
            "seconds": time.perf_counter() - started,
        }
        if self.val is not None:
            record.update(self._validation())
        return Position(epoch + 1, 0, position.global_step), record

    def _step(self, epoch: int, batch: int, indices, position: Position, lr: float) -> Position:
        x, y = self.train.x[indices], self.train.y[indices]
        try:
            result = self.trainer.train_step(x, y, lr=lr)
        except NonFiniteLoss as error:
            self.metrics.write("stopped", reason="non-finite loss", loss=error.loss, epoch=epoch + 1,
                               step=position.global_step + 1, lr=lr)
            self.progress.close()
            raise TrainingError(_non_finite_message(error.loss, epoch, position, lr, self.checkpoint, self.run_dir)) from None
        self._last_loss = result.loss
        correct, counted = self._hits(result.outputs, y)
        return Position(
            epoch, batch + 1, position.global_step + 1, position.loss_sum + result.loss * len(indices),
            position.seen + len(indices), position.correct + correct, position.counted + counted,
        )

    def _hits(self, outputs, y) -> tuple[int, int]:
        """(correct, counted) predictions of a step: samples of a classifier, labelled pixels of a
        segmentation model; (0, 0) when the step returns no outputs or the model has no classes."""
        if outputs is None:
            return 0, 0
        if self.segmentation:
            labels = label_classes(y)
            ignore = self.trainer.artifacts.ignore_index
            counted = labelled_mask(labels, ignore)
            return int((predicted_classes(outputs) == labels)[counted].sum()), int(counted.sum())
        if self.classify:
            return int((class_scores(outputs).argmax(axis=-1) == y).sum()), len(y)
        return 0, 0

    def _validation(self) -> dict:
        """The epoch record's ``val_*`` entries."""
        evaluation = self.trainer.evaluate(self.val, batch_size=max(self.config.batch_size, 256))
        if self.segmentation:
            return {"val_loss": evaluation["loss"], "val_pixel_accuracy": evaluation["pixel_accuracy"],
                    "val_mean_iou": evaluation["mean_iou"], "val_class_iou": evaluation["class_iou"]}
        return {"val_loss": evaluation["loss"], "val_accuracy": evaluation.get("accuracy")}

    def save(self, at: Position) -> None:
        if self.run_dir is not None:
            training = {"config": self.config.to_dict(), "position": at.to_dict(),
                        "data": {"source": self.train.source, "samples": len(self.train), "fingerprint": self.fingerprint}}
            self.checkpoint = self.run_dir.save(self.trainer, training)

    def epoch_done(self, record: dict, position: Position) -> None:
        self.save(position)
        self.metrics.write("epoch", **record)
        self.progress.message(_epoch_message(record, self.config.epochs))

    def interrupted(self, position: Position, history: list[dict]) -> FitResult:
        if position.batch:  # stopped inside an epoch; an epoch end was saved already
            self.save(position)
        self.metrics.write("interrupted", epoch=position.epoch + (1 if position.batch else 0),
                           batch=position.batch, step=position.global_step)
        self.progress.message(_interrupted_message(position, self.checkpoint))
        return FitResult(position, history, interrupted=True, checkpoint=self.checkpoint)


def _epoch_message(record: dict, epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f}"]
    if record.get("accuracy") is not None:
        parts.append(f"acc {100 * record['accuracy']:.1f}%")
    if record.get("pixel_accuracy") is not None:
        parts.append(f"pixel acc {100 * record['pixel_accuracy']:.1f}%")
    if "val_loss" in record:
        parts.append(f"val loss {record['val_loss']:.4f}")
        if record.get("val_accuracy") is not None:
            parts.append(f"val acc {100 * record['val_accuracy']:.1f}%")
        if record.get("val_mean_iou") is not None:
            parts.append(f"val pixel acc {100 * record['val_pixel_accuracy']:.1f}%, "
                         f"val mIoU {100 * record['val_mean_iou']:.1f}%")
    parts.append(f"{record['samples_per_s']:.0f} samples/s")
    return ", ".join(parts)


def _interrupted_message(position: Position, checkpoint: CheckpointRecord | None) -> str:
    if checkpoint is None:
        return f"interrupted at step {position.global_step} (no run directory: nothing saved)"
    return f"interrupted at step {position.global_step}; checkpoint saved to {checkpoint.path}: continue with --resume"


def _non_finite_message(loss: float, epoch: int, position: Position, lr: float,
                        checkpoint: CheckpointRecord | None, run_dir: RunDir | None) -> str:
    where = f"the loss became {loss} at epoch {epoch + 1}, step {position.global_step + 1} (lr {lr:.3g}); training stopped"
    if checkpoint is not None:
        kept = f"the last good checkpoint is {checkpoint.path}"
    elif run_dir is not None and run_dir.has_checkpoint():
        kept = f"the checkpoint in {run_dir.path} from before this run is kept"
    else:
        kept = "no checkpoint was saved"
    return f"{where}; {kept}; try a lower --lr or check the data"


class _DeferredInterrupt:
    """Within the block, a first Ctrl-C only sets ``requested``; a second raises KeyboardInterrupt."""

    def __init__(self, progress: Progress, enabled: bool = True):
        self.progress = progress
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous = None

    def __enter__(self) -> _DeferredInterrupt:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            signal.signal(signal.SIGINT, self._previous)
            raise KeyboardInterrupt
        self.requested = True
        self.progress.message("stopping after this step to save a checkpoint (Ctrl-C again to abort)")


def train(
    artifacts: str | Path | Artifacts,
    data: str | Path | Dataset,
    *,
    val: str | Path | Dataset | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    threads: int | None = None,
    preprocess: Preprocess | None = None,
    progress: Progress | None = None,
    on_step: StepCallback | None = None,
    handle_sigint: bool = True,
    **config_values,
) -> FitResult:
    """What ``gfc train`` does; ``config_values`` are TrainConfig fields given explicitly."""
    progress = progress or Progress()
    artifacts = artifacts if isinstance(artifacts, Artifacts) else open_artifacts(artifacts)
    unknown = set(config_values) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise TypeError(f"unknown training options {sorted(unknown)}")
    config_values = {k: v for k, v in config_values.items() if v is not None}
    runs = RunDir(run_dir if run_dir is not None else default_run_dir(artifacts), artifacts)
    with runs.writing() as lock:  # one writer per run directory, before anything in it is looked at
        if not lock.enforced:
            progress.message(lock.UNENFORCED_NOTE)
        return _train_locked(runs, artifacts, data, val, resume, overwrite, device, threads, preprocess,
                             progress, on_step, handle_sigint, config_values)


def _train_locked(runs: RunDir, artifacts: Artifacts, data, val, resume: bool, overwrite: bool, device: str,
                  threads: int | None, preprocess: Preprocess | None, progress: Progress,
                  on_step: StepCallback | None, handle_sigint: bool, config_values: dict) -> FitResult:
    """`train` once it holds the run directory's writer lock."""
    record = _starting_record(runs, resume, overwrite)  # checks only; --overwrite clears below
    if record is None:
        if artifacts.fixed_batch is not None:
            config_values.setdefault("batch_size", artifacts.fixed_batch)
        config, start = TrainConfig(**config_values), Position()
    else:
        config, start = _resumed_config(record, config_values, progress), _stored_position(record)
    train_set = data if isinstance(data, Dataset) else load_dataset(data, artifacts, preprocess)
    val_set = val if val is None or isinstance(val, Dataset) else load_dataset(val, artifacts, preprocess)
    if record is not None and record.training.get("data", {}).get("fingerprint") not in (None, train_set.fingerprint()):
        progress.message(f"warning: resuming on other data than the checkpoint was trained on ({train_set.source})")
    if start.epoch >= config.epochs:
        raise InputError(
            f"nothing to train: the checkpoint has completed {start.epoch} of {config.epochs} epochs "
            "(pass a larger --epochs to train on)"
        )
    config.checked(artifacts, len(train_set), Progress(enabled=False))  # refuse before touching anything
    trainer = Trainer(artifacts, device, threads=threads, checkpoint=record.path if record else None)
    if record is None and overwrite:
        runs.clear()
    progress.message(f"device: {trainer.device.describe()}")
    progress.message(
        f"training {len(train_set)} samples from {train_set.source}, {config.epochs} epochs of batch "
        f"{config.batch_size}, lr {config.lr:g} ({config.schedule})"
        + (f", resuming from {record.describe()}" if record else "")
    )
    metrics = MetricsLog(runs.metrics_path, uuid.uuid4().hex[:12])
    metrics.write("start", config=config.to_dict(), device=trainer.device.describe(), resumed=record is not None,
                  data=train_set.source, samples=len(train_set), artifacts=str(artifacts.directory))
    result = fit(trainer, train_set, config, val=val_set, run_dir=runs, start=start, progress=progress,
                 metrics=metrics, on_step=on_step, handle_sigint=handle_sigint)
    if not result.interrupted:
        metrics.write("end", step=result.position.global_step, **{k: v for k, v in result.last.items() if k != "step"})
    return result


def _starting_record(runs: RunDir, resume: bool, overwrite: bool) -> CheckpointRecord | None:
    if resume:
        record = runs.latest()
        if record is None:
            raise InputError(f"--resume: {runs.path} holds no checkpoint to resume")
        return record
    if runs.has_checkpoint() and not overwrite:
        raise OutputError(
            f"{runs.path} already holds a checkpoint: pass --resume to continue it "
            "or --overwrite to start over"
        )
    return None


def _stored_position(record: CheckpointRecord) -> Position:
    try:
        return Position.from_dict(record.training["position"])
    except (KeyError, ValueError) as error:
        raise corrupted_record(record.path.parent / RECORD_NAME, error) from None


def _resumed_config(record: CheckpointRecord, given: dict, progress: Progress) -> TrainConfig:
    try:
        stored = TrainConfig.from_dict(record.training.get("config", {}))
    except ValueError as error:
        raise corrupted_record(record.path.parent / RECORD_NAME, error) from None
    changed = {k: v for k, v in given.items() if getattr(stored, k) != v}
    for key, value in changed.items():
        progress.message(f"resume: {key} changes from {getattr(stored, key)} to {value}")
    if set(changed) - {"epochs"}:
        progress.message("note: the resumed run will not equal an uninterrupted run with the old settings")
    return dataclasses.replace(stored, **changed)
