"""``--backend onnx``: the compiler's own backward against torch autograd and onnxruntime-training.

The step model's gradients (exposed with ``gradient_outputs``) must equal plain torch
autograd with ``--patch 0`` and torch with the reference operator swapped into the
filtered convs otherwise (as tests/test_whole_model.py checks the ort-training
backend), and the two backends must agree with each other on the same model.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torchref
from onnx_step_run import step_gradients
from test_whole_model import SmallNet, export

from gfcompiler.driver import CompileOptions, compile_model

STEP_OPTIONS = dict(backend="onnx", gradient_outputs=True)


def _compile_and_compare(model: nn.Module, tmp_path, input_shape, layers: int, patch: int, classes: int, seed=0,
                         tolerance=1e-4):
    torchref.randomize_batchnorm(model, seed)
    reference_model = torchref.fused(model)
    export(reference_model, tmp_path / "model.onnx", input_shape)
    out = tmp_path / f"onnx_{layers}_{patch}"
    manifest = compile_model(tmp_path / "model.onnx", out, CompileOptions(layers=layers, patch=patch, **STEP_OPTIONS))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(input_shape).astype(np.float32)
    labels = rng.integers(0, classes, input_shape[0]).astype(np.int64)
    loss, grads, values = step_gradients(out, x, labels)

    model_copy = copy.deepcopy(reference_model)
    if patch > 0:
        filtered = {layer["name"] for layer in manifest["layers"] if layer["backward"] == "filtered"}
        convs = torchref.conv_modules_in_order(model_copy)
        onnx_convs = [layer["name"] for layer in manifest["layers"]]
        assert len(convs) == len(onnx_convs)
        torchref.with_filtered_convs(model_copy, [c for c, o in zip(convs, onnx_convs) if o in filtered], patch)
    torch_loss, pairs = torchref.torch_gradients(model_copy, x, labels)
    expected = torchref.match_by_value(values, pairs)
    assert loss == pytest.approx(torch_loss, rel=1e-5, abs=1e-6)
    assert set(grads) == set(manifest["trainable_params"])
    torchref.assert_gradients_close(grads, expected, tolerance)
    return manifest, out


@pytest.mark.parametrize("patch", [0, 1, 2, 4, 7])
@pytest.mark.parametrize("layers", [1, 3, 4])
def test_small_net_gradients(tmp_path, layers, patch):
    torch.manual_seed(0)
    manifest, _ = _compile_and_compare(SmallNet(), tmp_path, (3, 3, 29, 27), layers, patch, classes=10)
    assert manifest["totals"]["filtered_layers"] == (layers if patch else 0)


def test_step_model_uses_default_domain_ops_only(tmp_path):
    torch.manual_seed(0)
    manifest, out = _compile_and_compare(SmallNet(), tmp_path, (2, 3, 32, 32), 4, 4, classes=10)
    for name in ("step_model", "eval_model", "export_model"):
        model = onnx.load(str(out / manifest["files"][name]))
        domains = {node.domain for node in model.graph.node}
        assert domains <= {"", "ai.onnx"}, (name, domains)
    assert manifest["backend"] == "onnx"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
def test_torchvision_last4_gradients(tmp_path, arch):
    import models  # tests/models.py: torchvision without its compiled ops

    torch.manual_seed(0)
    model = models.torchvision_module(arch, num_classes=10)
    for patch in (0, 4):
        manifest, _ = _compile_and_compare(model, tmp_path, (2, 3, 224, 224), 4, patch, classes=10)
        assert manifest["totals"]["filtered_layers"] == (4 if patch else 0)
        if patch:
            assert manifest["totals"]["filtered_layers"] == 4
            totals = manifest["totals"]
            assert totals["held_bytes"] < totals["held_bytes_exact"]
            # The filtered convs keep their X_sum (small, never zero) instead of X.
            assert 0 < totals["trained_convs_held_bytes"] < totals["trained_convs_held_bytes_exact"] / 4
            assert not totals["held_bytes_unknown"]


@pytest.mark.parametrize("patch", [0, 4])
def test_backends_agree(tmp_path, patch):
    """The same model compiled for both backends: equal loss and gradients (ort-training's ConvGrad vs ours)."""
    pytest.importorskip("onnxruntime.training.api", reason="needs onnxruntime-training")
    torch.manual_seed(1)
    model = torchref.fused(SmallNet())
    export(model, tmp_path / "model.onnx", (2, 3, 32, 32))
    onnx_out, ort_out = tmp_path / "onnx", tmp_path / "ort"
    compile_model(tmp_path / "model.onnx", onnx_out, CompileOptions(layers=4, patch=patch, **STEP_OPTIONS))
    compile_model(tmp_path / "model.onnx", ort_out, CompileOptions(layers=4, patch=patch, backend="ort-training"))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, 2).astype(np.int64)
    loss, grads, _ = step_gradients(onnx_out, x, labels)
    ort_loss, ort_grads, _ = torchref.ort_gradients(ort_out, x, labels)
    assert loss == pytest.approx(ort_loss, rel=1e-5)
    assert set(grads) == set(ort_grads)
    for name in grads:
        scale = np.abs(ort_grads[name]).max() + 1e-12
        assert np.abs(grads[name] - ort_grads[name]).max() / scale < 1e-4, name


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_trainer_steps_equal_torch_optim(tmp_path, optimizer):
    """Three Trainer steps on compiled artifacts move the parameters exactly as torch.optim does."""
    from gfcompiler.artifacts import OptimizerSpec
    from gfcompiler.runtime import Trainer

    torch.manual_seed(2)
    model = torchref.fused(SmallNet())
    export(model, tmp_path / "model.onnx", (2, 3, 32, 32))
    spec = OptimizerSpec(name=optimizer, momentum=0.9, weight_decay=5e-4 if optimizer == "sgd" else 0.01)
    compile_model(tmp_path / "model.onnx", tmp_path / "out",
                  CompileOptions(layers=2, patch=0, optimizer=spec, backend="onnx"))
    trainer = Trainer(tmp_path / "out")
    start = {name: value for name, value in trainer.parameters().items() if name in trainer.artifacts.trainable_params}
    torch_of = {name: next(p for p in model.parameters() if p.shape == v.shape and np.array_equal(p.detach().numpy(), v))
                for name, v in start.items()}
    trained = list(torch_of.values())
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in trained))
    torch_optimizer = (torch.optim.SGD(trained, lr=0.05, momentum=0.9, weight_decay=5e-4) if optimizer == "sgd"
                       else torch.optim.AdamW(trained, lr=0.01, weight_decay=0.01))
    rng = np.random.default_rng(4)
    for step in range(3):
        x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
        y = rng.integers(0, 10, 2).astype(np.int64)
        lr = (0.05 if optimizer == "sgd" else 0.01) / (step + 1)
        for group in torch_optimizer.param_groups:
            group["lr"] = lr
        loss = trainer.step(x, y, lr=lr)
        torch_optimizer.zero_grad()
        torch_loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        torch_loss.backward()
        torch_optimizer.step()
        assert loss == pytest.approx(float(torch_loss), rel=1e-5)
    after = trainer.parameters()
    for name, p in torch_of.items():
        expected = p.detach().numpy()
        assert not np.allclose(expected, start[name]), f"{name} did not move"
        assert np.allclose(after[name], expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max()), name


