"""Import onnxruntime (training build) without dragging in torch and onnx.

``import onnxruntime`` from the training build runs a build check that does
``from onnxruntime.training.ortmodule import ORTModule``, which executes the
``onnxruntime.training`` package ``__init__`` (imports onnx, torch and the torch-only
helpers). Where torch is installed that costs about 2.5 s and 250 MB of resident memory
in every ``gfc train`` process (and would blur the peak-memory numbers of the demo);
where torch is absent the check fails quietly and costs nothing.

`onnxruntime()` registers the bare ``onnxruntime.training`` package of
`gfcompiler.ort_training` *before* onnxruntime is imported, and marks ORTModule as
absent for the duration of that import only, so the check concludes "no ORTModule"
at once. Nothing stays patched afterwards. If onnxruntime was already imported
(for example by the compiler in the same process) it is returned as it is.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import types

from gfcompiler import ort_training
from gfcompiler.errors import TrainingError

_TRAINING = "onnxruntime.training"
_ORTMODULE = "onnxruntime.training.ortmodule"


def _register_bare_training_package() -> None:
    if _TRAINING in sys.modules:
        return
    spec = importlib.util.find_spec("onnxruntime")  # a top-level spec: imports nothing
    if spec is None or not spec.submodule_search_locations:
        return  # onnxruntime is missing: the import below reports it
    location = os.path.join(list(spec.submodule_search_locations)[0], "training")
    if not os.path.isdir(location):
        return  # the plain inference build: ort_training reports it when asked for the API
    package = types.ModuleType(_TRAINING)
    package.__path__ = [location]
    package.__spec__ = importlib.util.spec_from_file_location(
        _TRAINING, os.path.join(location, "__init__.py"), submodule_search_locations=[location]
    )
    package.__file__ = package.__spec__.origin
    sys.modules[_TRAINING] = package


def onnxruntime() -> types.ModuleType:
    """The ``onnxruntime`` module, imported without torch or onnx."""
    if "onnxruntime" in sys.modules:
        return sys.modules["onnxruntime"]
    _register_bare_training_package()
    blocked = _ORTMODULE not in sys.modules
    if blocked:
        sys.modules[_ORTMODULE] = None  # type: ignore[assignment]  # "absent" to the import system
    try:
        return importlib.import_module("onnxruntime")
    finally:
        if blocked and sys.modules.get(_ORTMODULE, 0) is None:
            del sys.modules[_ORTMODULE]


def training_api() -> types.ModuleType:
    """``onnxruntime.training.api`` (Module, Optimizer, CheckpointState)."""
    onnxruntime()
    try:
        return ort_training.api()
    except ort_training.TrainingBuildMissing as error:
        raise TrainingError(str(error)) from None


_ORT_PREFIX = re.compile(r"^.*?\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*[A-Z_]+\s*:\s*", re.DOTALL)


def error_message(error: BaseException) -> str:
    """onnxruntime's exception text without its source-location prefix, on one line."""
    text = _ORT_PREFIX.sub("", str(error)).strip()
    text = " ".join(text.split())
    return text or type(error).__name__
