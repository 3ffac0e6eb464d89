"""Opening a compiled artifact directory and checking that it is whole and ours.

`open_artifacts` reads ``manifest.json`` (schema: gfcompiler.manifest), refuses a format
this gfcompiler does not read, checks that every file is there and still has the sha256
the compiler recorded, and returns an `Artifacts` with the few facts the runtime uses
(input, output and label specs, loss, learning-rate multiplier). Every problem is an
ArtifactError with a one-line message.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gfcompiler import ARTIFACT_FORMAT, __version__
from gfcompiler.errors import ArtifactError
from gfcompiler.manifest import FILES, MANIFEST_NAME, read_manifest, sha256_file

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
class Artifacts:
    """A verified artifact directory."""

    directory: Path
    manifest: dict
    input: TensorSpec
    output: TensorSpec
    label: TensorSpec
    loss: str
    lr_multiplier: float

    def path(self, key: str) -> Path:
        """The path of one of the files in gfcompiler.manifest.FILES."""
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
        return str(digests.get(self.manifest["files"]["training_model"], ""))


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
    if found != ARTIFACT_FORMAT:
        made_by = manifest.get("gfcompiler_version", "an unknown version")
        raise ArtifactError(
            f"{directory} holds artifacts in format {found} (made by gfcompiler {made_by}); "
            f"gfcompiler {__version__} reads format {ARTIFACT_FORMAT}: recompile the model"
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
        missing_keys = [key for key in FILES if key not in files]
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ArtifactError(f"{where} is corrupted or incomplete (bad or missing key {error})") from None
    if missing_keys:
        raise ArtifactError(f"{where} names no file for {', '.join(missing_keys)}")
    if len(inputs) != 1:
        raise ArtifactError(f"{where} lists {len(inputs)} data inputs; the runtime trains models with exactly one")
    if not outputs:
        raise ArtifactError(f"{where} lists no model output")
    if loss not in LOSSES:
        raise ArtifactError(f"{where} names loss {loss!r}; this runtime knows {', '.join(LOSSES)}")
    return Artifacts(directory, manifest, inputs[0], outputs[0], label, loss, lr_multiplier)


def _check_files(artifacts: Artifacts, verify: bool) -> None:
    paths = [artifacts.path(key) for key in FILES]
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
