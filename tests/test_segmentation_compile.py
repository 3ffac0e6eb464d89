"""Compiling segmentation models (``--backend onnx``): per-pixel losses, manifest, export, gradients.

The step model's gradients (``gradient_outputs``) must equal torch autograd on
``F.cross_entropy(z, y, ignore_index=...)`` (or ``BCEWithLogitsLoss`` for a binary mask)
with the reference gradient filter swapped into the filtered convs, as
tests/test_onnx_backend.py checks classifiers. A small hand-built segmentation net
(dilated conv, image-pooling branch, bilinear upsampling) runs fast; whole torchvision
segmentation models (DeepLabV3 and LRASPP on MobileNetV3, FCN on ResNet-50) are marked slow.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchref
from onnx_step_run import step_gradients
from test_whole_model import export

from gfcompiler.cli import main as gfc_main
from gfcompiler.driver import CompileOptions, compile_model
from gfcompiler.errors import InputError, UnsupportedModelError

STEP_OPTIONS = dict(backend="onnx", gradient_outputs=True)
TOLERANCE = 1e-4  # max |error| / max |torch gradient|, per parameter


class TinySegNet(nn.Module):
    """A DeepLab-like head in miniature: stride-2 stem, dilated conv, image pooling, bilinear upsampling."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.pool_conv = nn.Conv2d(8, 8, 1)
        self.project = nn.Conv2d(16, 8, 1)
        self.classifier = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        features = torch.relu(self.stem(x))
        context = torch.relu(self.dilated(features))
        pooled = torch.relu(self.pool_conv(F.adaptive_avg_pool2d(context, 1)))
        pooled = F.interpolate(pooled, size=context.shape[-2:], mode="bilinear", align_corners=False)
        mixed = torch.relu(self.project(torch.cat([context, pooled], dim=1)))
        return F.interpolate(self.classifier(mixed), size=x.shape[-2:], mode="bilinear", align_corners=False)


def _labels(rng, shape, classes: int, ignore_index: int = 255, ignored: float = 0.2) -> np.ndarray:
    """Random class indices with about ``ignored`` of the pixels (and at least one) set to ``ignore_index``."""
    labels = rng.integers(0, classes, shape).astype(np.int64)
    labels[rng.random(shape) < ignored] = ignore_index
    labels.flat[0] = ignore_index
    return labels


def _torch_loss(model: nn.Module, trained: list[nn.Parameter], x: np.ndarray, labels: np.ndarray, loss: str,
                ignore_index: int) -> float:
    """torch's per-pixel loss of ``model`` (float64) on the batch, back-propagated to ``trained`` (their ``.grad``).

    The other parameters are frozen, so autograd stops at the first trained conv, as the step model does.
    """
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for p in trained:
        p.requires_grad_(True)
    logits = model(torch.from_numpy(x).to(torch.float64))
    if loss == "bce":
        value = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(labels).to(torch.float64))
    else:
        value = F.cross_entropy(logits, torch.from_numpy(labels), reduction="mean", ignore_index=ignore_index)
    value.backward()
    return float(value.detach())


def _conv_parameters(onnx_path, model: torch.fx.GraphModule) -> dict[str, nn.Parameter]:
    """ONNX conv weight/bias initializer name -> the torch parameter, pairing Conv nodes and Conv2d modules in order.

    (Matching by value is ambiguous here: BN folding leaves many conv biases at ~1e-8.)
    """
    graph = onnx.load(str(onnx_path)).graph
    nodes = [node for node in graph.node if node.op_type == "Conv"]
    modules = [model.get_submodule(name) for name in torchref.conv_modules_in_order(model)]
    assert len(nodes) == len(modules)
    parameters = {}
    for node, module in zip(nodes, modules):
        parameters[node.input[1]] = module.weight
        if len(node.input) > 2 and node.input[2]:
            parameters[node.input[2]] = module.bias
    return parameters


