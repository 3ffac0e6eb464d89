"""The onnx engine: one plain ONNX step model run by stock onnxruntime.

Artifacts compiled with ``--backend onnx`` (manifest ``"backend": "onnx"``, schema in
gfcompiler.manifest) need nothing but ``onnxruntime`` (any build >= 1.20, CPU or GPU)
and numpy: the whole training step (forward, loss, backward, optimizer update) is
``step_model.onnx``, a pure function

    (x, labels, learning_rate, step, state...) -> (loss, model output, updated state...)

where the state is every trainable parameter and optimizer slot. The engine keeps the
state as OrtValues on the execution provider's device and binds step k's state outputs
as step k+1's inputs through an IOBinding, so on CUDA the parameters never travel to
the host; only the batch, the learning rate, the step index and the loss (and the
logits, for the accuracy) cross.

In place (the default for step models compiled to allow it, on CPU and CUDA): each
state output ``<name>.updated`` is bound to the very OrtValue bound as input
``<name>``, so onnxruntime writes the new parameters and optimizer slots over the old
ones instead of allocating a second set (for AdamW three parameter-sized tensors per
parameter). The step model marks that it allows this in its metadata (`IN_PLACE_KEY`,
written by gfcompiler.onnx_step.step_model) because its graph guarantees what it needs
(gfcompiler.onnx_step.optimizers): every state write waits for every gradient, so no
old value is read after it is overwritten, and a NaN or infinite loss turns the update
into the exact identity, so `discard` has nothing to undo. A step model without the
mark runs functionally: the new state goes to fresh buffers and is adopted by `apply`,
or dropped by `discard`. ``in_place=False`` (or setting `OnnxStepEngine.in_place`)
forces the functional path, for comparisons and debugging; both give identical numbers.

Checkpoints are ``.npz`` files (written by `write_state`) holding every state tensor by
its step-model input name and the number of steps taken under ``STEP_KEY`` (the
optimizer's bias correction depends on it); the compiled ``initial_state.npz`` has the
same layout without the step count (0 steps). Export appends the trained parameters
to ``export_model.onnx`` as initializers (gfcompiler.runtime.protowire).
"""

from __future__ import annotations

import dataclasses
import math
import zipfile
from pathlib import Path

import numpy as np

from gfcompiler.errors import ArtifactError, InputError, TrainingError, first_line
from gfcompiler.manifest import IN_PLACE_KEY, IN_PLACE_VALUE, dtype_name
from gfcompiler.ort_training import error_message, onnxruntime
from gfcompiler.runtime.artifacts import Artifacts
from gfcompiler.runtime.device import Device
from gfcompiler.runtime.protowire import with_initializers

STEP_KEY = "__gfc_steps_taken__"

