"""The ort-training engine: onnxruntime-training's Module, Optimizer and CheckpointState.

Artifacts compiled with ``--backend ort-training`` (every format 1 and 2 directory) hold
a training model (forward, loss, gradients), an eval model, an optimizer model and an
onnxruntime checkpoint. This engine runs them through onnxruntime-training 1.19.2,
imported by gfcompiler.ort_training so that neither torch nor onnx is loaded. Where
onnxruntime-training is not installed (it has no wheels for aarch64 or Python 3.13),
opening such artifacts is one ArtifactError that says what to do instead.

The engine interface is gfcompiler.runtime.engine's; the frozen prefix of two-stage
artifacts is run by the Trainer, which hands the boundary tensors over in ``feeds``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from gfcompiler.errors import ArtifactError, TrainingError
from gfcompiler.ort_training import TrainingBuildMissing, error_message, onnxruntime
from gfcompiler.ort_training import api as training_api
from gfcompiler.runtime.artifacts import Artifacts
from gfcompiler.runtime.device import Device


def training_api_for(artifacts: Artifacts):
    """``onnxruntime.training.api``, or an ArtifactError saying these artifacts need it."""
    try:
        return training_api()
    except TrainingBuildMissing:
        raise ArtifactError(
            f"{artifacts.directory} holds onnxruntime-training artifacts, which need onnxruntime-training "
            "(x86-64, Python <= 3.12; not installed here): install onnxruntime-training-cpu==1.19.2 "
            "or recompile the model with `gfc compile --backend onnx`"
        ) from None


class OrtTrainingEngine:
    """Training, evaluation, checkpoints and export of ort-training artifacts."""

    checkpoint_suffix = ""

    def __init__(self, artifacts: Artifacts, device: Device, options, checkpoint: Path | None = None):
        self.artifacts = artifacts
        self.device = device
        self._api = training_api_for(artifacts)
        self.checkpoint_path = Path(checkpoint) if checkpoint is not None else artifacts.path("checkpoint")
        self.state = self._load_state()
        self.module, self.optimizer = self._create_sessions(options)
        self._train_io = self._io_positions(training=True)
        self._eval_io = self._io_positions(training=False)

    # ------------------------------------------------------------ set-up

    def _load_state(self):
        try:
            state = self._api.CheckpointState.load_checkpoint(self.checkpoint_path)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises bare RuntimeErrors
            raise ArtifactError(
                f"cannot load checkpoint {self.checkpoint_path}: corrupted or not an onnxruntime "
                f"checkpoint ({error_message(error)})"
            ) from None
        names = {name for name, _ in state.parameters}
        missing = [name for name in self.artifacts.trainable_params if name not in names]
        if missing:
            raise ArtifactError(
                f"checkpoint {self.checkpoint_path} lacks trainable parameter(s) {', '.join(missing[:3])} "
                "listed in manifest.json: it belongs to another model"
            )
        return state

    def _create_sessions(self, options):
        a = self.artifacts
        try:
            module = self._api.Module(
                a.path("training_model"),
                self.state,
                a.path("eval_model"),
                device=self.device.ort_device,
                session_options=options,
            )
            optimizer = self._api.Optimizer(a.path("optimizer_model"), module)
        except Exception as error:  # noqa: BLE001
            message = error_message(error)
            if self.device.kind == "cuda":
                raise TrainingError(f"cannot start training on {self.device.ort_device}: {message}") from None
            raise ArtifactError(f"onnxruntime cannot load the artifacts in {a.directory}: {message}") from None
        return module, optimizer

    def _io_positions(self, training: bool) -> tuple[list[str], int, int | None]:
        """(input order, loss output index, model output index or None) of one session."""
        self.module.train(training)
        inputs = list(self.module.input_names())
        outputs = list(self.module.output_names())
        self.module.train(True)
        expected = {*self.artifacts.training_inputs, self.artifacts.label.name}
        if set(inputs) != expected:
            kind = "training" if training else "eval"
            raise ArtifactError(
                f"the {kind} model takes inputs {inputs}, manifest.json says {sorted(expected)}: recompile the model"
            )
        model_output = self.artifacts.output.name
        output_index = outputs.index(model_output) if model_output in outputs else None
        loss_index = next(i for i, name in enumerate(outputs) if name != model_output)
        return inputs, loss_index, output_index

    # ------------------------------------------------------------ steps

    @property
    def eval_has_outputs(self) -> bool:
        """Whether the eval model returns the model output (else the Trainer exports to get it)."""
        return self._eval_io[2] is not None

    def set_learning_rate(self, lr: float) -> None:
        self.optimizer.set_learning_rate(lr)

    def train(self, feeds: dict) -> tuple[float, np.ndarray | None]:
        """Forward and backward (gradients accumulate); `apply` or `discard` must follow."""
        return self._run(self._train_io, feeds, training=True)

    def apply(self) -> None:
        """The optimizer step on the gradients of the last `train`."""
        self.optimizer.step()
        self.module.lazy_reset_grad()

    def discard(self) -> None:
        """Forget the gradients of the last `train`."""
        self.module.lazy_reset_grad()

    def evaluate(self, feeds: dict) -> tuple[float, np.ndarray | None]:
        """(loss, model output or None) of the eval model."""
        return self._run(self._eval_io, feeds, training=False)

    def _run(self, io, feeds: dict, training: bool) -> tuple[float, np.ndarray | None]:
        names, loss_index, output_index = io
        self.module.train(training)
        try:
            fetches = self.module(*(feeds[name] for name in names))
        except Exception as error:  # noqa: BLE001 - onnxruntime raises bare RuntimeErrors
            kind = "training" if training else "eval"
            raise TrainingError(f"the {kind} step failed on {self.device.ort_device}: {error_message(error)}") from None
        finally:
            self.module.train(True)
        fetches = fetches if isinstance(fetches, tuple) else (fetches,)
        return float(fetches[loss_index]), (fetches[output_index] if output_index is not None else None)

    # ------------------------------------------------------------ state

    def parameters(self) -> dict[str, np.ndarray]:
        """Copies of every parameter in the checkpoint state (trainable and frozen)."""
        return {name: np.array(parameter.data) for name, parameter in self.state.parameters}

    def load_parameters(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace parameters of the checkpoint state by ``arrays`` (checked by the Trainer)."""
        for name, array in arrays.items():
            self.state.parameters[name].data = array

    def save_checkpoint(self, path: Path) -> None:
        """An onnxruntime checkpoint with the optimizer state at ``path`` (RuntimeError/OSError pass)."""
        self._api.CheckpointState.save_checkpoint(self.state, path, include_optimizer_state=True)

    def write_inference_model(self, path: Path) -> None:
        """The whole model with the current weights (no checks; onnxruntime errors pass).

        ``Module.export_model_for_inferencing`` keeps the eval model's nodes that produce the
        model output and writes the parameters in as initializers. Two-stage artifacts
        export through a second Module whose eval model is ``export_model.onnx`` (the whole
        forward, trainable parameters as inputs), on a copy of the current parameters so
        the training module's state is never touched.
        """
        artifacts, outputs = self.artifacts, [self.artifacts.output.name]
        if not artifacts.two_stage:
            self.module.export_model_for_inferencing(path, outputs)
            return
        with tempfile.TemporaryDirectory(prefix="gfc-export-") as scratch:
            checkpoint = Path(scratch) / "checkpoint"
            self._api.CheckpointState.save_checkpoint(self.state, checkpoint)
            state = self._api.CheckpointState.load_checkpoint(checkpoint)
            options = onnxruntime().SessionOptions()
            options.log_severity_level = 3
            module = self._api.Module(artifacts.path("training_model"), state, artifacts.path("export_model"),
                                      device="cpu", session_options=options)
            module.export_model_for_inferencing(path, outputs)
