"""Opening a compiled artifact directory and checking that it is whole and ours.

`open_artifacts` reads ``manifest.json`` into a `gfcompiler.manifest.Manifest`, refuses a
format this gfcompiler does not read, checks that every file is there and still has the
sha256 the compiler recorded, and returns an `Artifacts`: the manifest and the few facts
the runtime uses (input, output and label specs with known shapes, loss, learning-rate
multiplier, the backend, for two-stage artifacts the boundary between the frozen prefix
and the trained suffix, and for ``--backend onnx`` artifacts the step model's state
tensors). Every problem is an
ArtifactError with a one-line message. Nothing here imports onnxruntime.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from gfcompiler import READABLE_ARTIFACT_FORMATS, __version__
from gfcompiler.errors import ArtifactError, first_line
from gfcompiler.manifest import (
    BACKEND_ONNX,
    BACKENDS,
    FILES,
    LOSSES,
    MANIFEST_NAME,
    STATE_KINDS,
    STEP_FILES,
    TASKS,
    TWO_STAGE_FILES,
    Manifest,
    StepRecord,
    TensorRecord,
    read_manifest,
    sha256_file,
)

MAX_DIMENSION = 2**31 - 1  # a tensor dimension beyond this is a corrupted manifest, not a model
NUMERIC_DTYPES = ("float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64",
                  "uint8", "uint16", "uint32", "uint64", "bool")


@dataclasses.dataclass(frozen=True)
class Artifacts:
    """A verified artifact directory."""

    directory: Path
    manifest: Manifest
    input: TensorRecord  # shapes and dtypes known (`_spec`)
    output: TensorRecord
    label: TensorRecord

    @property
    def loss(self) -> str:
        return self.manifest.loss

    @property
    def lr_multiplier(self) -> float:
        return self.manifest.lr_multiplier

    @property
    def boundary(self) -> tuple[TensorRecord, ...]:
        """Two-stage artifacts: the suffix's data inputs (empty: single-graph or step-model artifacts)."""
        return self.manifest.boundary

    @property
    def backend(self) -> str:
        """BACKEND_ORT_TRAINING or BACKEND_ONNX (one plain ONNX step model)."""
        return self.manifest.backend

    @property
    def step(self) -> StepRecord | None:
        """BACKEND_ONNX only: the step model's interface."""
        return self.manifest.step

    @property
    def two_stage(self) -> bool:
        """A frozen prefix model runs before the training model (gfcompiler.split)."""
        return bool(self.boundary)

    @property
    def training_inputs(self) -> tuple[str, ...]:
        """The data inputs of the training and eval models (the label not included)."""
        return tuple(b.name for b in self.boundary) if self.boundary else (self.input.name,)

    def path(self, key: str) -> Path:
        """The path of one of the files in gfcompiler.manifest.FILES (TWO_STAGE_FILES, STEP_FILES)."""
        return self.directory / self.manifest.files[key]

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model was compiled for, None when the batch is dynamic."""
        return self.input.shape[0] if self.input.shape else None

    @property
    def sample_shape(self) -> tuple[int | None, ...]:
        return self.input.shape[1:]

    @property
    def task(self) -> str:
        """``"classification"`` or ``"segmentation"`` (manifest ``task``; older manifests: classification)."""
        return self.manifest.task

    @property
    def segmentation(self) -> bool:
        """A per-pixel model: output N×C×H×W, labels N×H×W (cross-entropy) or N×1×H×W (bce)."""
        return self.task == "segmentation"

    @property
    def ignore_index(self) -> int | None:
        """The label of pixels a segmentation loss ignores (manifest ``ignore_index``; None: none)."""
        return self.manifest.ignore_index if self.segmentation else None

    @property
    def num_classes(self) -> int | None:
        """Classes of a cross-entropy model: the logits' last dimension, or axis 1 of a segmentation
        model's N×C×H×W logits."""
        if self.loss != "cross_entropy" or not self.output.shape:
            return None
        if self.segmentation:
            return self.output.shape[1] if len(self.output.shape) == 4 else None
        return self.output.shape[-1]

    @property
    def trainable_params(self) -> tuple[str, ...]:
        return self.manifest.trainable_params

    @property
    def preprocess(self) -> dict:
        return self.manifest.preprocess.to_json() if self.manifest.preprocess is not None else {}

    @property
    def identity(self) -> str:
        """What a training checkpoint records to refuse being loaded into other artifacts."""
        key = "step_model" if self.backend == BACKEND_ONNX else "training_model"
        return self.manifest.file_digests.get(self.manifest.files[key], "")


