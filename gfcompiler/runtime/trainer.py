"""`Trainer`: one training session on a compiled artifact directory.

    from gfcompiler.runtime import Trainer
    trainer = Trainer("out/", device="auto")
    loss = trainer.step(x, y)          # forward, backward, optimizer step
    logits = trainer.predict(x)
    classes = trainer.predict_classes(x)  # N (classifiers) or N×H×W (segmentation)
    trainer.evaluate(dataset)          # {"loss", "accuracy", "samples"}; segmentation:
                                       # {"loss", "pixel_accuracy", "mean_iou", "class_iou", ...}
    trainer.export("finetuned.onnx")   # plain inference model, verified

The training state and the sessions belong to a backend engine
(gfcompiler.runtime.engine): onnxruntime-training's Module / Optimizer for
``ort-training`` artifacts, one plain ONNX step model for ``--backend onnx`` ones. The
Trainer adds what both leave to the caller: for two-stage artifacts, the frozen prefix
model run before the training module (gfcompiler.runtime.prefix), the manifest's
learning-rate multiplier, non-finite loss detection, labels for the eval model, and
errors a user can act on. Epochs, schedules and checkpoints are
gfcompiler.runtime.loop's job.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import numpy as np

from gfcompiler.errors import ArtifactError, InputError, TrainingError
from gfcompiler.ort_training import error_message, onnxruntime
from gfcompiler.runtime import device as devices
from gfcompiler.runtime.artifacts import Artifacts, open_artifacts
from gfcompiler.runtime.data import label_rule, valid_labels
from gfcompiler.runtime.engine import create_engine
from gfcompiler.runtime.export import export_inference_model, write_inference_model
from gfcompiler.runtime.losses import class_scores, numpy_loss
from gfcompiler.runtime.metrics import SegmentationScores, predicted_classes
from gfcompiler.runtime.prefix import FrozenPrefix


class NonFiniteLoss(TrainingError):
    """The loss of a step was NaN or infinite; the parameters were not updated."""

    def __init__(self, loss: float):
        super().__init__(f"the loss became {loss}")
        self.loss = loss


@dataclasses.dataclass(frozen=True)
class StepResult:
    loss: float
    outputs: np.ndarray | None  # the model output (logits) when the training model returns it


class Trainer:
    """Train, evaluate and export the model of an artifact directory.

    ``checkpoint``: a checkpoint to start from (an onnxruntime checkpoint or, for
    ``--backend onnx`` artifacts, a state .npz; default: the compiled initial one).
    ``lr``: the learning rate ``step`` uses unless given one.
    ``memory_arena=False`` turns onnxruntime's CPU arena off (for memory measurements).
    ``profile_prefix`` turns onnxruntime's profiler on for the engine's sessions (not the
    frozen prefix): each writes ``<profile_prefix>_<time>.json`` when it ends (gfc bench).
    """

    def __init__(
        self,
        artifacts: str | Path | Artifacts,
        device: str = "cpu",
        *,
        threads: int | None = None,
        checkpoint: str | Path | None = None,
        lr: float = 1e-3,
        verify: bool = True,
        memory_arena: bool = True,
        profile_prefix: str | None = None,
    ):
        self.artifacts = artifacts if isinstance(artifacts, Artifacts) else open_artifacts(artifacts, verify=verify)
        self.device = device if isinstance(device, devices.Device) else devices.select_device(device)
        self.threads = threads
        self.lr = lr
        self.steps_taken = 0
        spinning = session_spinning(self.artifacts.two_stage)
        self._options = devices.session_options(threads, memory_arena=memory_arena, spinning=spinning)
        if profile_prefix is not None:
            self._options.enable_profiling = True
            self._options.profile_file_prefix = str(profile_prefix)
        # The prefix gets options of its own: FrozenPrefix raises their optimization level.
        self._prefix_options = devices.session_options(threads, memory_arena=memory_arena, spinning=spinning)
        self.engine = create_engine(self.artifacts, self.device, self._options,
                                    Path(checkpoint) if checkpoint is not None else None)
        self.prefix = self._create_prefix()
        self._applied_lr: float | None = None
        self._inference: tuple[int, object] | None = None

    # ------------------------------------------------------------ set-up

    def _create_prefix(self) -> FrozenPrefix | None:
        a = self.artifacts
        return FrozenPrefix.from_manifest(a.directory, a.manifest, self.device, self._prefix_options) if a.two_stage else None

    @property
    def backend(self) -> str:
        return self.artifacts.backend

    @property
    def checkpoint_path(self) -> Path:
        """The checkpoint this trainer started from."""
        return self.engine.checkpoint_path

    # onnxruntime-training's objects, for code that reaches into the ort-training backend
    # (AttributeError for --backend onnx artifacts, which have none).
    @property
    def module(self):
        return self.engine.module

    @property
    def optimizer(self):
        return self.engine.optimizer

    @property
    def state(self):
        return self.engine.state

    # ------------------------------------------------------------ training

    @property
    def lr_multiplier(self) -> float:
        return self.artifacts.lr_multiplier

    def set_lr(self, lr: float) -> None:
        """Set the user learning rate (the optimizer gets ``lr * lr_multiplier``)."""
        if lr != self._applied_lr:
            self.engine.set_learning_rate(float(lr) * self.lr_multiplier)
            self._applied_lr = lr

    def step(self, x: np.ndarray, y: np.ndarray, lr: float | None = None) -> float:
        """One training step on a batch; returns the loss before the update."""
        return self.train_step(x, y, lr).loss

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float | None = None) -> StepResult:
        """Forward, backward and optimizer step; NonFiniteLoss (no update) on a NaN/Inf loss."""
        self.set_lr(self.lr if lr is None else lr)
        loss, outputs = self.engine.train(self._feeds(x, y))
        if not math.isfinite(loss):
            self.engine.discard()
            raise NonFiniteLoss(loss)
        self.engine.apply()
        self.steps_taken += 1
        return StepResult(loss, outputs)

    def _feeds(self, x: np.ndarray, y: np.ndarray) -> dict:
        """The training and eval models' inputs for a batch, checked."""
        feeds = self._stage_inputs(self._check_x(x))
        feeds[self.artifacts.label.name] = self._check_y(y, len(x))
        return feeds

    def _stage_inputs(self, x: np.ndarray) -> dict:
        """The training module's data inputs: ``x``, or the prefix's boundary tensors (and ``x`` if it crosses)."""
        if self.prefix is None:
            return {self.artifacts.input.name: x}
        feeds = self.prefix(x)
        if any(b.from_input for b in self.artifacts.boundary):
            feeds[self.artifacts.input.name] = x
        return feeds

    def _check_x(self, x) -> np.ndarray:
        x = np.asarray(x)
        spec = self.artifacts.input
        fits = x.ndim == len(spec.shape) and all(w is None or g == w for g, w in zip(x.shape, spec.shape))
        if not fits or x.dtype.kind != "f":
            raise InputError(f"a batch x of {_shape(x)} {x.dtype} does not fit the model input {spec.describe()}")
        return np.ascontiguousarray(x, dtype=np.float32)

    def _check_y(self, y, n: int) -> np.ndarray:
        y = np.asarray(y)
        spec = self.artifacts.label
        if self.artifacts.segmentation:
            y = self._segmentation_labels(y, spec)
        integer = spec.dtype.startswith("int")
        fits = y.ndim == len(spec.shape) and len(y) == n and all(
            w is None or g == w for g, w in zip(y.shape[1:], spec.shape[1:])
        )
        if not fits or (integer and y.dtype.kind not in "iu") or y.dtype.kind not in "iuf":
            raise InputError(
                f"a batch y of {_shape(y)} {y.dtype} does not fit the model's labels {spec.describe()} "
                f"for {n} samples"
            )
        return np.ascontiguousarray(y, dtype=np.int64 if integer else np.float32)

    def _segmentation_labels(self, y: np.ndarray, spec) -> np.ndarray:
        """A binary model's N×H×W masks given their channel axis; class indices checked (the
        compiled loss is undefined for a label that is neither a class nor ignore_index)."""
        if y.ndim == len(spec.shape) - 1:
            y = y[:, None]
        if self.artifacts.num_classes is not None and y.dtype.kind in "iu":
            bad = ~valid_labels(y, self.artifacts)
            if bad.any():
                raise InputError(f"a batch y has label {int(y[bad].flat[0])}; {label_rule(self.artifacts)}")
        return y

    # ------------------------------------------------------------ evaluation

    def eval_batch(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """(loss, model output) of the eval model on one batch; no parameter changes."""
        loss, outputs = self.engine.evaluate(self._feeds(x, y))
        return loss, (outputs if outputs is not None else self._inference_outputs(x))

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """The model output (logits) for ``x``; labels are not needed."""
        parts = []
        for chunk, count in self._chunks(np.asarray(x), batch_size):
            if not self.engine.eval_has_outputs:
                outputs = self._inference_outputs(chunk)
            else:
                outputs = self.eval_batch(chunk, self._dummy_labels(len(chunk)))[1]
            parts.append(outputs[:count])
        return np.concatenate(parts)

    def _inference_outputs(self, x: np.ndarray) -> np.ndarray:
        """Model outputs through an exported inference session, for eval models without them.

        Artifacts whose eval model returns only the loss (onnxruntime's default) still give
        predictions: the current weights are exported to a temporary file, loaded in an
        InferenceSession, and the session is reused until the next training step.
        """
        if self._inference is None or self._inference[0] != self.steps_taken:
            ort = onnxruntime()
            with tempfile.TemporaryDirectory(prefix="gfc-inference-") as scratch:
                path = Path(scratch) / "model.onnx"
                try:
                    write_inference_model(self, path)
                    session = ort.InferenceSession(str(path), self._options, providers=self.device.providers)
                except Exception as error:  # noqa: BLE001
                    raise ArtifactError(
                        f"the eval model does not output {self.artifacts.output.name!r} and exporting it "
                        f"failed: {error_message(error)}"
                    ) from None
            self._inference = (self.steps_taken, session)
        session = self._inference[1]
        return session.run([self.artifacts.output.name], {self.artifacts.input.name: self._check_x(x)})[0]

    def predict_classes(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """The predicted class of each sample (N, a classifier) or pixel (N×H×W, a segmentation
        model: argmax over the channel axis, binary models logit > 0; what the exported model's
        ``classes`` output gives)."""
        if self.artifacts.segmentation:
            return predicted_classes(self.predict(x, batch_size))
        if self.artifacts.loss != "cross_entropy":
            raise InputError(f"the model has no classes: it was compiled with the {self.artifacts.loss} loss")
        return class_scores(self.predict(x, batch_size)).argmax(axis=-1)

    def evaluate(self, data, batch_size: int = 256) -> dict:
        """Mean loss and sample count over a Dataset or (x, y), with accuracy (classification) or
        pixel accuracy, mean IoU and per-class IoU (segmentation: gfcompiler.runtime.metrics)."""
        x, y = (data.x, data.y) if hasattr(data, "x") else data
        if self.artifacts.segmentation:
            scores = SegmentationScores(self.artifacts.num_classes or 2, self.artifacts.ignore_index)
            for loss, outputs, labels in self._eval_batches(x, y, batch_size):
                scores.add(loss, outputs, labels)
            return scores.result()
        total_loss, correct, seen = 0.0, 0, 0
        for loss, outputs, yb in self._eval_batches(x, y, batch_size):
            count = len(yb)
            total_loss += loss * count
            seen += count
            if self.artifacts.loss == "cross_entropy":
                correct += int((class_scores(outputs).argmax(axis=-1) == yb).sum())
        result = {"loss": total_loss / max(seen, 1), "samples": seen}
        if self.artifacts.loss == "cross_entropy":
            result["accuracy"] = correct / max(seen, 1)
        return result

    def _eval_batches(self, x: np.ndarray, y: np.ndarray, batch_size: int):
        """(mean loss, outputs, labels) of each evaluation batch, without a fixed-batch model's padding."""
        size = self.fixed_batch or batch_size
        for start in range(0, len(x), size):
            xb, yb = x[start : start + size], y[start : start + size]
            count = len(xb)
            if self.fixed_batch and count < self.fixed_batch:
                xb, yb = _pad(xb, size), _pad(yb, size)
            loss, outputs = self.eval_batch(xb, yb)
            if count < len(xb):  # padded: the model's mean loss would include the padding
                loss = numpy_loss(self.artifacts.loss, outputs[:count], yb[:count], self.artifacts.ignore_index)
            yield loss, outputs[:count], yb[:count]

    @property
    def fixed_batch(self) -> int | None:
        return self.artifacts.fixed_batch

    def _chunks(self, x: np.ndarray, batch_size: int):
        size = self.fixed_batch or batch_size
        for start in range(0, len(x), size):
            chunk = x[start : start + size]
            yield (_pad(chunk, size) if self.fixed_batch else chunk), len(chunk)

    def _dummy_labels(self, n: int) -> np.ndarray:
        label = self.artifacts.label
        shape = [n] + [d if d is not None else 1 for d in label.shape[1:]]
        return np.zeros(shape, dtype=np.int64 if label.dtype.startswith("int") else np.float32)

    # ------------------------------------------------------------ state

    def parameters(self) -> dict[str, np.ndarray]:
        """Copies of the parameters in the training state (ort-training: trainable and frozen)."""
        return self.engine.parameters()

    def trainable_parameters(self) -> dict[str, np.ndarray]:
        """Copies of the trained parameters alone (manifest ``trainable_params``), in that order."""
        parameters = self.engine.parameters()
        return {name: parameters[name] for name in self.artifacts.trainable_params}

    def load_parameters(self, arrays: dict[str, np.ndarray]) -> None:
        """Set trained parameters from ``arrays`` (name -> array; any subset, cast to the parameter's
        dtype); the optimizer state and step count stay. InputError for an unknown name or a wrong shape."""
        current = self.trainable_parameters()
        checked = {}
        for name, array in arrays.items():
            array = np.asarray(array)
            if name not in current:
                raise InputError(f"{name!r} is not a trained parameter of {self.artifacts.directory}")
            if array.shape != current[name].shape:
                raise InputError(f"parameter {name!r} is {_shape(current[name])}, got an array of {_shape(array)}")
            checked[name] = np.ascontiguousarray(array, dtype=current[name].dtype)
        self.engine.load_parameters(checked)
        self._inference = None  # predictions exported from the old weights are stale

    @property
    def checkpoint_suffix(self) -> str:
        return self.engine.checkpoint_suffix

    def save_checkpoint(self, path: str | Path) -> None:
        """The whole training state (parameters, optimizer state) at ``path``; no atomicity (see RunDir)."""
        self.engine.save_checkpoint(Path(path))

    def export(self, path: str | Path, *, overwrite: bool = False, verify: bool = True) -> Path:
        """Write a plain inference model with the current weights; see gfcompiler.runtime.export."""
        return export_inference_model(self, path, overwrite=overwrite, verify=verify)


def session_spinning(two_stage: bool) -> bool:
    """Whether the sessions of a step keep onnxruntime's spinning intra-op threads.

    A two-stage step runs three sessions back to back (prefix, training, optimizer): the
    idle threads of one spin on the cores the next needs, and turning spinning off made
    resnet18's step 11% faster on 2 cores. A single-graph step (training, optimizer)
    was 3% faster with spinning on; a ``--backend onnx`` step is one session.
    """
    return not two_stage


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    if len(a) >= size:
        return a
    padding = np.zeros((size - len(a), *a.shape[1:]), dtype=a.dtype)
    return np.concatenate([a, padding])


def _shape(a: np.ndarray) -> str:
    return "×".join(str(d) for d in np.shape(a))
