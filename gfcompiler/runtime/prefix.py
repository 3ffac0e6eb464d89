"""The frozen prefix of two-stage artifacts: an optimized InferenceSession before the training module.

Two-stage artifacts (gfcompiler.split) hold the frozen part of the network as a plain
inference model. `FrozenPrefix` runs it with every graph optimization onnxruntime has
(layout transformation and fusions the training session does not apply) on the
training's execution provider, and hands the boundary tensors over as OrtValues bound
through an IOBinding, so nothing is copied on the way: on CUDA they stay on the GPU.

Its session options come from the caller (gfcompiler.runtime.device.session_options):
with the CPU arena on, prefix and training sessions allocate from one shared arena, so
the memory the prefix's activations used is reused by the training step instead of
staying reserved beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gfcompiler.errors import ArtifactError, TrainingError
from gfcompiler.manifest import Manifest
from gfcompiler.ort_training import error_message, onnxruntime
from gfcompiler.runtime import device as devices


class FrozenPrefix:
    """``prefix(x)`` -> {boundary tensor name: OrtValue} for the prefix model at ``path``."""

    def __init__(self, path: Path, input_name: str, output_names: list[str], device: devices.Device, options=None):
        ort = onnxruntime()
        options = options if options is not None else devices.session_options()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), options, providers=device.providers)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises bare RuntimeErrors
            raise ArtifactError(f"onnxruntime cannot load the prefix model {path}: {error_message(error)}") from None
        found = {output.name for output in self.session.get_outputs()}
        missing = [name for name in output_names if name not in found]
        if missing:
            raise ArtifactError(f"the prefix model {path} does not output {', '.join(missing)}: recompile the model")
        self.input_name = input_name
        self.output_names = list(output_names)
        self._device_type = "cpu" if device.kind == "cpu" else "cuda"
        self._device_index = device.index
        self._where = device.ort_device

    @classmethod
    def from_manifest(cls, directory: Path, manifest: Manifest, device: devices.Device, options=None) -> FrozenPrefix:
        """The prefix of the two-stage artifacts in ``directory`` (``manifest``: theirs).

        It outputs every boundary tensor but the data input itself (which the caller feeds
        to the training module directly). ``options`` are modified (optimization level).
        """
        outputs = [b.name for b in manifest.boundary if not b.from_input]
        return cls(Path(directory) / manifest.files["prefix_model"], manifest.inputs[0].name, outputs, device, options)

    def __call__(self, x: np.ndarray) -> dict:
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, x)
        for name in self.output_names:
            binding.bind_output(name, self._device_type, self._device_index)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as error:  # noqa: BLE001
            raise TrainingError(f"the frozen prefix failed on {self._where}: {error_message(error)}") from None
        return dict(zip(self.output_names, binding.get_outputs()))
