"""The artifact directory's layout and its manifest (``manifest.json``).

Artifacts come for one of two backends (manifest key ``backend``, absent before format
3 and then "ort-training").

``ort-training`` (onnxruntime-training 1.19.2's Module / Optimizer)::

    manifest.json          what was done (this module's schema)
    training_model.onnx    forward + loss + gradient graph (onnxruntime-training)
    eval_model.onnx        forward + loss, inference statistics
    optimizer_model.onnx   the optimizer step
    checkpoint             trainable parameters (and later optimizer state)

Two-stage artifacts (the default, see gfcompiler.split) add::

    prefix_model.onnx      the frozen prefix: an inference model, data input -> boundary tensors
    export_model.onnx      the whole forward with the trainable parameters as inputs (for export)

and their training/eval models are the trained suffix, whose data inputs are the
boundary tensors.

``onnx`` (``--backend onnx``: plain ONNX models for any stock onnxruntime, form
"step_model")::

    step_model.onnx        one training step: inputs data, label, learning_rate (float32 []),
                           step (float32 [], the 1-based index of the step taken), then every
                           state tensor (trainable parameters, then optimizer slots such as
                           <param>.exp_avg); outputs loss (float32 []), the model output, and
                           the updated value of every state tensor
    eval_model.onnx        inputs data, label and the trainable parameters; outputs loss and
                           the model output
    export_model.onnx      the whole forward with the trainable parameters removed (dangling
                           references); the runtime appends them as initializers
    initial_state.npz      the initial value of every state tensor (name -> array)

Manifest keys (`Manifest` and the records below are the one definition; the runtime
relies on the first group, the rest is informational)::

    format               int, one of READABLE_FORMATS (written: FORMAT)
    backend              "ort-training" | "onnx" (format 3; absent: "ort-training")
    gfcompiler_version   str
    files                {key: file name}: FILES (+ TWO_STAGE_FILES) for ort-training,
                         STEP_FILES for onnx
    inputs               [{"name", "shape": [int|null,...], "dtype"}]  model inputs (data)
    outputs              [{"name", "shape", "dtype"}]                   model outputs (logits)
    label                {"name", "shape", "dtype"}                     the eval/training label input
    loss                 one of LOSSES
    optimizer            {"name": "adamw"|"sgd", "weight_decay", "lr_multiplier": float,
                          "momentum" (sgd), "implementation"}   runtime lr = user lr * lr_multiplier
                          (1.0 for the onnx backend: the step takes torch's learning rate)
    trainable_params     [str]   parameter names in the checkpoint
    preprocess           {"resize": [H, W] | null, "mean": [...] | null, "std": [...] | null,
                          "scale": float}  how raw images become model input (may be null)
    file_digests         {file name: sha256}  to detect artifacts edited by hand
    form                 "two_stage" | "single_graph" (ort-training; absent in format 1:
                         single_graph) | "step_model" (onnx)
    single_graph_reason  single_graph only: why the model was not cut
    boundary             [{"name", "shape", "dtype", "from_input": bool}]  two-stage only: the
                         suffix's data inputs in order; ``from_input`` ones are the data input
                         itself, the others are outputs of the prefix model
    prefix_nodes, suffix_nodes   two-stage only: node counts of the two graphs
    step                 onnx only: {"learning_rate": input name, "step": input name,
                         "loss": output name, "output": model output name,
                         "state": [{"name": input, "updated": output,
                                    "kind": "parameter" | "optimizer", "param": its parameter}]}
    task                 "classification" (default, not written) | "segmentation"
    ignore_index         int, label value the loss ignores (written only when set)
    loss_form            one line describing the loss as compiled (written only when set)

    created, source_model {"path", "sha256"}, patch (0 = exact backward), selection
    {"rule", "trained_convs"}, accounting_batch, totals, layers (one `LayerRecord` per
    conv), notes ([str], what the compiler changed that the user should know, e.g. a
    stripped output Softmax; written only when non-empty): informational.

Reading tolerates keys it does not know; missing informational keys read as None.
Only the standard library is imported: the runtime reads manifests too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gfcompiler import ARTIFACT_FORMAT, READABLE_ARTIFACT_FORMATS

MANIFEST_NAME = "manifest.json"
FORMAT = ARTIFACT_FORMAT  # written
READABLE_FORMATS = READABLE_ARTIFACT_FORMATS
FILES = {
    "training_model": "training_model.onnx",
    "eval_model": "eval_model.onnx",
    "optimizer_model": "optimizer_model.onnx",
    "checkpoint": "checkpoint",
}
TWO_STAGE_FILES = {
    "prefix_model": "prefix_model.onnx",
    "export_model": "export_model.onnx",
}
# ``--backend onnx``: the files of a step-model directory (manifest "form": "step_model").
STEP_FILES = {
    "step_model": "step_model.onnx",
    "eval_model": "eval_model.onnx",
    "export_model": "export_model.onnx",
    "state": "initial_state.npz",
}
# Names the compiler writes into the models and the runtime reads back (the runtime cannot import the compiler).
CLASS_MAP_OUTPUT = "classes"  # the export model's per-pixel class map (segmentation), N×H×W int64
IN_PLACE_KEY = "gfc.step.in_place"  # step-model metadata: its state may be updated in place ...
IN_PLACE_VALUE = "guarded"  # ... because every state write is ordered after every read
BACKEND_ORT_TRAINING = "ort-training"
BACKEND_ONNX = "onnx"
BACKENDS = (BACKEND_ONNX, BACKEND_ORT_TRAINING)
LOSSES = ("cross_entropy", "mse", "bce", "l1")
TASKS = ("classification", "segmentation")
FORMS = ("single_graph", "two_stage", "step_model")
STATE_KINDS = ("parameter", "optimizer")
# ONNX element-type names (onnx_ir DataType names, onnxruntime's "tensor(float)") whose
# manifest name is numpy's; every other type keeps its lower-case ONNX name.
_DTYPE_NAMES = {"float": "float32", "double": "float64"}


class ManifestError(ValueError):
    """A manifest that is not valid JSON for this schema (readers turn it into ArtifactError)."""


def dtype_name(onnx_name: str) -> str:
    """The manifest's name for an ONNX element type: "FLOAT" / "tensor(float)" -> "float32", "INT64" -> "int64"."""
    name = onnx_name.lower()
    if name.startswith("tensor(") and name.endswith(")"):
        name = name[len("tensor("):-1]
    return _DTYPE_NAMES.get(name, name)


