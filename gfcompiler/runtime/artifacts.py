"""Opening a compiled artifact directory and checking that it is whole and ours.

`open_artifacts` reads ``manifest.json`` (schema: gfcompiler.manifest), refuses a format
this gfcompiler does not read, checks that every file is there and still has the sha256
the compiler recorded, and returns an `Artifacts` with the few facts the runtime uses
(input, output and label specs, loss, learning-rate multiplier, the backend, for
two-stage artifacts the boundary between the frozen prefix and the trained suffix, and
for ``--backend onnx`` artifacts the step model's state tensors). Every problem is an
ArtifactError with a one-line message. Nothing here imports onnxruntime.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gfcompiler import READABLE_ARTIFACT_FORMATS, __version__
from gfcompiler.errors import ArtifactError
from gfcompiler.manifest import (
    BACKEND_ONNX,
    BACKEND_ORT_TRAINING,
    BACKENDS,
    FILES,
    MANIFEST_NAME,
    STEP_FILES,
    TWO_STAGE_FILES,
    manifest_backend,
    read_manifest,
    sha256_file,
)

LOSSES = ("cross_entropy", "mse", "bce", "l1")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, shape (None for a dynamic dimension), dtype name."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    @classmethod
    def from_manifest(cls, entry: dict) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) else None for d in entry.get("shape") or ())
        return cls(str(entry["name"]), shape, str(entry.get("dtype") or "float32"))

    def describe(self) -> str:
        return "×".join("N" if d is None else str(d) for d in self.shape) + f" {self.dtype}"


@dataclasses.dataclass(frozen=True)
class BoundaryTensor:
    """A tensor crossing from the prefix into the suffix; ``from_input``: the data input itself."""

    name: str
    from_input: bool


@dataclasses.dataclass(frozen=True)
class StateTensor:
    """A tensor the step model carries from step to step: input ``name``, output ``updated``.

    ``kind`` is "parameter" (a trainable parameter; ``param`` is its own name) or
    "optimizer" (a slot such as ``<param>.exp_avg`` of parameter ``param``).
    """

    name: str
    updated: str
    kind: str
    param: str


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The step model's interface (manifest key ``step``, ``--backend onnx`` only)."""

    learning_rate: str
    step: str
    loss: str
    output: str
    state: tuple[StateTensor, ...]

    @property
    def parameters(self) -> tuple[StateTensor, ...]:
        return tuple(s for s in self.state if s.kind == "parameter")

    @classmethod
    def from_manifest(cls, entry: dict) -> StepSpec:
        state = tuple(
            StateTensor(str(s["name"]), str(s["updated"]), str(s["kind"]), str(s.get("param") or s["name"]))
            for s in entry["state"]
        )
        return cls(str(entry["learning_rate"]), str(entry["step"]), str(entry["loss"]), str(entry["output"]), state)