# onnxruntime's NodeArg.type strings of the dtypes a state tensor can have.
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class OnnxStepEngine:
    """Training, evaluation, checkpoints and export of ``--backend onnx`` artifacts.

    ``in_place``: None (default) updates the state in place where the step model allows
    it (module docstring); False never; True insists (ArtifactError if the model does not
    allow it).
    """

    checkpoint_suffix = ".npz"

    def __init__(self, artifacts: Artifacts, device: Device, options, checkpoint: Path | None = None,
                 in_place: bool | None = None):
        if artifacts.step is None:
            raise ArtifactError(f"{artifacts.directory} holds no step model: recompile with `--backend onnx`")
        self.artifacts = artifacts
        self.spec = artifacts.step
        self.device = device
        self._device_type = "cpu" if device.kind == "cpu" else "cuda"
        ort = onnxruntime()
        self._ort = ort
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.step_session = self._session("step_model", options)
        self.eval_session = self._session("eval_model", options)
        self._train_output, self._eval_output = self._check_interfaces()
        self._lr_dtype, self._step_dtype = (self._input_dtype(name) for name in (self.spec.learning_rate, self.spec.step))
        self.checkpoint_path = Path(checkpoint) if checkpoint is not None else artifacts.path("state")
        arrays, self.steps_taken = read_state(self.checkpoint_path, self._state_types())
        self.values = {name: self._to_device(array) for name, array in arrays.items()}
        self._pending: dict | None = None
        self._pending_finite = False  # whether the loss of the pending (in-place) step was finite
        self._torn: str | None = None  # why the in-place state can no longer be trusted
        self._lr = np.array(0.0, self._lr_dtype)
        metadata = self.step_session.get_modelmeta().custom_metadata_map or {}
        self.in_place_allowed = metadata.get(IN_PLACE_KEY) == IN_PLACE_VALUE
        self._in_place = False
        self.in_place = self.in_place_allowed if in_place is None else in_place

    # ------------------------------------------------------------ set-up

    def _session(self, key: str, options):
        path = self.artifacts.path(key)
        try:
            return self._ort.InferenceSession(str(path), options, providers=self.device.providers)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises bare RuntimeErrors
            message = error_message(error)
            if self.device.kind == "cuda":
                raise TrainingError(f"cannot start training on {self.device.ort_device}: {message}") from None
            raise ArtifactError(f"onnxruntime cannot load {path}: {message}") from None

    def _check_interfaces(self) -> tuple[bool, bool]:
        """The sessions take the inputs manifest.json names; (step, eval) return the model output."""
        spec, a = self.spec, self.artifacts
        data = [*a.training_inputs, a.label.name]
        step_inputs = {*data, spec.learning_rate, spec.step, *(s.name for s in spec.state)}
        eval_inputs = {*data, *(s.name for s in spec.parameters)}
        _check_inputs(self.step_session, "step", step_inputs)
        _check_inputs(self.eval_session, "eval", eval_inputs)
        _check_outputs(self.step_session, "step", [spec.loss, *(s.updated for s in spec.state)])
        _check_outputs(self.eval_session, "eval", [spec.loss])
        described = [a.manifest.inputs[0], a.manifest.label, dataclasses.replace(a.manifest.outputs[0], name=spec.output)]
        _check_described(self.step_session, "step", described)
        _check_described(self.eval_session, "eval", described)
        return _outputs(self.step_session, spec.output), _outputs(self.eval_session, spec.output)

    def _state_types(self) -> dict[str, tuple[np.dtype, list]]:
        """name -> (dtype, shape with None for symbolic dimensions) of each state input."""
        types = {}
        for arg in self.step_session.get_inputs():
            if any(s.name == arg.name for s in self.spec.state):
                dtype = np.dtype(_ORT_TYPES.get(arg.type, np.float32))
                types[arg.name] = (dtype, [d if isinstance(d, int) else None for d in arg.shape])
        return types

    def _input_dtype(self, name: str) -> np.dtype:
        """The numpy dtype of a step-model input (float32 as the manifest schema says, unless declared otherwise)."""
        arg = next(arg for arg in self.step_session.get_inputs() if arg.name == name)
        return np.dtype(_ORT_TYPES.get(arg.type, np.float32))

    def _to_device(self, array: np.ndarray):
        return self._ort.OrtValue.ortvalue_from_numpy(np.array(array), self._device_type, self.device.index)

    @property
    def in_place(self) -> bool:
        """Whether `train` writes the new state over the old (module docstring); settable between steps."""
        return self._in_place

    @in_place.setter
    def in_place(self, value: bool) -> None:
        if self._pending is not None:
            raise RuntimeError("apply or discard the pending step before switching in_place")
        if value and not self.in_place_allowed:
            raise ArtifactError(f"{self.artifacts.path('step_model')} does not allow in-place updates: "
                                "recompile it with this gfcompiler")
        self._in_place = bool(value)

    # ------------------------------------------------------------ steps

    @property
    def eval_has_outputs(self) -> bool:
        return self._eval_output

    def set_learning_rate(self, lr: float) -> None:
        with np.errstate(over="ignore"):
            value = np.array(lr, self._lr_dtype)
        if not np.isfinite(value):
            raise InputError(f"the learning rate {lr:g} (after manifest.json's lr_multiplier) overflows the step "
                             f"model's {value.dtype} learning-rate input")
        self._lr = value

    def train(self, feeds: dict) -> tuple[float, np.ndarray | None]:
        """Run step ``steps_taken + 1``; `apply` (or, after a non-finite loss, `discard`) must follow.

        In place, the state tensors already hold the new values when this returns (the old
        ones where the loss is not finite); otherwise the new state waits in fresh buffers.
        """
        spec = self.spec
        self._check_state()
        if self._pending is not None:
            raise RuntimeError("apply or discard the previous step first")
        binding = self.step_session.io_binding()
        _bind_feeds(binding, feeds)
        binding.bind_cpu_input(spec.learning_rate, self._lr)
        binding.bind_cpu_input(spec.step, np.array(self.steps_taken + 1, self._step_dtype))
        for state in spec.state:
            binding.bind_ortvalue_input(state.name, self.values[state.name])
        fetched = [spec.loss, *([spec.output] if self._train_output else [])]
        for name in fetched:
            binding.bind_output(name, "cpu")
        for state in spec.state:
            if self._in_place:
                binding.bind_ortvalue_output(state.updated, self.values[state.name])
            else:
                binding.bind_output(state.updated, self._device_type, self.device.index)
        try:
            outputs = self._run(self.step_session, binding, "training")
        except TrainingError:
            if self._in_place:
                self._torn = "an in-place training step failed part way"
            raise
        # In place, the outputs are views of the state's own OrtValues, which must stay the ones
        # kept: on CPU they own the numpy arrays holding the memory.
        self._pending = (self.values if self._in_place else
                         {state.name: value for state, value in zip(spec.state, outputs[len(fetched):])})
        loss, output = _loss_and_output(outputs, self._train_output)
        self._pending_finite = math.isfinite(loss)
        return loss, output

    def apply(self) -> None:
        """Adopt the state the last `train` computed (in place: it is already there)."""
        if self._pending is not None:
            self.values, self._pending = self._pending, None
            self.steps_taken += 1

    def discard(self) -> None:
        """Drop the state the last `train` computed; the previous one stays.

        In place, only a step whose loss was NaN or infinite can be dropped (the step
        model left the state unchanged); the new state of any other has overwritten the
        old one, so discarding it is an error.
        """
        if self._pending is not None and self._in_place and self._pending_finite:
            self._pending = None
            self.steps_taken += 1  # the state is step steps_taken + 1's: keep the count consistent with it
            raise RuntimeError("an in-place step with a finite loss has already updated the state: it cannot be "
                               "discarded (only a step with a NaN/Inf loss, which leaves the state unchanged)")
        self._pending = None

    def _check_state(self) -> None:
        if self._torn is not None:
            raise TrainingError(f"{self._torn}, so the training state may be partly updated: "
                                "start again from the last checkpoint")

    def evaluate(self, feeds: dict) -> tuple[float, np.ndarray | None]:
        """(loss, model output or None) of the eval model on the current parameters."""
        self._check_state()
        binding = self.eval_session.io_binding()
        _bind_feeds(binding, feeds)
        for state in self.spec.parameters:
            binding.bind_ortvalue_input(state.name, self.values[state.name])
        binding.bind_output(self.spec.loss, "cpu")
        if self._eval_output:
            binding.bind_output(self.spec.output, "cpu")
        return _loss_and_output(self._run(self.eval_session, binding, "eval"), self._eval_output)

    def _run(self, session, binding, kind: str) -> list:
        try:
            session.run_with_iobinding(binding)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises bare RuntimeErrors
            raise TrainingError(f"the {kind} step failed on {self.device.ort_device}: {error_message(error)}") from None
        return binding.get_outputs()

    # ------------------------------------------------------------ state

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Copies of every state tensor (parameters and optimizer slots)."""
        self._check_state()
        return {name: np.array(value.numpy()) for name, value in self.values.items()}

    def parameters(self) -> dict[str, np.ndarray]:
        """Copies of the trainable parameters (frozen weights are constants of the step model)."""
        self._check_state()
        return {s.name: np.array(self.values[s.name].numpy()) for s in self.spec.parameters}

    def load_parameters(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace trainable parameters by ``arrays`` (checked by the Trainer); the optimizer slots stay."""
        self._check_state()
        if self._pending is not None:
            raise RuntimeError("apply or discard the pending step before loading parameters")
        for name, array in arrays.items():
            self.values[name] = self._to_device(array)

    def save_checkpoint(self, path: Path) -> None:
        """Every state tensor and the step count as an ``.npz`` at ``path`` (OSError passes)."""
        write_state(path, self.state_arrays(), self.steps_taken)

    def write_inference_model(self, path: Path) -> None:
        """``export_model.onnx`` with the current parameters appended as initializers."""
        model = self.artifacts.path("export_model").read_bytes()
        Path(path).write_bytes(with_initializers(model, self.parameters()))


