"""Feeding compiled artifacts from tests that drive onnxruntime-training's Module directly.

Two-stage artifacts (the compiler's default) train a suffix whose inputs are the
boundary tensors of the frozen prefix model, not the model input; `module_inputs` runs
the prefix the way the runtime does (gfcompiler.runtime.prefix) and returns the
module's inputs in its order, so tests exercise both forms with one call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gfcompiler.manifest import Manifest
from gfcompiler.runtime.device import Device
from gfcompiler.runtime.prefix import FrozenPrefix


def module_inputs(directory: Path, module, x: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """``module``'s inputs for the batch (x, labels), in ``module.input_names()`` order."""
    manifest = Manifest.read(Path(directory))
    feeds = {manifest.inputs[0].name: x, manifest.label.name: labels}
    if manifest.form.kind == "two_stage":
        prefix = FrozenPrefix.from_manifest(directory, manifest, Device("cpu"))
        feeds.update({name: value.numpy() for name, value in prefix(x).items()})
    return [feeds[name] for name in module.input_names()]