def open_artifacts(directory: str | Path, *, verify: bool = True) -> Artifacts:
    """Read and check an artifact directory; ``verify`` also checks the file digests."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"no compiled artifacts at {directory} (compile a model there with `gfc compile`)")
    if not (directory / MANIFEST_NAME).is_file():
        raise ArtifactError(f"{directory} has no {MANIFEST_NAME}: not a gfcompiler artifact directory")
    try:
        manifest = read_manifest(directory)
    except (OSError, ValueError, RecursionError) as error:  # RecursionError: absurdly nested JSON
        raise ArtifactError(f"{directory / MANIFEST_NAME} is unreadable or corrupted ({first_line(error)})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{directory / MANIFEST_NAME} is corrupted (not a JSON object)")
    _check_format(directory, manifest)
    artifacts = _parse(directory, manifest)
    _check_files(artifacts, verify)
    return artifacts


def _check_format(directory: Path, manifest: dict) -> None:
    found = manifest.get("format")
    if found not in READABLE_ARTIFACT_FORMATS:
        made_by = manifest.get("gfcompiler_version", "an unknown version")
        raise ArtifactError(
            f"{directory} holds artifacts in format {found} (made by gfcompiler {made_by}); "
            f"gfcompiler {__version__} reads formats {', '.join(map(str, READABLE_ARTIFACT_FORMATS))}: recompile the model"
        )


def _parse(directory: Path, data: dict) -> Artifacts:
    where = directory / MANIFEST_NAME
    try:
        manifest = Manifest.from_json(data)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ArtifactError(f"{where} is corrupted or incomplete (bad or missing key {error})") from None
    backend, form, boundary, step = manifest.backend, manifest.form.kind, manifest.boundary, manifest.step
    if backend not in BACKENDS:
        raise ArtifactError(f"{where} names backend {backend!r}; this runtime knows {', '.join(BACKENDS)}")
    missing_keys = [key for key in _required_files(backend, form) if key not in manifest.files]
    if missing_keys:
        raise ArtifactError(f"{where} names no file for {', '.join(missing_keys)}")
    for key, name in manifest.files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise ArtifactError(f"{where} names {name!r} for {key}: artifact files are plain names inside {directory}")
    if backend == BACKEND_ONNX and step is None:
        raise ArtifactError(f"{where} is corrupted or incomplete (bad or missing key 'step')")
    forms = ("step_model",) if backend == BACKEND_ONNX else ("single_graph", "two_stage")
    if form not in forms or (form == "two_stage") != bool(boundary):
        raise ArtifactError(f"{where} is corrupted: form {form!r} with {len(boundary)} boundary tensor(s)")
    if step is not None:
        _check_step(where, step)
    if manifest.label is None:
        raise ArtifactError(f"{where} is corrupted or incomplete (bad or missing key 'label')")
    if len(manifest.inputs) != 1:
        raise ArtifactError(f"{where} lists {len(manifest.inputs)} data inputs; the runtime trains models with exactly one")
    if not manifest.outputs:
        raise ArtifactError(f"{where} lists no model output")
    if manifest.loss not in LOSSES:
        raise ArtifactError(f"{where} names loss {manifest.loss!r}; this runtime knows {', '.join(LOSSES)}")
    if not (math.isfinite(manifest.lr_multiplier) and manifest.lr_multiplier > 0):
        raise ArtifactError(f"{where} is corrupted: optimizer lr_multiplier {manifest.lr_multiplier} is not a positive number")
    if manifest.task not in TASKS:
        raise ArtifactError(f"{where} names task {manifest.task!r}; this runtime knows {', '.join(TASKS)}")
    if any(b.from_input and b.name != manifest.inputs[0].name for b in boundary):
        raise ArtifactError(f"{where} is corrupted: a boundary tensor marked from_input is not the data input")
    _check_tensors(where, manifest)
    return Artifacts(directory, manifest, _spec(manifest.inputs[0]), _spec(manifest.outputs[0]), _spec(manifest.label))


def _check_tensors(where: Path, manifest: Manifest) -> None:
    """Dimensions are positive and not absurd, dtypes are numeric, the label's dtype suits the loss
    (class indices for cross-entropy, numbers otherwise); the models must agree (checked by the engines)."""
    if manifest.inputs[0].shape is None:
        raise ArtifactError(f"{where} is corrupted: input {manifest.inputs[0].name!r} has no shape")
    records = [("input", manifest.inputs[0]), ("output", manifest.outputs[0]), ("label", manifest.label),
               *(("boundary tensor", b) for b in manifest.boundary)]
    for role, record in records:
        bad = [d for d in record.shape or () if d is not None and not 0 < d <= MAX_DIMENSION]
        if bad:
            raise ArtifactError(f"{where} is corrupted: {role} {record.name!r} has dimension {bad[0]}")
        if record.dtype is not None and record.dtype not in NUMERIC_DTYPES:
            raise ArtifactError(f"{where} is corrupted: {role} {record.name!r} has dtype {record.dtype!r}")
    label = manifest.label.dtype
    if label is not None and (manifest.loss == "cross_entropy") != label.startswith(("int", "uint")):
        wanted = "integer class indices" if manifest.loss == "cross_entropy" else "floating-point targets"
        raise ArtifactError(f"{where} is corrupted: loss {manifest.loss} takes {wanted}, the label is {label}")


def _spec(record: TensorRecord) -> TensorRecord:
    """``record`` with an unknown shape read as rank 0 and an unknown dtype as float32."""
    return dataclasses.replace(record, shape=record.shape or (), dtype=record.dtype or "float32")


def _required_files(backend: str, form: str) -> dict:
    if backend == BACKEND_ONNX:
        return STEP_FILES
    return {**FILES, **(TWO_STAGE_FILES if form == "two_stage" else {})}


def _check_step(where: Path, step: StepRecord) -> None:
    """The step section names each state tensor once, every one with a known kind."""
    names = [s.name for s in step.state]
    if not step.parameters:
        raise ArtifactError(f"{where} is corrupted: the step model updates no trainable parameter")
    if len(set(names)) != len(names) or len({s.updated for s in step.state}) != len(names):
        raise ArtifactError(f"{where} is corrupted: a state tensor of the step model is listed twice")
    bad = [s.name for s in step.state if s.kind not in STATE_KINDS]
    if bad:
        raise ArtifactError(f"{where} is corrupted: state tensor {bad[0]!r} has an unknown kind")


def _check_files(artifacts: Artifacts, verify: bool) -> None:
    paths = [artifacts.directory / name for name in artifacts.manifest.files.values()]
    for path in paths:
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: the artifact directory is incomplete, recompile the model")
    if not verify:
        return
    for path in paths:
        expected = artifacts.manifest.file_digests.get(path.name)
        if expected and sha256_file(path) != expected:
            raise ArtifactError(
                f"{path} does not match the sha256 in {MANIFEST_NAME} "
                "(edited by hand or corrupted): recompile the model"
            )


def random_batch(manifest: Manifest, batch: int, seed: int = 0, dynamic_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A pseudo-random batch (x, labels) shaped like ``manifest``'s data input and label.

    ``x`` is standard normal; integer labels are class indices below the output's class
    count, other labels (regression targets) uniform in [0, 1). Dynamic dimensions after
    the batch axis take ``dynamic_size``.
    """
    rng = np.random.default_rng(seed)

    def sized(record: TensorRecord | None) -> list[int]:
        shape = (record.shape if record is not None else None) or (None,)
        return [batch] + [d if d is not None else dynamic_size for d in shape[1:]]

    x = rng.standard_normal(sized(manifest.inputs[0])).astype(np.float32)
    label = manifest.label
    if label is not None and label.dtype is not None and not label.dtype.startswith("int"):
        return x, rng.random(sized(label)).astype(np.float32)
    return x, rng.integers(0, _class_count(manifest), sized(label)).astype(np.int64)


def _class_count(manifest: Manifest) -> int:
    """Classes the output scores: its channel axis for segmentation, else its last axis (1 when unknown)."""
    shape = manifest.outputs[0].shape or ()
    axis = 1 if manifest.task == "segmentation" else -1
    classes = shape[axis] if len(shape) > max(axis, 0) else None
    return classes if isinstance(classes, int) and classes > 0 else 1


