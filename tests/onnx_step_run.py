"""Running a ``--backend onnx`` step model directly, for gradient checks.

Artifacts compiled with ``CompileOptions(gradient_outputs=True)`` output each trainable
parameter's gradient as ``<param>.grad``; `step_gradients` runs one step on a batch and
returns (loss, gradients, parameter values before the step).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from gfcompiler.manifest import read_manifest


def step_feeds(directory: Path, x: np.ndarray, labels: np.ndarray, lr: float = 0.0, step: int = 1) -> dict:
    manifest = read_manifest(directory)
    state = dict(np.load(directory / manifest["files"]["state"], allow_pickle=False))
    feeds = {manifest["inputs"][0]["name"]: x, manifest["label"]["name"]: labels,
             manifest["step"]["learning_rate"]: np.array(lr, np.float32), manifest["step"]["step"]: np.array(step, np.float32)}
    feeds.update(state)
    return feeds


def step_gradients(directory: Path, x: np.ndarray, labels: np.ndarray):
    directory = Path(directory)
    manifest = read_manifest(directory)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(directory / manifest["files"]["step_model"]), options,
                                   providers=["CPUExecutionProvider"])
    feeds = step_feeds(directory, x, labels)
    params = manifest["trainable_params"]
    outputs = session.run(["loss"] + [f"{name}.grad" for name in params], feeds)
    grads = dict(zip(params, outputs[1:]))
    return float(outputs[0]), grads, {name: feeds[name] for name in params}