@pytest.mark.parametrize("patch", [2, 4])
def test_global_pool_head_gradient_stays_small(tmp_path, patch):
    """Conv → GlobalAveragePool: the filter reads the N×C×1×1 gradient, never its full-size broadcast."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1, stride=2),
                          nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 5, 1), nn.Flatten()).eval()
    manifest, out = _compile_and_compare(model, tmp_path, (2, 3, 21, 19), 3, patch, classes=5)
    assert [layer["backward"] for layer in manifest["layers"]] == ["filtered", "filtered", "exact"]
    step = onnx.load(str(out / manifest["files"]["step_model"]))
    backward = [n for n in step.graph.node if any(p.key == "gfc.phase" and p.value == "backward" for p in n.metadata_props)]
    last = [n for n in backward if any(p.key == "gfc.layer" and p.value == "/1/Conv" for p in n.metadata_props)]
    assert last and not [n for n in last if n.op_type == "AveragePool"], "dY of the last conv was averaged at full size"
    assert not [n for n in backward if n.op_type == "Expand" and n.name.startswith("/2/")], "GAP's gradient was broadcast"


@pytest.mark.parametrize("patch", [0, 2])
def test_conv_transpose_in_the_trained_region(tmp_path, patch):
    """A decoder-style ConvTranspose (stride 2, output padding, groups) between trained convs."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2), nn.ReLU(),
                          nn.Conv2d(6, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    manifest, _ = _compile_and_compare(model, tmp_path, (2, 3, 12, 10), 2, patch, classes=5)
    # The transposed conv's weight and bias ("3.*") train between the two trained convs.
    assert manifest["trainable_params"] == ["2.weight", "2.bias", "3.weight", "3.bias", "5.weight", "5.bias"]


class DetectionHead(nn.Module):
    """Detection/segmentation-head ops between trained convs: Split, Sigmoid·Mul, Concat, Resize, Transpose, MaxPool."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.fuse = nn.Conv2d(16, 10, 3, padding=1)
        self.out = nn.Conv2d(10, 6, 1)

    def forward(self, x):
        a = torch.relu(self.stem(x))
        b = self.down(a)
        gate, value = torch.split(b, [4, 8], dim=1)
        b = torch.sigmoid(gate).repeat(1, 2, 1, 1) * value
        b = nn.functional.interpolate(b, scale_factor=2, mode="bilinear", align_corners=False)
        c = self.fuse(torch.cat([a, b], dim=1))
        c = nn.functional.max_pool2d(torch.tanh(c), 2)
        c = nn.functional.interpolate(c, scale_factor=2, mode="nearest")
        y = self.out(c).permute(0, 2, 3, 1).reshape(x.shape[0], -1, 6).mean(dim=1)
        return y


@pytest.mark.parametrize("patch", [0, 2])
def test_detection_head_ops(tmp_path, patch):
    torch.manual_seed(5)
    manifest, _ = _compile_and_compare(DetectionHead().eval(), tmp_path, (2, 3, 16, 12), 3, patch, classes=6)
    assert manifest["totals"]["trained_layers"] == 3