@dataclasses.dataclass(frozen=True)
class Artifacts:
    """A verified artifact directory."""

    directory: Path
    manifest: dict
    input: TensorSpec
    output: TensorSpec
    label: TensorSpec
    loss: str
    lr_multiplier: float
    boundary: tuple[BoundaryTensor, ...] = ()  # empty: single-graph artifacts
    backend: str = BACKEND_ORT_TRAINING  # or BACKEND_ONNX: one plain ONNX step model
    step: StepSpec | None = None  # BACKEND_ONNX only

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
        return self.directory / self.manifest["files"][key]

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model was compiled for, None when the batch is dynamic."""
        return self.input.shape[0] if self.input.shape else None

    @property
    def sample_shape(self) -> tuple[int | None, ...]:
        return self.input.shape[1:]

    @property
    def num_classes(self) -> int | None:
        """Classes of a cross-entropy model (the logits' last dimension)."""
        if self.loss != "cross_entropy" or not self.output.shape:
            return None
        return self.output.shape[-1]

    @property
    def trainable_params(self) -> tuple[str, ...]:
        return tuple(self.manifest.get("trainable_params") or ())

    @property
    def preprocess(self) -> dict:
        return dict(self.manifest.get("preprocess") or {})

    @property
    def identity(self) -> str:
        """What a training checkpoint records to refuse being loaded into other artifacts."""
        digests = self.manifest.get("file_digests") or {}
        key = "step_model" if self.backend == BACKEND_ONNX else "training_model"
        return str(digests.get(self.manifest["files"][key], ""))


def open_artifacts(directory: str | Path, *, verify: bool = True) -> Artifacts:
    """Read and check an artifact directory; ``verify`` also checks the file digests."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"no compiled artifacts at {directory} (compile a model there with `gfc compile`)")
    if not (directory / MANIFEST_NAME).is_file():
        raise ArtifactError(f"{directory} has no {MANIFEST_NAME}: not a gfcompiler artifact directory")
    try:
        manifest = read_manifest(directory)
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{directory / MANIFEST_NAME} is unreadable or corrupted ({error})") from None
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


def _parse(directory: Path, manifest: dict) -> Artifacts:
    where = directory / MANIFEST_NAME
    try:
        inputs = [TensorSpec.from_manifest(e) for e in manifest["inputs"]]
        outputs = [TensorSpec.from_manifest(e) for e in manifest["outputs"]]
        label = TensorSpec.from_manifest(manifest["label"])
        loss = str(manifest["loss"])
        lr_multiplier = float((manifest.get("optimizer") or {}).get("lr_multiplier", 1.0))
        files = manifest["files"]
        backend = manifest_backend(manifest)
        form = manifest.get("form", "single_graph")
        required = _required_files(backend, form)
        missing_keys = [key for key in required if key not in files]
        boundary = tuple(BoundaryTensor(str(b["name"]), bool(b.get("from_input"))) for b in manifest.get("boundary") or ())
        step = StepSpec.from_manifest(manifest["step"]) if backend == BACKEND_ONNX else None
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ArtifactError(f"{where} is corrupted or incomplete (bad or missing key {error})") from None
    if backend not in BACKENDS:
        raise ArtifactError(f"{where} names backend {backend!r}; this runtime knows {', '.join(BACKENDS)}")
    if missing_keys:
        raise ArtifactError(f"{where} names no file for {', '.join(missing_keys)}")
    forms = ("step_model",) if backend == BACKEND_ONNX else ("single_graph", "two_stage")
    if form not in forms or (form == "two_stage") != bool(boundary):
        raise ArtifactError(f"{where} is corrupted: form {form!r} with {len(boundary)} boundary tensor(s)")
    if step is not None:
        _check_step(where, step)
    if len(inputs) != 1:
        raise ArtifactError(f"{where} lists {len(inputs)} data inputs; the runtime trains models with exactly one")
    if not outputs:
        raise ArtifactError(f"{where} lists no model output")
    if loss not in LOSSES:
        raise ArtifactError(f"{where} names loss {loss!r}; this runtime knows {', '.join(LOSSES)}")
    if any(b.from_input and b.name != inputs[0].name for b in boundary):
        raise ArtifactError(f"{where} is corrupted: a boundary tensor marked from_input is not the data input")
    return Artifacts(directory, manifest, inputs[0], outputs[0], label, loss, lr_multiplier, boundary, backend, step)


def _required_files(backend: str, form: str) -> dict:
    if backend == BACKEND_ONNX:
        return STEP_FILES
    return {**FILES, **(TWO_STAGE_FILES if form == "two_stage" else {})}


def _check_step(where: Path, step: StepSpec) -> None:
    """The step section names each state tensor once, every one with a known kind."""
    names = [s.name for s in step.state]
    if not step.parameters:
        raise ArtifactError(f"{where} is corrupted: the step model updates no trainable parameter")
    if len(set(names)) != len(names) or len({s.updated for s in step.state}) != len(names):
        raise ArtifactError(f"{where} is corrupted: a state tensor of the step model is listed twice")
    bad = [s.name for s in step.state if s.kind not in ("parameter", "optimizer")]
    if bad:
        raise ArtifactError(f"{where} is corrupted: state tensor {bad[0]!r} has an unknown kind")


def _check_files(artifacts: Artifacts, verify: bool) -> None:
    paths = [artifacts.directory / name for name in artifacts.manifest["files"].values()]
    for path in paths:
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: the artifact directory is incomplete, recompile the model")
    if not verify:
        return
    digests = artifacts.manifest.get("file_digests") or {}
    for path in paths:
        expected = digests.get(path.name)
        if expected and sha256_file(path) != expected:
            raise ArtifactError(
                f"{path} does not match the sha256 in {MANIFEST_NAME} "
                "(edited by hand or corrupted): recompile the model"
            )