def _object(data: Any, what: str) -> Mapping:
    if not isinstance(data, Mapping):
        raise ManifestError(f"{what} is not a JSON object")
    return data


def _dims(data: Any) -> tuple[int | None, ...] | None:
    """A JSON shape: ints stay, anything else (null, a symbolic name) is a dynamic dimension."""
    if data is None:
        return None
    return tuple(d if isinstance(d, int) and not isinstance(d, bool) else None for d in data)


def _list(data: tuple | None) -> list | None:
    return None if data is None else list(data)


def _optional(data: Any, kind: type) -> Any:
    return None if data is None else kind(data)


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    """A graph input or output (name, shape with None for a dynamic dimension, dtype name).

    Boundary tensors of two-stage artifacts also say ``from_input``: the data input
    itself, fed to the suffix directly (otherwise an output of the prefix model).
    """

    name: str
    shape: tuple[int | None, ...] | None
    dtype: str | None
    from_input: bool | None = None  # boundary tensors only

    def to_json(self) -> dict:
        record = {"name": self.name, "shape": _list(self.shape), "dtype": self.dtype}
        if self.from_input is not None:
            record["from_input"] = self.from_input
        return record

    @classmethod
    def from_json(cls, data: Any) -> TensorRecord:
        data = _object(data, "a tensor record")
        from_input = bool(data["from_input"]) if "from_input" in data else None
        return cls(str(data["name"]), _dims(data.get("shape")), _optional(data.get("dtype"), str), from_input)

    @classmethod
    def of_value(cls, value: Any, from_input: bool | None = None, unknown_dtype: str | None = None) -> TensorRecord:
        """The record of a graph value (an onnx_ir ``Value``, read by its attributes: this module imports
        no onnx): non-integer dims are dynamic (None); ``unknown_dtype`` stands for a missing element type."""
        shape = None if value.shape is None else tuple(d if isinstance(d, int) else None for d in value.shape)
        dtype = dtype_name(value.dtype.name) if value.dtype is not None else unknown_dtype
        return cls(value.name, shape, dtype, from_input)

    def describe(self) -> str:
        """``N×3×32×32 float32``."""
        return "×".join("N" if d is None else str(d) for d in self.shape or ()) + f" {self.dtype}"


