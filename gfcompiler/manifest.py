"""The artifact directory's layout and its manifest (``manifest.json``).

A compiled directory holds::

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

Manifest keys the runtime relies on (all others are informational)::

    format               int, must equal gfcompiler.ARTIFACT_FORMAT
    gfcompiler_version   str
    files                {"training_model", "eval_model", "optimizer_model", "checkpoint"}: file names
    inputs               [{"name", "shape": [int|null,...], "dtype"}]  model inputs (data)
    outputs              [{"name", "shape", "dtype"}]                   model outputs (logits)
    label                {"name", "shape", "dtype"}                     the eval/training label input
    loss                 "cross_entropy" | "mse" | "bce" | "l1"
    optimizer            {"name": "adamw"|"sgd", "momentum", "weight_decay",
                          "lr_multiplier": float}   runtime lr = user lr * lr_multiplier
    patch                int, 0 = exact backward
    trainable_params     [str]   parameter names in the checkpoint
    preprocess           {"resize": [H, W] | null, "mean": [...] | null, "std": [...] | null,
                          "scale": float}  how raw images become model input (may be null)
    file_digests         {file name: sha256}  to detect artifacts edited by hand
    form                 "two_stage" | "single_graph" (absent in format 1: single_graph)
    boundary             [{"name", "shape", "dtype", "from_input": bool}]  two-stage only: the
                         suffix's data inputs in order; ``from_input`` ones are the data input
                         itself, the others are outputs of the prefix model

Only the standard library is imported: the runtime reads manifests too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST_NAME = "manifest.json"
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
BACKEND_ORT_TRAINING = "ort-training"
BACKEND_ONNX = "onnx"
BACKENDS = (BACKEND_ONNX, BACKEND_ORT_TRAINING)


def manifest_backend(manifest: dict) -> str:
    """The backend a manifest was compiled for; formats 1 and 2 (no ``backend`` key) are ort-training."""
    return str(manifest.get("backend") or BACKEND_ORT_TRAINING)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, manifest: dict) -> None:
    (Path(directory) / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(directory: Path) -> dict:
    """Read ``manifest.json``; raises OSError / ValueError (callers turn these into ArtifactError)."""
    return json.loads((Path(directory) / MANIFEST_NAME).read_text())