def _check_inputs(session, kind: str, expected: set[str]) -> None:
    found = [arg.name for arg in session.get_inputs()]
    if set(found) != expected:
        unexpected = sorted(set(found) - expected) or sorted(expected - set(found))
        raise ArtifactError(
            f"the {kind} model's inputs do not match manifest.json (first difference: {unexpected[0]!r}): "
            "recompile the model"
        )


def _check_outputs(session, kind: str, required: list[str]) -> None:
    found = {arg.name for arg in session.get_outputs()}
    missing = [name for name in required if name not in found]
    if missing:
        raise ArtifactError(f"the {kind} model does not output {missing[0]!r} named in manifest.json: recompile the model")


def _check_described(session, kind: str, records) -> None:
    """The session's inputs and outputs named by ``records`` (manifest.json's data input, label and
    output) have exactly the dtype and shape manifest.json says (None: a dynamic dimension): the
    compiler wrote both from the same graph, so a difference is an edited or corrupted manifest."""
    args = {arg.name: arg for arg in [*session.get_inputs(), *session.get_outputs()]}
    for record in records:
        arg = args.get(record.name)
        if arg is None:
            continue
        shape = tuple(d if isinstance(d, int) and d > 0 else None for d in arg.shape)
        fits = record.dtype == dtype_name(arg.type) and record.shape == shape
        if not fits:
            found = "×".join("N" if d is None else str(d) for d in shape) + f" {dtype_name(arg.type)}"
            raise ArtifactError(
                f"manifest.json describes {record.name!r} as {record.describe()} but the {kind} model's is {found} "
                "(edited by hand or corrupted): recompile the model"
            )


