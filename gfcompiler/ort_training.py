"""The one place that imports onnxruntime-training's Python API.

``import onnxruntime.training`` runs a package ``__init__`` that imports torch-only
helpers (ORTModule, amp, optim), so it fails where torch is absent and is slow where
torch is present. The submodules we use (``artifacts``, ``api``, ``onnxblock``) do not
need torch. This module registers a bare package object for ``onnxruntime.training``
whose ``__path__`` points at the installed directory, so those submodules import
without running the package ``__init__``.

Only the standard library and onnxruntime are imported here: the on-device runtime
uses this module too.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

_PACKAGE = "onnxruntime.training"


class TrainingBuildMissing(ImportError):
    """onnxruntime is installed without the training API (the plain inference build)."""


def _register_bare_package() -> None:
    if _PACKAGE in sys.modules:
        return
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise TrainingBuildMissing(
            "onnxruntime-training is not installed (found no onnxruntime.training); "
            "install onnxruntime-training-cpu==1.19.2, not the plain onnxruntime package"
        )
    package = types.ModuleType(_PACKAGE)
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    package.__file__ = spec.origin
    sys.modules[_PACKAGE] = package


def training_submodule(name: str) -> types.ModuleType:
    """Import ``onnxruntime.training.<name>`` (``api``, ``artifacts`` or ``onnxblock``)."""
    _register_bare_package()
    return importlib.import_module(f"{_PACKAGE}.{name}")


def api() -> types.ModuleType:
    """``onnxruntime.training.api``: Module, Optimizer, CheckpointState, LinearLRScheduler."""
    return training_submodule("api")


def artifacts() -> types.ModuleType:
    """``onnxruntime.training.artifacts``: generate_artifacts, LossType, OptimType."""
    return training_submodule("artifacts")


def onnxblock() -> types.ModuleType:
    """``onnxruntime.training.onnxblock``: building blocks for losses and optimizers."""
    return training_submodule("onnxblock")