@dataclasses.dataclass(frozen=True)
class OptimizerRecord:
    """The optimizer as compiled; the runtime multiplies the user's learning rate by ``lr_multiplier``."""

    name: str
    weight_decay: float | None = None
    lr_multiplier: float = 1.0
    momentum: float | None = None  # sgd only
    implementation: str | None = None  # how the update is computed, when it is not the obvious kernel

    def to_json(self) -> dict:
        record = {"name": self.name, "weight_decay": self.weight_decay, "lr_multiplier": self.lr_multiplier}
        if self.momentum is not None:
            record["momentum"] = self.momentum
        if self.implementation is not None:
            record["implementation"] = self.implementation
        return record

    @classmethod
    def from_json(cls, data: Any) -> OptimizerRecord:
        data = _object(data, "optimizer")
        return cls(str(data.get("name", "")), _optional(data.get("weight_decay"), float),
                   float(data.get("lr_multiplier", 1.0)), _optional(data.get("momentum"), float),
                   _optional(data.get("implementation"), str))


@dataclasses.dataclass(frozen=True)
class StateRecord:
    """A tensor the step model carries from step to step: input ``name``, output ``updated``.

    ``kind`` is "parameter" (a trainable parameter; ``param`` is its own name) or
    "optimizer" (a slot such as ``<param>.exp_avg`` of parameter ``param``).
    """

    name: str
    updated: str
    kind: str
    param: str

    def to_json(self) -> dict:
        return {"name": self.name, "updated": self.updated, "kind": self.kind, "param": self.param}

    @classmethod
    def from_json(cls, data: Any) -> StateRecord:
        data = _object(data, "a state record")
        return cls(str(data["name"]), str(data["updated"]), str(data["kind"]), str(data.get("param") or data["name"]))


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """The step model's interface (``--backend onnx`` only)."""

    learning_rate: str
    step: str
    loss: str
    output: str
    state: tuple[StateRecord, ...]

    @property
    def parameters(self) -> tuple[StateRecord, ...]:
        return tuple(s for s in self.state if s.kind == "parameter")

    def to_json(self) -> dict:
        return {"learning_rate": self.learning_rate, "step": self.step, "loss": self.loss, "output": self.output,
                "state": [s.to_json() for s in self.state]}

    @classmethod
    def from_json(cls, data: Any) -> StepRecord:
        data = _object(data, "step")
        return cls(str(data["learning_rate"]), str(data["step"]), str(data["loss"]), str(data["output"]),
                   tuple(StateRecord.from_json(s) for s in data["state"]))


@dataclasses.dataclass(frozen=True)
class Form:
    """How the artifacts run: one training graph, a frozen prefix + trained suffix, or one step model."""

    kind: str  # one of FORMS
    single_graph_reason: str | None = None
    boundary: tuple[TensorRecord, ...] = ()  # two_stage: the suffix's data inputs, in order
    prefix_nodes: int | None = None
    suffix_nodes: int | None = None
    step: StepRecord | None = None  # step_model

    def to_json(self) -> dict:
        """The manifest's form keys (they sit at the manifest's top level)."""
        if self.kind == "two_stage":
            return {"form": self.kind, "boundary": [b.to_json() for b in self.boundary],
                    "prefix_nodes": self.prefix_nodes, "suffix_nodes": self.suffix_nodes}
        if self.kind == "step_model":
            return {"form": self.kind, "step": None if self.step is None else self.step.to_json()}
        return {"form": self.kind, "single_graph_reason": self.single_graph_reason}

    @classmethod
    def from_json(cls, data: Mapping) -> Form:
        """From the whole manifest; format 1 has no ``form`` (single_graph)."""
        step = data.get("step")
        return cls(str(data.get("form") or "single_graph"), _optional(data.get("single_graph_reason"), str),
                   tuple(TensorRecord.from_json(b) for b in data.get("boundary") or ()),
                   _optional(data.get("prefix_nodes"), int), _optional(data.get("suffix_nodes"), int),
                   None if step is None else StepRecord.from_json(step))


