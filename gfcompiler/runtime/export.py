"""Export a plain inference model with the trained weights.

The backend engine writes the model (gfcompiler.runtime.engine): for ort-training
artifacts onnxruntime-training's ``Module.export_model_for_inferencing`` keeps the eval
model's (or, two-stage, ``export_model.onnx``'s) nodes that produce the model output and
writes the current parameters in as initializers; for ``--backend onnx`` artifacts the
parameters are appended to ``export_model.onnx`` as serialized initializers
(gfcompiler.runtime.protowire). Neither needs the onnx package.
The model is written to a temporary file beside the target,
loaded by a plain ``InferenceSession`` on CPU, checked to take only the data input and
to reproduce the runtime's eval outputs on a fixed batch (a segmentation model's second
output, the class map ``classes``, to equal the argmax of its logits), and only then moved
into place with ``os.replace``.

This module sits below the Trainer (loop → trainer → export → losses): it takes any
object with the `ExportSource` attributes, which the Trainer has.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Protocol

import numpy as np

from gfcompiler.errors import ArtifactError, OutputError, TrainingError
from gfcompiler.manifest import CLASS_MAP_OUTPUT
from gfcompiler.ort_training import error_message, onnxruntime
from gfcompiler.runtime.artifacts import Artifacts, random_batch
from gfcompiler.runtime.losses import numpy_loss
from gfcompiler.runtime.metrics import predicted_classes

RTOL = 1e-4
ATOL = 1e-5
_PROBE_BATCH = 4
_PROBE_SIZE = 32  # spatial size used for dynamic spatial dimensions


class InferenceWriter(Protocol):
    """A backend engine (gfcompiler.runtime.engine), as far as exporting uses it."""

    def write_inference_model(self, path: Path) -> None:
        """The whole model with the current weights at ``path`` (unchecked)."""


class ExportSource(Protocol):
    """What exporting needs of a `gfcompiler.runtime.trainer.Trainer`."""

    artifacts: Artifacts
    engine: InferenceWriter

    def eval_batch(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """(loss, model output) of the eval model on one batch."""


def export_inference_model(trainer: ExportSource, path: str | Path, *, overwrite: bool = False, verify: bool = True) -> Path:
    """Write ``trainer``'s model with its current weights to ``path`` (atomic, verified)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"export target {path} is a directory; name an .onnx file")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} already exists; pass --force to replace it")
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {path}: directory {path.parent} does not exist")
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(3)}.tmp")
    try:
        try:
            write_inference_model(trainer, temporary)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises bare RuntimeErrors
            if not os.access(path.parent, os.W_OK):
                raise OutputError(f"cannot write {path}: permission denied") from None
            raise TrainingError(f"onnxruntime could not export the inference model: {error_message(error)}") from None
        if verify:
            verify_export(trainer, temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def write_inference_model(trainer: ExportSource, path: Path) -> None:
    """Write ``trainer``'s whole model with its current weights to ``path`` (no checks; onnxruntime errors pass)."""
    trainer.engine.write_inference_model(Path(path))


def probe_batch(trainer: ExportSource) -> tuple[np.ndarray, np.ndarray]:
    """A fixed pseudo-random batch (x, labels) shaped like the model's input and labels."""
    a = trainer.artifacts
    return random_batch(a.manifest, a.fixed_batch or _PROBE_BATCH, dynamic_size=_PROBE_SIZE)


def verify_export(trainer: ExportSource, model_path: Path) -> float:
    """Load ``model_path`` in a plain InferenceSession and compare with the trainer; returns max |diff|."""
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001
        raise ArtifactError(f"the exported model does not load in onnxruntime: {error_message(error)}") from None
    input_names = [i.name for i in session.get_inputs()]
    if input_names != [trainer.artifacts.input.name]:
        raise ArtifactError(
            f"the exported model takes inputs {input_names}, expected only {trainer.artifacts.input.name!r}"
        )
    x, labels = probe_batch(trainer)
    (exported,) = session.run([trainer.artifacts.output.name], {input_names[0]: x})
    eval_loss, expected = trainer.eval_batch(x, labels)
    difference = float(np.max(np.abs(exported - expected))) if exported.size else 0.0
    # The two sessions sum in different orders (onnxruntime prepacks and fuses constant
    # weights differently), a float32 error that follows the size of the sums, not of each
    # output: near-zero logits of a map whose others are large need an absolute tolerance
    # relative to the largest output.
    atol = ATOL + RTOL * (float(np.max(np.abs(expected))) if expected.size else 0.0)
    if exported.shape != expected.shape or not np.allclose(exported, expected, rtol=RTOL, atol=atol):
        raise ArtifactError(
            f"the exported model's outputs differ from the runtime's eval outputs (max |diff| {difference:.3g})"
        )
    if trainer.artifacts.segmentation:
        _verify_class_map(session, x, exported)
    # Independent of how the runtime got its outputs: the eval model's own loss must follow
    # from the exported outputs.
    exported_loss = numpy_loss(trainer.artifacts.loss, exported, labels, trainer.artifacts.ignore_index)
    if not np.isclose(exported_loss, eval_loss, rtol=1e-3, atol=1e-4):
        raise ArtifactError(
            f"the exported model's outputs give loss {exported_loss:.6g}, the eval model {eval_loss:.6g}"
        )
    return difference


def _verify_class_map(session, x: np.ndarray, logits: np.ndarray) -> None:
    """A segmentation export's ``classes`` output is the class map of its logits."""
    names = [o.name for o in session.get_outputs()]
    if CLASS_MAP_OUTPUT not in names:
        raise ArtifactError(f"the exported segmentation model has no {CLASS_MAP_OUTPUT!r} output (outputs: {names})")
    (classes,) = session.run([CLASS_MAP_OUTPUT], {session.get_inputs()[0].name: x})
    expected = predicted_classes(logits)
    if classes.shape != expected.shape or not np.array_equal(classes, expected):
        raise ArtifactError(
            f"the exported model's {CLASS_MAP_OUTPUT!r} output ({'×'.join(map(str, classes.shape))}) is not "
            "the argmax of its logits"
        )
