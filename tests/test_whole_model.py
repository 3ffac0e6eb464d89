"""Whole models: gradients of compiled artifacts against torch autograd.

Filtered layers must match torch with the NumPy reference operator swapped into the
same convs (so the filtered gradients chain exactly as docs/operator.md says); with
``--patch 0`` every gradient must match plain torch autograd (the exact backward).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchref
from stages import module_inputs

from gfcompiler import ort_training
from gfcompiler.driver import CompileOptions, compile_model


def export(model: torch.nn.Module, path, input_shape) -> None:
    torch.onnx.export(
        model, torch.randn(*input_shape), str(path), dynamo=False, opset_version=17,
        input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
    )


def assert_gradients_match(model: torch.nn.Module, tmp_path, input_shape, layers: int, patch: int, classes: int, seed=0):
    torchref.randomize_batchnorm(model, seed)
    reference_model = torchref.fused(model)
    export(reference_model, tmp_path / "model.onnx", input_shape)
    out = tmp_path / f"out_{layers}_{patch}"
    manifest = compile_model(tmp_path / "model.onnx", out, CompileOptions(layers=layers, patch=patch, backend="ort-training"))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(input_shape).astype(np.float32)
    labels = rng.integers(0, classes, input_shape[0]).astype(np.int64)
    loss, grads, values = torchref.ort_gradients(out, x, labels)

    model_copy = copy.deepcopy(reference_model)
    if patch > 0:
        filtered = [layer["name"] for layer in manifest["layers"] if layer["backward"] == "filtered"]
        convs = torchref.conv_modules_in_order(model_copy)
        assert len(filtered) == layers, manifest["layers"]
        torchref.with_filtered_convs(model_copy, convs[-layers:], patch)
    torch_loss, pairs = torchref.torch_gradients(model_copy, x, labels)
    expected = torchref.match_by_value(values, pairs)

    assert loss == pytest.approx(torch_loss, rel=1e-4, abs=1e-5)
    assert set(grads) == set(manifest["trainable_params"])
    torchref.assert_gradients_close(grads, expected, 2e-3, floor=1e-6)
    return manifest


class SmallNet(nn.Module):
    """Exercises: BN folding, stride 2, depthwise, grouped, dilated, 1x1, residual add, no-bias conv."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.ReLU())
        self.grouped = nn.Conv2d(24, 24, 3, padding=2, dilation=2, groups=4, bias=False)
        self.pointwise = nn.Conv2d(24, 32, 1)
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = self.down(self.stem(x))
        x = self.depthwise(x) + x
        x = torch.relu(self.grouped(x))
        x = self.pointwise(x)
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("patch", [0, 1, 2, 4, 7])
@pytest.mark.parametrize("layers", [1, 3, 4])
def test_small_net_gradients(tmp_path, layers, patch):
    torch.manual_seed(0)
    assert_gradients_match(SmallNet(), tmp_path, (3, 3, 29, 27), layers, patch, classes=10)


def test_training_step_lowers_loss(tmp_path):
    torch.manual_seed(0)
    model = torchref.fused(SmallNet())
    export(model, tmp_path / "model.onnx", (8, 3, 32, 32))
    out = tmp_path / "out"
    compile_model(tmp_path / "model.onnx", out, CompileOptions(layers=3, patch=2, backend="ort-training"))
    api = ort_training.api()
    state = api.CheckpointState.load_checkpoint(str(out / "checkpoint"))
    module = api.Module(str(out / "training_model.onnx"), state, str(out / "eval_model.onnx"), device="cpu")
    optimizer = api.Optimizer(str(out / "optimizer_model.onnx"), module)
    optimizer.set_learning_rate(1e-2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 8).astype(np.int64)
    module.train()
    losses = []
    for _ in range(5):
        module.lazy_reset_grad()
        losses.append(float(module(*module_inputs(out, module, x, y))[0]))  # outputs: (loss, logits)
        optimizer.step()
    assert losses[-1] < losses[0] * 0.9, losses


def _torchvision(arch: str, classes: int) -> nn.Module:
    import models  # tests/models.py: torchvision without its compiled ops

    return models.torchvision_module(arch, num_classes=classes)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
def test_torchvision_last4_gradients(tmp_path, arch):
    torch.manual_seed(0)
    model = _torchvision(arch, 10)
    for patch in (0, 2, 4, 7):
        manifest = assert_gradients_match(model, tmp_path, (2, 3, 224, 224), 4, patch, classes=10)
        if patch:
            totals = manifest["totals"]
            assert totals["filtered_layers"] == 4
            assert totals["backward_macs"] < totals["backward_macs_exact"] / 2


def test_unused_maxpool_indices_are_dropped(tmp_path):
    """A frozen MaxPool must not compute indices nobody reads (a ~20x slower kernel in ORT)."""
    import onnx

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    export(model, tmp_path / "m.onnx", (1, 3, 16, 16))
    # Single graph: two-stage artifacts run the frozen pool in the prefix's inference session.
    compile_model(tmp_path / "m.onnx", tmp_path / "out", CompileOptions(layers=1, patch=2, single_graph=True, backend="ort-training"))
    pools = [n for n in onnx.load(str(tmp_path / "out" / "training_model.onnx")).graph.node if n.op_type == "MaxPool"]
    assert pools and all(len(n.output) == 1 for n in pools)