def compile_and_compare(onnx_path, reference: torch.fx.GraphModule, out, *, layers, patch: int, x: np.ndarray,
                        labels: np.ndarray, loss: str = "cross_entropy", ignore_index: int | None = None) -> dict:
    """Compile ``onnx_path`` (the export of ``reference``), run one step, compare loss and gradients with torch (float64)."""
    manifest = compile_model(onnx_path, out, CompileOptions(layers=layers, patch=patch, loss=loss,
                                                            ignore_index=ignore_index, **STEP_OPTIONS))
    value, grads, values = step_gradients(out, x, labels)
    # float64: torch's float32 CPU conv backward drifts by up to 14% on fcn_resnet50's layer4 (measured
    # against float64), while the step model's gradients stay within 3e-5 of float64.
    model = copy.deepcopy(reference).double()
    parameters = _conv_parameters(onnx_path, model)
    for name, array in values.items():  # the same tensors on both sides
        np.testing.assert_allclose(array, parameters[name].detach().numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
    if patch > 0:
        filtered = {layer["name"] for layer in manifest["layers"] if layer["backward"] == "filtered"}
        convs, onnx_convs = torchref.conv_modules_in_order(model), [layer["name"] for layer in manifest["layers"]]
        assert len(convs) == len(onnx_convs)
        torchref.with_filtered_convs(model, [c for c, o in zip(convs, onnx_convs) if o in filtered], patch)
    torch_loss = _torch_loss(model, [parameters[name] for name in values], x, labels, loss,
                             255 if ignore_index is None else ignore_index)
    expected = {name: parameters[name].grad.numpy() for name in values}
    assert value == pytest.approx(torch_loss, rel=1e-5, abs=1e-6)
    assert set(grads) == set(manifest["trainable_params"])
    torchref.assert_gradients_close(grads, expected, TOLERANCE)
    return manifest


def run_export_model(directory, x: np.ndarray) -> dict[str, np.ndarray]:
    """The export model's outputs on ``x``, its trainable parameters filled in from the initial state."""
    manifest = json.loads((directory / "manifest.json").read_text())
    model = onnx.load(str(directory / manifest["files"]["export_model"]))
    state = np.load(directory / manifest["files"]["state"])
    model.graph.initializer.extend(onnx.numpy_helper.from_array(state[name], name) for name in manifest["trainable_params"])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {manifest["inputs"][0]["name"]: x})))


@pytest.fixture(scope="module")
def tiny_seg(tmp_path_factory):
    """(onnx path, BN-free reference module) of `TinySegNet` with 4 classes, input N×3×16×12."""
    torch.manual_seed(0)
    model = torchref.fused(TinySegNet(4).eval())
    path = tmp_path_factory.mktemp("tiny_seg") / "model.onnx"
    export(model, path, (2, 3, 16, 12))
    return path, model


@pytest.mark.parametrize("patch", [0, 2])
@pytest.mark.parametrize("ignore_index", [None, 0])
def test_tiny_net_per_pixel_gradients(tiny_seg, tmp_path, patch, ignore_index):
    path, model = tiny_seg
    rng = np.random.default_rng(patch)
    x = rng.standard_normal((2, 3, 16, 12)).astype(np.float32)
    labels = _labels(rng, (2, 16, 12), 4, 255 if ignore_index is None else ignore_index)
    manifest = compile_and_compare(path, model, tmp_path / "out", layers="all", patch=patch, x=x, labels=labels,
                                   ignore_index=ignore_index)
    assert manifest["totals"]["trained_layers"] == 5
    if patch:  # the dilated conv (dilation 2 >= r) and the 8×6 maps filter; the pooled 1×1 conv cannot
        filtered = {layer["name"] for layer in manifest["layers"] if layer["backward"] == "filtered"}
        assert len(filtered) == 4 and not any("pool_conv" in name for name in filtered)


def test_tiny_net_manifest_summary_and_export(tiny_seg, tmp_path, capsys):
    path, _ = tiny_seg
    out = tmp_path / "out"
    assert gfc_main(["compile", str(path), "-o", str(out), "--layers", "2", "--patch", "2", "--ignore-index", "7"]) == 0
    err = capsys.readouterr().err
    form = "per-pixel cross-entropy over 4 classes, mean over labelled pixels, ignore_index 7"
    assert f"gfc: loss: {form}\n" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["task"], manifest["ignore_index"], manifest["loss_form"]) == ("segmentation", 7, form)
    assert manifest["label"] == {"name": "labels", "shape": [None, 16, 12], "dtype": "int64"}
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 12)).astype(np.float32)
    outputs = run_export_model(out, x)
    assert list(outputs) == ["logits", "classes"]
    assert outputs["classes"].dtype == np.int64 and outputs["classes"].shape == (3, 16, 12)
    np.testing.assert_array_equal(outputs["classes"], outputs["logits"].argmax(1))


def test_summary_names_the_loss_form(tiny_seg, tmp_path, capsys):
    path, _ = tiny_seg
    assert gfc_main(["compile", str(path), "-o", str(tmp_path / "out"), "--layers", "1"]) == 0
    assert ("loss: per-pixel cross-entropy over 4 classes, mean over labelled pixels, ignore_index 255; "
            "label input 'labels': Nx16x12 int64") in capsys.readouterr().out


def test_batch_without_labelled_pixels_gives_zero_loss_and_gradient(tiny_seg, tmp_path):
    """torch: NaN loss, zero gradient; the step: loss 0 and the same zero gradient (training goes on)."""
    path, _ = tiny_seg
    out = tmp_path / "out"
    compile_model(path, out, CompileOptions(layers=3, patch=2, **STEP_OPTIONS))
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 12)).astype(np.float32)
    loss, grads, _ = step_gradients(out, x, np.full((2, 16, 12), 255, np.int64))
    assert loss == 0.0
    assert grads and all(not grad.any() for grad in grads.values())