@dataclasses.dataclass(frozen=True)
class PreprocessRecord:
    """How raw images (0–255) become model input: resize, ``* scale``, ``(x - mean) / std``."""

    resize: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float | None = None

    def to_json(self) -> dict:
        return {"resize": _list(self.resize), "mean": _list(self.mean), "std": _list(self.std), "scale": self.scale}

    @classmethod
    def from_json(cls, data: Any) -> PreprocessRecord:
        data = _object(data, "preprocess")

        def numbers(key: str, kind: type) -> tuple | None:
            return None if data.get(key) is None else tuple(kind(v) for v in data[key])

        return cls(numbers("resize", int), numbers("mean", float), numbers("std", float),
                   _optional(data.get("scale"), float))


@dataclasses.dataclass(frozen=True)
class SourceModel:
    path: str
    sha256: str

    def to_json(self) -> dict:
        return {"path": self.path, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: Any) -> SourceModel:
        data = _object(data, "source_model")
        return cls(str(data.get("path", "")), str(data.get("sha256", "")))


@dataclasses.dataclass(frozen=True)
class SelectionRecord:
    """The layer-selection rule as given and the convs it chose to train."""

    rule: str
    trained_convs: tuple[str, ...]

    def to_json(self) -> dict:
        return {"rule": self.rule, "trained_convs": list(self.trained_convs)}

    @classmethod
    def from_json(cls, data: Any) -> SelectionRecord:
        data = _object(data, "selection")
        return cls(str(data.get("rule", "")), tuple(str(c) for c in data.get("trained_convs") or ()))


@dataclasses.dataclass(frozen=True)
class ConvGeometryRecord:
    """A conv's static geometry (absent from a layer record when the shapes are unknown)."""

    input_shape: tuple[int | None, ...]  # N×C×H×W, None: a dynamic batch
    output_shape: tuple[int | None, ...]
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]
    group: int

    def to_json(self) -> dict:
        return {"input_shape": list(self.input_shape), "output_shape": list(self.output_shape),
                "kernel": list(self.kernel), "strides": list(self.strides), "pads": list(self.pads),
                "dilations": list(self.dilations), "group": self.group}

    @classmethod
    def from_json(cls, data: Mapping) -> ConvGeometryRecord | None:
        """From a layer record; None when it has no geometry."""
        if "kernel" not in data:
            return None
        return cls(*(tuple(data[key]) for key in ("input_shape", "output_shape", "kernel", "strides", "pads",
                                                   "dilations")), int(data["group"]))


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """One conv of the model: trained or frozen, its backward (exact/filtered), MACs and bytes held.

    Frozen layers have only ``name``, ``trained``, the geometry and ``backward`` ("none
    (frozen)"). Trained ones add ``needs_input_grad``; ``reason`` (why not filtered) when
    ``backward`` is "exact"; MACs (and ``patches`` when filtered) when the geometry is
    known; and the bytes held from forward to backward (None when unknown).
    """

    name: str
    trained: bool
    backward: str  # "filtered" | "exact" | "none (frozen)"
    geometry: ConvGeometryRecord | None = None
    needs_input_grad: bool | None = None
    reason: str | None = None
    backward_macs_exact: int | None = None
    backward_macs: int | None = None
    patches: tuple[int, ...] | None = None
    held_bytes_exact: int | None = None
    held_bytes: int | None = None
    held_tensors: tuple[str, ...] = ()

    def to_json(self) -> dict:
        record: dict = {"name": self.name, "trained": self.trained}
        if self.geometry is not None:
            record.update(self.geometry.to_json())
        if not self.trained:
            record["backward"] = self.backward
            return record
        record["needs_input_grad"] = self.needs_input_grad
        record["backward"] = self.backward
        if self.backward == "exact":
            record["reason"] = self.reason
        if self.backward_macs_exact is not None:
            record["backward_macs_exact"] = self.backward_macs_exact
            record["backward_macs"] = self.backward_macs
        if self.patches is not None:
            record["patches"] = list(self.patches)
        record.update(held_bytes_exact=self.held_bytes_exact, held_bytes=self.held_bytes,
                      held_tensors=list(self.held_tensors))
        return record

    @classmethod
    def from_json(cls, data: Any) -> LayerRecord:
        data = _object(data, "a layer record")
        patches = data.get("patches")
        return cls(str(data["name"]), bool(data["trained"]), str(data.get("backward", "")),
                   ConvGeometryRecord.from_json(data), _optional(data.get("needs_input_grad"), bool),
                   _optional(data.get("reason"), str), _optional(data.get("backward_macs_exact"), int),
                   _optional(data.get("backward_macs"), int), None if patches is None else tuple(patches),
                   _optional(data.get("held_bytes_exact"), int), _optional(data.get("held_bytes"), int),
                   tuple(data.get("held_tensors") or ()))


