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

Manifest keys the runtime relies on (all others are informational)::

    format               int, one of gfcompiler.READABLE_ARTIFACT_FORMATS (written: ARTIFACT_FORMAT)
    backend              "ort-training" | "onnx" (format 3; absent: "ort-training")
    gfcompiler_version   str
    files                {key: file name}: FILES (+ TWO_STAGE_FILES) for ort-training,
                         STEP_FILES for onnx
    inputs               [{"name", "shape": [int|null,...], "dtype"}]  model inputs (data)
    outputs              [{"name", "shape", "dtype"}]                   model outputs (logits)
    label                {"name", "shape", "dtype"}                     the eval/training label input
    loss                 "cross_entropy" | "mse" | "bce" | "l1"
    optimizer            {"name": "adamw"|"sgd", "momentum", "weight_decay",
                          "lr_multiplier": float}   runtime lr = user lr * lr_multiplier
                          (1.0 for the onnx backend: the step takes torch's learning rate)
    patch                int, 0 = exact backward
    trainable_params     [str]   parameter names in the checkpoint
    preprocess           {"resize": [H, W] | null, "mean": [...] | null, "std": [...] | null,
                          "scale": float}  how raw images become model input (may be null)
    file_digests         {file name: sha256}  to detect artifacts edited by hand
    form                 "two_stage" | "single_graph" (ort-training; absent in format 1:
                         single_graph) | "step_model" (onnx)
    boundary             [{"name", "shape", "dtype", "from_input": bool}]  two-stage only: the
                         suffix's data inputs in order; ``from_input`` ones are the data input
                         itself, the others are outputs of the prefix model
    step                 onnx only: {"learning_rate": input name, "step": input name,
                         "loss": output name, "output": model output name,
                         "state": [{"name": input, "updated": output,
                                    "kind": "parameter" | "optimizer", "param": its parameter}]}

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