def test_classifier_manifest_unchanged(tmp_path):
    """A classifier keeps N labels, its manifest gets no segmentation keys, its export model no class map."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    export(model, tmp_path / "model.onnx", (2, 3, 8, 8))
    out = tmp_path / "out"
    manifest = compile_model(tmp_path / "model.onnx", out, CompileOptions(layers=1, patch=0))
    assert manifest["label"] == {"name": "labels", "shape": [None], "dtype": "int64"}
    assert not {"task", "ignore_index", "loss_form"} & set(manifest)
    assert list(run_export_model(out, np.zeros((1, 3, 8, 8), np.float32))) == ["logits"]
    with pytest.raises(InputError, match="--ignore-index applies to per-pixel cross_entropy"):
        compile_model(tmp_path / "model.onnx", tmp_path / "out2", CompileOptions(layers=1, ignore_index=255))


def test_binary_mask_bce(tmp_path):
    """C = 1 with --loss bce: per-pixel BCE-with-logits as torch's, class map = logits > 0."""
    torch.manual_seed(1)
    model = torchref.fused(TinySegNet(1).eval())
    export(model, tmp_path / "model.onnx", (2, 3, 16, 12))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 16, 12)).astype(np.float32)
    mask = (rng.random((2, 1, 16, 12)) < 0.3).astype(np.float32)
    out = tmp_path / "out"
    manifest = compile_and_compare(tmp_path / "model.onnx", model, out, layers=3, patch=2, x=x, labels=mask, loss="bce")
    assert manifest["task"] == "segmentation" and "ignore_index" not in manifest
    assert manifest["loss_form"].startswith("per-pixel BCE-with-logits")
    assert manifest["label"] == {"name": "target", "shape": [None, 1, 16, 12], "dtype": "float32"}
    outputs = run_export_model(out, x)
    np.testing.assert_array_equal(outputs["classes"], (outputs["logits"][:, 0] > 0).astype(np.int64))


def test_ort_training_refuses_per_pixel_losses(tiny_seg, tmp_path):
    path, _ = tiny_seg
    with pytest.raises(UnsupportedModelError, match=r"--backend ort-training cannot train a segmentation output .*"
                                                   r"use --backend onnx \(the default\)$"):
        compile_model(path, tmp_path / "out", CompileOptions(layers=1, backend="ort-training"))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- torchvision models

# Trained convs per architecture: deeplabv3 trains the whole ASPP (1×1, dilations 12/24/36, the
# image-pooling branch GlobalAveragePool -> conv -> Resize up), the head and the backbone's last conv,
# whose gradient then flows back through every branch; lraspp trains its head (Sigmoid·Mul gate,
# bilinear Resize, two classifiers) and the backbone's last conv (through the gate's GlobalAveragePool);
# fcn_resnet50 trains layer4's last block (3×3 conv with dilation 4) and the FCN head.
TORCHVISION_CASES = {
    "deeplabv3_mobilenet_v3_large": dict(size=64, layers=9),
    "lraspp_mobilenet_v3_large": dict(size=64, layers=5),
    "fcn_resnet50": dict(size=32, layers=4),
}


@pytest.mark.slow
# Filtered (r = 4) on each; the exact backward (--patch 0) on the cheapest, to keep these near a minute.
@pytest.mark.parametrize("arch,patch", [(arch, 4) for arch in TORCHVISION_CASES] + [("lraspp_mobilenet_v3_large", 0)])
def test_torchvision_segmentation_gradients(torchvision_segmentation, tmp_path, arch, patch):
    case = TORCHVISION_CASES[arch]
    path, module = torchvision_segmentation(arch, size=case["size"], num_classes=3, batch=2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, case["size"], case["size"])).astype(np.float32)
    labels = _labels(rng, (2, case["size"], case["size"]), 3)
    manifest = compile_and_compare(path, torchref.fused(module), tmp_path / "out", layers=case["layers"], patch=patch,
                                   x=x, labels=labels)
    assert manifest["task"] == "segmentation" and manifest["label"]["shape"] == [2, case["size"], case["size"]]
    trained = [layer for layer in manifest["layers"] if layer["trained"]]
    assert len(trained) == case["layers"]
    if patch:
        filtered = [layer for layer in trained if layer["backward"] == "filtered"]
        assert any(max(layer["dilations"]) >= patch for layer in filtered) or arch == "lraspp_mobilenet_v3_large"
        assert manifest["totals"]["backward_macs"] < manifest["totals"]["backward_macs_exact"]