@dataclasses.dataclass(frozen=True)
class Totals:
    """Sums over the trained convs, and the whole training graph's bytes held for backward."""

    filtered_layers: int
    trained_layers: int
    backward_macs_exact: int
    backward_macs: int
    held_bytes_exact: int | None  # whole training graph (ReLU gradients etc. included)
    held_bytes: int | None
    trained_convs_held_bytes_exact: int | None = None  # the trained convs' backward alone
    trained_convs_held_bytes: int | None = None
    held_bytes_unknown: tuple[str, ...] = ()  # held tensors of unknown size (not counted)

    @classmethod
    def of_layers(cls, layers: list[LayerRecord], held_bytes_exact: int, held_bytes: int,
                  held_bytes_unknown: list[str]) -> Totals:
        """The totals of ``layers`` (their trained ones) with the whole graph's held bytes."""
        trained = [layer for layer in layers if layer.trained]
        return cls(
            filtered_layers=sum(1 for layer in trained if layer.backward == "filtered"),
            trained_layers=len(trained),
            backward_macs_exact=sum(layer.backward_macs_exact or 0 for layer in trained),
            backward_macs=sum(layer.backward_macs or 0 for layer in trained),
            held_bytes_exact=held_bytes_exact,
            held_bytes=held_bytes,
            trained_convs_held_bytes_exact=sum(layer.held_bytes_exact or 0 for layer in trained),
            trained_convs_held_bytes=sum(layer.held_bytes or 0 for layer in trained),
            held_bytes_unknown=tuple(held_bytes_unknown),
        )

    def to_json(self) -> dict:
        record = dataclasses.asdict(self)
        record["held_bytes_unknown"] = list(self.held_bytes_unknown)
        return record

    @classmethod
    def from_json(cls, data: Any) -> Totals:
        data = _object(data, "totals")
        return cls(*(int(data.get(key) or 0) for key in ("filtered_layers", "trained_layers", "backward_macs_exact",
                                                          "backward_macs")),
                   *(_optional(data.get(key), int) for key in ("held_bytes_exact", "held_bytes",
                                                               "trained_convs_held_bytes_exact",
                                                               "trained_convs_held_bytes")),
                   tuple(data.get("held_bytes_unknown") or ()))