def _outputs(session, name: str) -> bool:
    return any(arg.name == name for arg in session.get_outputs())


def _bind_feeds(binding, feeds: dict) -> None:
    """Bind numpy arrays (from host memory) and OrtValues (where they are) as inputs."""
    for name, value in feeds.items():
        if isinstance(value, np.ndarray):
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        else:
            binding.bind_ortvalue_input(name, value)


def _loss_and_output(outputs: list, with_output: bool) -> tuple[float, np.ndarray | None]:
    loss = float(np.asarray(outputs[0].numpy()).reshape(-1)[0])
    return loss, (np.array(outputs[1].numpy()) if with_output else None)


def write_state(path: Path, arrays: dict[str, np.ndarray], steps_taken: int) -> None:
    """An ``.npz`` of ``arrays`` plus the step count, written at exactly ``path`` (no suffix added).

    Written member by member rather than with ``np.savez``, whose keyword arguments would
    clash with tensors named ``file`` or ``allow_pickle``.
    """
    if STEP_KEY in arrays:
        raise ValueError(f"a state tensor may not be named {STEP_KEY}")
    members = {**arrays, STEP_KEY: np.array(steps_taken, np.int64)}
    with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in members.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)


def read_state(path: Path, types: dict[str, tuple[np.dtype, list]]) -> tuple[dict[str, np.ndarray], int]:
    """(state arrays, steps taken) from a checkpoint or the initial state; ArtifactError if unusable.

    ``types``: the step model's state inputs, name -> (dtype, shape with None for symbolic
    dimensions); every one must be in the file with that dtype and shape.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as error:  # noqa: BLE001 - numpy and zipfile raise many kinds
        raise ArtifactError(
            f"cannot load checkpoint {path}: corrupted or not a gfcompiler state file ({first_line(error)})"
        ) from None
    steps = int(arrays.pop(STEP_KEY, 0))
    missing = [name for name in types if name not in arrays]
    if missing:
        raise ArtifactError(
            f"checkpoint {path} lacks state tensor(s) {', '.join(missing[:3])} of the step model: "
            "it belongs to another model"
        )
    for name, (dtype, shape) in types.items():
        array = arrays[name]
        fits = array.dtype == dtype and array.ndim == len(shape) and all(
            w is None or g == w for g, w in zip(array.shape, shape)
        )
        if not fits:
            raise ArtifactError(
                f"checkpoint {path} holds {name} as {array.dtype} {list(array.shape)}, the step model takes "
                f"{dtype} {[d if d is not None else '?' for d in shape]}: it belongs to another model"
            )
    return {name: arrays[name] for name in types}, steps


