"""Generate onnxruntime-training artifacts for a canonical model and a layer selection.

This wraps ``onnxruntime.training.artifacts.generate_artifacts`` (through the
torch-free shim `gfcompiler.ort_training`) and fixes what it gets wrong for us:

* its native INFO log (pages per model) is captured and shown only on failure;
* ``optimizer_model.onnx`` is written with IR 14 under onnx 1.23, which ORT 1.19
  refuses: every artifact is rewritten with IR <= 10 (measured: ORT 1.19.2 refuses IR 11+);
* momentum SGD, which ORT's built-in SGD lacks (see `optimizer_block`).

Boundary names: onnxruntime names each parameter's gradient accumulator input
``<param>_grad.accumulation.buffer``; `accumulation_buffer_name` is the one place that
knows it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from gfcompiler import ort_training
from gfcompiler.errors import UnsupportedModelError
from gfcompiler.loading import MAX_IR_VERSION
from gfcompiler.manifest import FILES, LOSSES, OptimizerRecord

OPTIMIZERS = ("adamw", "sgd")


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """What the user asked for; `optimizer_block` turns it into an onnxblock.

    ``weight_decay`` is decoupled for AdamW (as torch.optim.AdamW) and coupled for SGD
    (as torch.optim.SGD: added to the gradient before momentum, in the training graph).
    """

    name: str = "adamw"
    momentum: float = 0.9
    weight_decay: float | None = None  # None: 0.01 for adamw, 0 for sgd

    @property
    def effective_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 0.01 if self.name == "adamw" else 0.0

    @property
    def lr_multiplier(self) -> float:
        """The runtime multiplies the user's learning rate by this (see `optimizer_block`)."""
        if self.name == "sgd" and self.momentum > 0:
            return 1.0 / (1.0 - self.momentum)
        return 1.0

    def to_manifest(self, backend: str = "ort-training") -> OptimizerRecord:
        """The manifest's optimizer record: what the runtime scales the learning rate by, and how the update runs."""
        momentum = self.momentum if self.name == "sgd" else None
        if backend == "onnx":  # the step model computes torch.optim's update itself (gfcompiler.onnx_step.optimizers)
            torch_name = "AdamW" if self.name == "adamw" else "SGD"
            return OptimizerRecord(self.name, self.effective_weight_decay, 1.0, momentum,
                                   f"standard ONNX ops in the step model, torch.optim.{torch_name} numerics")
        implementation = None
        if self.name == "sgd":
            implementation = (
                "onnxruntime AdamWOptimizer with beta1=momentum, beta2=1, eps=1, no bias correction: "
                "m = momentum*m + (1-momentum)*g and p -= lr*lr_multiplier*m, which equals torch.optim.SGD "
                "(dampening 0); weight decay is added to the gradient in the training graph"
            ) if self.momentum > 0 else (
                "onnxruntime SGDOptimizerV2: p -= lr*g; weight decay is added to the gradient in the training graph"
            )
        return OptimizerRecord(self.name, self.effective_weight_decay, self.lr_multiplier, momentum, implementation)


def optimizer_block(spec: OptimizerSpec):
    """The onnxblock optimizer for ``spec``.

    onnxruntime-training 1.19.2 runs only its AdamW and (momentum-free) SGD kernels.
    Momentum SGD is expressed exactly through AdamW: with β2 = 1 the second moment
    stays 0, so with ε = 1 and no bias correction the update is ``lr·m`` where
    ``m = μ·m + (1−μ)·g`` = (1−μ)·(torch's momentum buffer). Scaling the learning rate
    by 1/(1−μ) (`OptimizerSpec.lr_multiplier`) gives torch.optim.SGD's update exactly.
    Plain SGD (μ = 0) is onnxruntime's own SGD kernel, which reads and writes only the
    parameters and their gradients (AdamW's kernel also streams two moment buffers).
    """
    optim = ort_training.onnxblock().optim
    if spec.name == "adamw":
        return optim.AdamW(bias_correction=True, betas=(0.9, 0.999), eps=1e-8, weight_decay=spec.effective_weight_decay)
    if spec.name == "sgd":
        if not 0.0 <= spec.momentum < 1.0:
            raise UnsupportedModelError(f"--momentum must be in [0, 1), got {spec.momentum}")
        if spec.momentum == 0.0:
            return optim.SGD()
        return optim.AdamW(bias_correction=False, betas=(spec.momentum, 1.0), eps=1.0, weight_decay=0.0)
    raise UnsupportedModelError(f"unknown optimizer {spec.name!r} (choose from {', '.join(OPTIMIZERS)})")