@dataclasses.dataclass(frozen=True)
class Manifest:
    """``manifest.json``: what the compiler did and what the runtime needs (see the module docstring).

    `to_json` writes the format this gfcompiler writes (FORMAT) with the keys in a fixed
    order; `from_json` reads every format in READABLE_FORMATS and ignores unknown keys.
    """

    format: int
    backend: str
    files: dict[str, str]
    form: Form
    inputs: tuple[TensorRecord, ...]
    outputs: tuple[TensorRecord, ...]
    label: TensorRecord | None
    loss: str
    optimizer: OptimizerRecord | None
    trainable_params: tuple[str, ...]
    gfcompiler_version: str | None = None
    created: str | None = None
    source_model: SourceModel | None = None
    patch: int | None = None
    selection: SelectionRecord | None = None
    preprocess: PreprocessRecord | None = None
    accounting_batch: int | None = None
    totals: Totals | None = None
    layers: tuple[LayerRecord, ...] = ()
    file_digests: dict[str, str] = dataclasses.field(default_factory=dict)
    task: str = "classification"  # one of TASKS
    ignore_index: int | None = None  # label value the loss ignores
    loss_form: str | None = None  # one line: the loss as compiled
    notes: tuple[str, ...] = ()  # what the compiler changed that the user should know

    @property
    def boundary(self) -> tuple[TensorRecord, ...]:
        """Two-stage artifacts: the tensors crossing from the prefix into the suffix (else empty)."""
        return self.form.boundary

    @property
    def step(self) -> StepRecord | None:
        return self.form.step

    @property
    def lr_multiplier(self) -> float:
        return self.optimizer.lr_multiplier if self.optimizer is not None else 1.0

    def __getitem__(self, key: str) -> Any:
        """The JSON value of top-level ``key`` as written (``manifest["patch"]``); prefer the attributes."""
        return self.to_json()[key]

    def to_json(self) -> dict:
        """The JSON object written to ``manifest.json``."""
        record = {
            "format": self.format,
            "backend": self.backend,
            "gfcompiler_version": self.gfcompiler_version,
            "created": self.created,
            "source_model": None if self.source_model is None else self.source_model.to_json(),
            "files": dict(self.files),
            **self.form.to_json(),
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "label": None if self.label is None else self.label.to_json(),
            "loss": self.loss,
        }
        if self.task != "classification":
            record["task"] = self.task
        if self.ignore_index is not None:
            record["ignore_index"] = self.ignore_index
        if self.loss_form is not None:
            record["loss_form"] = self.loss_form
        record.update({
            "optimizer": None if self.optimizer is None else self.optimizer.to_json(),
            "patch": self.patch,
            "selection": None if self.selection is None else self.selection.to_json(),
            "trainable_params": list(self.trainable_params),
            "preprocess": None if self.preprocess is None else self.preprocess.to_json(),
            "accounting_batch": self.accounting_batch,
            "totals": None if self.totals is None else self.totals.to_json(),
            "layers": [layer.to_json() for layer in self.layers],
        })
        if self.notes:
            record["notes"] = list(self.notes)
        record["file_digests"] = dict(self.file_digests)
        return record

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Read a manifest of any readable format; raises ManifestError, KeyError, TypeError or ValueError."""
        data = _object(data, "the manifest")
        found = data.get("format")
        if found not in READABLE_FORMATS:
            raise ManifestError(f"format {found!r} (readable: {', '.join(map(str, READABLE_FORMATS))})")

        def record(key: str, kind: type) -> Any:
            return None if data.get(key) is None else kind.from_json(data[key])

        return cls(
            format=found,
            backend=str(data.get("backend") or BACKEND_ORT_TRAINING),
            files={str(k): str(v) for k, v in _object(data["files"], "files").items()},
            form=Form.from_json(data),
            inputs=tuple(TensorRecord.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorRecord.from_json(t) for t in data["outputs"]),
            label=record("label", TensorRecord),
            loss=str(data["loss"]),
            optimizer=record("optimizer", OptimizerRecord),
            trainable_params=tuple(str(p) for p in data.get("trainable_params") or ()),
            gfcompiler_version=_optional(data.get("gfcompiler_version"), str),
            created=_optional(data.get("created"), str),
            source_model=record("source_model", SourceModel),
            patch=_optional(data.get("patch"), int),
            selection=record("selection", SelectionRecord),
            preprocess=record("preprocess", PreprocessRecord),
            accounting_batch=_optional(data.get("accounting_batch"), int),
            totals=record("totals", Totals),
            layers=tuple(LayerRecord.from_json(layer) for layer in data.get("layers") or ()),
            file_digests={str(k): str(v) for k, v in _object(data.get("file_digests") or {}, "file_digests").items()},
            task=str(data.get("task") or "classification"),
            ignore_index=_optional(data.get("ignore_index"), int),
            loss_form=_optional(data.get("loss_form"), str),
            notes=tuple(str(n) for n in data.get("notes") or ()),
        )

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        """Read ``directory``'s manifest.json; raises OSError, ValueError (ManifestError) or KeyError/TypeError."""
        return cls.from_json(read_manifest(directory))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, manifest: dict) -> None:
    (Path(directory) / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(directory: Path) -> dict:
    """Read ``manifest.json`` as JSON; raises OSError / ValueError (callers turn these into ArtifactError)."""
    return json.loads((Path(directory) / MANIFEST_NAME).read_text())
