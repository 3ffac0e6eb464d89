"""The one place that deals with onnxruntime-training's import quirks.

`onnxruntime` gives the ``onnxruntime`` module of whichever build is installed: the
training build (onnxruntime-training / -cpu 1.19.2) or a plain inference build
(onnxruntime, onnxruntime-gpu), for which nothing here is needed and nothing is done.
The ``--backend onnx`` runtime uses only that and `error_message`; `api`, `artifacts`
and `onnxblock` exist in the training build alone and raise `TrainingBuildMissing`
elsewhere.

Two quirks of the onnxruntime-training 1.19.2 wheels:

* ``import onnxruntime.training`` runs a package ``__init__`` that imports torch-only
  helpers (ORTModule, amp, optim): it fails where torch is absent and is slow where
  torch is present. The submodules we use (``artifacts``, ``api``, ``onnxblock``) do not
  need torch. We register a bare package object for ``onnxruntime.training`` whose
  ``__path__`` points at the installed directory, so those submodules import without
  running the package ``__init__``.
* ``import onnxruntime`` itself runs a build check that imports
  ``onnxruntime.training.ortmodule``, i.e. torch and onnx, wherever torch is installed
  (about 2.4 s and 240 MB per process). `onnxruntime()` marks ORTModule as absent for
  the duration of that one import, so the check concludes "no ORTModule" at once.
  Nothing stays patched afterwards.

Only the standard library is imported here: the on-device runtime uses this module.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import types

from gfcompiler.errors import TrainingError

_TRAINING = "onnxruntime.training"
_ORTMODULE = "onnxruntime.training.ortmodule"


class TrainingBuildMissing(TrainingError):
    """onnxruntime is installed without the training API (the plain inference build)."""


TRAINING_BUILD_HINT = (
    "install onnxruntime-training-cpu==1.19.2 (x86-64, Python <= 3.12) instead of the plain onnxruntime "
    "package, or use `--backend onnx`, which needs only onnxruntime"
)


def _register_bare_training_package() -> None:
    if _TRAINING in sys.modules:
        return
    spec = importlib.util.find_spec("onnxruntime")  # a top-level spec: imports nothing
    if spec is None or not spec.submodule_search_locations:
        return  # onnxruntime is missing: the import reports it
    location = os.path.join(list(spec.submodule_search_locations)[0], "training")
    if not os.path.isdir(location):
        return  # the plain inference build: training_submodule reports it
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


def training_submodule(name: str) -> types.ModuleType:
    """Import ``onnxruntime.training.<name>`` (``api``, ``artifacts`` or ``onnxblock``)."""
    onnxruntime()
    _register_bare_training_package()
    if _TRAINING not in sys.modules:
        raise TrainingBuildMissing(
            f"onnxruntime-training is not installed (this onnxruntime has no training API): {TRAINING_BUILD_HINT}"
        )
    try:
        return importlib.import_module(f"{_TRAINING}.{name}")
    except ImportError as error:
        raise TrainingBuildMissing(
            f"onnxruntime's training API does not import ({error_message(error)}): {TRAINING_BUILD_HINT}"
        ) from None


def api() -> types.ModuleType:
    """``onnxruntime.training.api``: Module, Optimizer, CheckpointState."""
    return training_submodule("api")


def artifacts() -> types.ModuleType:
    """``onnxruntime.training.artifacts``: generate_artifacts, LossType, OptimType."""
    return training_submodule("artifacts")


def onnxblock() -> types.ModuleType:
    """``onnxruntime.training.onnxblock``: building blocks for losses and optimizers."""
    return training_submodule("onnxblock")


_ORT_PREFIX = re.compile(r"^.*?\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*[A-Z_]+\s*:\s*", re.DOTALL)
# "/onnxruntime_src/onnxruntime/core/graph/model.cc:165 onnxruntime::Model::Model(onnx::ModelProto&&, ...) "
_ORT_SOURCE_LOCATION = re.compile(r"/?onnxruntime_src/\S+:\d+\s+(?:[\w:~<>]+\([^()]*\)\s*)?")


def error_message(error: BaseException) -> str:
    """onnxruntime's exception text without its source-location prefixes (and the C++ function they
    name), on one line."""
    text = _ORT_PREFIX.sub("", str(error)).strip()
    text = _ORT_SOURCE_LOCATION.sub(" ", text)
    text = " ".join(text.split())
    return text or type(error).__name__
