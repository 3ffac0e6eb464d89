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
        filtered = [layer["name"] for layer in manifest["layers"] if layer["backward"] == "filtered"]
        convs = torchref.conv_modules_in_order(model_copy)
        assert len(filtered) == layers, manifest["layers"]
        torchref.with_filtered_convs(model_copy, convs[-layers:], patch)
    torch_loss, pairs = torchref.torch_gradients(model_copy, x, labels)
    expected = torchref.match_by_value(values, pairs)
    assert loss == pytest.approx(torch_loss, rel=1e-5, abs=1e-6)
    assert set(grads) == set(manifest["trainable_params"])
    for name, grad in grads.items():
        scale = np.abs(expected[name]).max() + 1e-12
        error = np.abs(grad - expected[name]).max() / scale
        assert error < tolerance, f"{name}: relative gradient error {error:.2e}"
    return manifest, out


@pytest.mark.parametrize("patch", [0, 1, 2, 4, 7])
@pytest.mark.parametrize("layers", [1, 3, 4])
def test_small_net_gradients(tmp_path, layers, patch):
    torch.manual_seed(0)
    _compile_and_compare(SmallNet(), tmp_path, (3, 3, 29, 27), layers, patch, classes=10)


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
        if patch:
            assert manifest["totals"]["filtered_layers"] == 4
            assert manifest["totals"]["held_bytes"] < manifest["totals"]["held_bytes_exact"]
