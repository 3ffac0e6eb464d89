"""Graph forms real users bring: NHWC inputs, Resize, weights in Constant nodes, dynamic spatial dims."""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn as nn
import torchref
from onnx import helper
from test_whole_model import assert_gradients_match

from gfcompiler.driver import CompileOptions, compile_model
from gfcompiler.loading import InputShape


class NhwcNet(nn.Module):
    """Takes N×H×W×C (a Transpose in front, as TF-converted models do), upsamples with Resize."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = x.permute(0, 3, 1, 2)
        x = self.up(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
        return self.head(torch.sigmoid(self.conv3(x)).mean(dim=(2, 3)))


def test_nhwc_input_and_resize_in_trained_region(tmp_path):
    torch.manual_seed(0)
    manifest = assert_gradients_match(NhwcNet(), tmp_path, (2, 20, 18, 3), layers=2, patch=2, classes=4)
    assert manifest["totals"]["filtered_layers"] == 2


def _constants_instead_of_initializers(path, out_path):
    model = onnx.load(str(path))
    nodes = [helper.make_node("Constant", [], [init.name], value=init) for init in model.graph.initializer]
    del model.graph.initializer[:]
    original = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + original)
    onnx.save(model, str(out_path))


def test_weights_in_constant_nodes_compile_like_initializers(tmp_path):
    torch.manual_seed(0)
    model = torchref.fused(NhwcNet())
    torch.onnx.export(model, torch.randn(1, 20, 18, 3), str(tmp_path / "init.onnx"), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"])
    _constants_instead_of_initializers(tmp_path / "init.onnx", tmp_path / "const.onnx")
    assert not onnx.load(str(tmp_path / "const.onnx")).graph.initializer
    results = []
    x = np.random.default_rng(0).standard_normal((1, 20, 18, 3)).astype(np.float32)
    for name in ("init", "const"):
        compile_model(tmp_path / f"{name}.onnx", tmp_path / f"out_{name}",
                      CompileOptions(layers=2, patch=2, backend="ort-training"))
        results.append(torchref.ort_gradients(tmp_path / f"out_{name}", x, np.array([1], np.int64)))
    (loss_a, grads_a, _), (loss_b, grads_b, _) = results
    assert loss_a == loss_b
    assert sorted(grads_a) == sorted(grads_b)
    for name in grads_a:
        np.testing.assert_array_equal(grads_a[name], grads_b[name])


def test_dynamic_spatial_dims_with_input_shape(tmp_path):
    torch.manual_seed(0)
    model = torchref.fused(NhwcNet())
    torch.onnx.export(model, torch.randn(1, 20, 18, 3), str(tmp_path / "dyn.onnx"), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N", 1: "H", 2: "W"}})
    options = CompileOptions(layers=2, patch=2, input_shapes=[InputShape.parse("input=N,20,18,3")],
                             backend="ort-training")
    manifest = compile_model(tmp_path / "dyn.onnx", tmp_path / "out", options)
    assert manifest["inputs"][0]["shape"] == [None, 20, 18, 3]
    assert manifest["totals"]["filtered_layers"] == 2
    loss, grads, _ = torchref.ort_gradients(tmp_path / "out", np.zeros((3, 20, 18, 3), np.float32), np.zeros(3, np.int64))
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in grads.values())


def test_1d_convs_keep_the_exact_backward_with_a_reason(tmp_path):
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 14, 3)).eval()
    torch.onnx.export(model, torch.randn(1, 2, 16), str(tmp_path / "m.onnx"), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"])
    manifest = compile_model(tmp_path / "m.onnx", tmp_path / "out",
                             CompileOptions(layers=2, patch=2, backend="ort-training"))
    for layer in manifest["layers"]:
        assert layer["backward"] == "exact" and layer["reason"] == "1-D convolution (only 2-D convs are filtered)"
    loss, grads, _ = torchref.ort_gradients(tmp_path / "out", np.ones((1, 2, 16), np.float32), np.zeros(1, np.int64))
    assert np.isfinite(loss) and len(grads) == 6