def loss_type(name: str):
    artifacts = ort_training.artifacts()
    types = {
        "cross_entropy": artifacts.LossType.CrossEntropyLoss,
        "mse": artifacts.LossType.MSELoss,
        "bce": artifacts.LossType.BCEWithLogitsLoss,
        "l1": artifacts.LossType.L1Loss,
    }
    if name not in types:
        raise UnsupportedModelError(f"unknown loss {name!r} (choose from {', '.join(LOSSES)})")
    return types[name]


def accumulation_buffer_name(param: str) -> str:
    """onnxruntime-training's name for the graph input that accumulates ``param``'s gradient."""
    return f"{param}_grad.accumulation.buffer"


@contextlib.contextmanager
def captured_native_stderr():
    """Redirect file descriptor 2 (where onnxruntime's C++ logger writes) into a buffer.

    Yields a list that holds the captured text once the block exits.
    """
    captured: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        try:
            os.dup2(sink.fileno(), 2)
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace"))


def _gradient_failure(log: str, error: Exception) -> UnsupportedModelError:
    """Turn a gradient-building failure into a message naming the op when we can find it."""
    text = f"{error}\n{log}"
    missing = re.search(r"has not been registered: (\w+) for node (\S+)", text)
    if missing:
        op, node = missing.groups()
        return UnsupportedModelError(
            f"onnxruntime-training has no gradient for op {op} (node {node}) in the trained part; "
            "train fewer layers (--layers) so it stays frozen"
        )
    for line in text.splitlines():
        if "GetGradientForOp" in line or "gradient" in line.lower() and "not" in line.lower():
            return UnsupportedModelError(f"onnxruntime-training cannot differentiate the trained part: {line.strip()[-200:]}")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UnsupportedModelError(f"onnxruntime-training could not build the training graph: {first[:300]}")


def generate(model: ir.Model, trainable: list[str], loss: str, optimizer: OptimizerSpec, directory: Path) -> None:
    """Write training, eval and optimizer models and the checkpoint into ``directory``.

    The training and eval models keep ``model``'s IR version (onnxblock copies the base
    model); the optimizer model is built from scratch with onnx's newest, so it alone is
    rewritten here (`cap_ir_version`). The eval model is final; the caller loads the
    training model to rewrite it and saves it with `save_model`.
    """
    artifacts = ort_training.artifacts()
    proto = ir.to_proto(model)  # onnxruntime-training takes a ModelProto
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    with captured_native_stderr() as log:
        try:
            artifacts.generate_artifacts(
                proto,
                requires_grad=list(trainable),
                # The model outputs (logits) stay visible next to the loss, for accuracy.
                additional_output_names=[output.name for output in proto.graph.output],
                frozen_params=[],
                loss=loss_type(loss),
                optimizer=optimizer_block(optimizer),
                artifact_directory=os.fspath(directory),
            )
            error = None
        except Exception as caught:  # onnxruntime raises bare RuntimeError / Fail / InvalidGraph
            error = caught
    if error is not None:
        raise _gradient_failure(log[0] if log else "", error) from None
    cap_ir_version(directory / FILES["optimizer_model"])


def cap_ir_version(path: Path) -> None:
    """Rewrite a model file with IR version <= MAX_IR_VERSION (ORT 1.19 refuses newer)."""
    proto = onnx.load(os.fspath(path), load_external_data=False)
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
        onnx.save(proto, os.fspath(path))


def save_model(model: ir.Model, path: Path) -> None:
    """Write ``model`` once, with IR version <= MAX_IR_VERSION (ORT 1.19 refuses newer)."""
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    ir.save(model, os.fspath(path))
