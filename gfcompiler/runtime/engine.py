"""The backend engines behind `gfcompiler.runtime.Trainer`.

An engine owns the onnxruntime sessions and the training state of one backend:

* ``ort-training`` (gfcompiler.runtime.ort_engine): onnxruntime-training's Module,
  Optimizer and CheckpointState; every format 1 and 2 artifact directory;
* ``onnx`` (gfcompiler.runtime.onnx_engine): one plain ONNX step model run by a stock
  onnxruntime InferenceSession, the state kept on the device between steps.

The Trainer does the rest for both: input checks, the frozen prefix of two-stage
artifacts, the learning-rate multiplier, NaN detection, evaluation loops, export checks.
Each engine has this interface:

    checkpoint_path                the checkpoint it started from
    checkpoint_suffix              file suffix of its checkpoints ("" or ".npz")
    eval_has_outputs               whether the eval model returns the model output
    set_learning_rate(lr)          the optimizer's learning rate for the next steps
    train(feeds) -> (loss, out)    forward and backward (and update) on the data
                                   inputs ``feeds`` (name -> array or OrtValue), not yet
                                   applied; ``out`` is None when the model does not return it
    apply() / discard()            adopt / drop what the last ``train`` computed
    evaluate(feeds) -> (loss, out) the eval model on the current parameters
    parameters() -> {name: array}  copies of the parameters
    load_parameters({name: array}) replace those parameters (names, shapes, dtypes
                                   checked by the Trainer); the optimizer state stays
    save_checkpoint(path)          the whole training state at ``path`` (OSError,
                                   RuntimeError pass to the caller)
    write_inference_model(path)    the whole model with the current weights (unchecked)
"""

from __future__ import annotations

from pathlib import Path

from gfcompiler.manifest import BACKEND_ONNX
from gfcompiler.runtime.artifacts import Artifacts
from gfcompiler.runtime.device import Device


def create_engine(artifacts: Artifacts, device: Device, options, checkpoint: Path | None = None):
    """The engine of ``artifacts``' backend, started from ``checkpoint`` (default: the compiled state)."""
    if artifacts.backend == BACKEND_ONNX:
        from gfcompiler.runtime.onnx_engine import OnnxStepEngine

        return OnnxStepEngine(artifacts, device, options, checkpoint)
    from gfcompiler.runtime.ort_engine import OrtTrainingEngine

    return OrtTrainingEngine(artifacts, device, options, checkpoint)
