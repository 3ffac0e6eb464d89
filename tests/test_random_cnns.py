"""Property: random small CNNs either compile with gradients matching the reference, or are refused cleanly.

Hypothesis draws conv stacks with random kernels, strides, pads, groups, dilations,
activations, residual adds and pooling; the compiled training graph's gradients are
compared with torch autograd where the trained convs carry the NumPy reference
operator (tests/torchref.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchref
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx_step_run import step_gradients

from gfcompiler.driver import CompileOptions, compile_model
from gfcompiler.errors import GfcError

ACTIVATIONS = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid,
    "silu": nn.SiLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "leaky": lambda: nn.LeakyReLU(0.1),
    "elu": nn.ELU, "softplus": nn.Softplus, "none": nn.Identity,
}


class Block(nn.Module):
    def __init__(self, conv: nn.Conv2d, bn: bool, act: str, residual: bool, pool: str):
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(conv.out_channels) if bn else nn.Identity()
        self.act = ACTIVATIONS[act]()
        self.residual = residual
        # Floor mode: onnxruntime's ceil-mode AveragePool disagrees with torch at the border.
        self.pool = {"none": nn.Identity(), "max": nn.MaxPool2d(2), "avg": nn.AvgPool2d(2)}[pool]

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        if self.residual:
            y = y + x
        return self.pool(y)


SIZE = 24


@st.composite
def random_cnn(draw):
    """(blocks, final channels, layers to train, patch, seed) for a SIZE×SIZE input."""
    channels = draw(st.sampled_from([3, 4, 6]))
    in_channels = channels
    h = w = SIZE
    blocks = []
    for _ in range(draw(st.integers(2, 5))):
        groups_choice = draw(st.sampled_from(["one", "depthwise", "two", "multiplier"]))
        if groups_choice == "depthwise":
            out, groups = channels, channels
        elif groups_choice == "multiplier":
            out, groups = channels * 2, channels
        elif groups_choice == "two" and channels % 2 == 0:
            out, groups = draw(st.sampled_from([4, 6, 8])), 2
        else:
            out, groups = draw(st.sampled_from([4, 6, 8])), 1
        kernel = (draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([1, 3])))
        stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        dilation = draw(st.sampled_from([1, 1, 2, 3]))
        padding = tuple(draw(st.integers(0, (kernel[i] - 1) * dilation // 2 + 1)) for i in range(2))
        effective = [(kernel[i] - 1) * dilation + 1 for i in range(2)]
        out_h = (h + 2 * padding[0] - effective[0]) // stride[0] + 1
        out_w = (w + 2 * padding[1] - effective[1]) // stride[1] + 1
        if min(out_h, out_w) < 2:
            break
        residual = out == channels and (out_h, out_w) == (h, w) and draw(st.booleans())
        pool = draw(st.sampled_from(["none", "none", "max", "avg"])) if min(out_h, out_w) >= 6 else "none"
        conv = nn.Conv2d(channels, out, kernel, stride, padding, dilation, groups, bias=draw(st.booleans()))
        blocks.append(Block(conv, draw(st.booleans()), draw(st.sampled_from(sorted(ACTIVATIONS))), residual, pool))
        channels, h, w = out, out_h, out_w
        if pool != "none":
            h, w = h // 2, w // 2
    layers = draw(st.integers(1, max(1, len(blocks))))
    patch = draw(st.sampled_from([1, 2, 3, 4, 7]))
    return blocks, in_channels, channels, layers, patch, draw(st.integers(0, 1000))


class Net(nn.Module):
    def __init__(self, blocks, channels):
        super().__init__()
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, 5)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(random_cnn())
def test_random_cnn_compiles_with_reference_gradients_or_refuses(case):
    check_random_cnn(case, "ort-training", tolerance=5e-3)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(random_cnn())
def test_random_cnn_onnx_backend_gradients_or_refuses(case):
    """The compiler's own backward (``--backend onnx``): within float32 rounding of the reference."""
    check_random_cnn(case, "onnx", tolerance=1e-4)


def check_random_cnn(case, backend: str, tolerance: float) -> None:
    blocks, in_channels, channels, layers, patch, seed = case
    if not blocks:
        event("no block fits")
        return
    torch.manual_seed(seed)
    model = Net(blocks, channels).eval()
    torchref.randomize_batchnorm(model, seed)
    x_shape = (2, in_channels, SIZE, SIZE)
    fused = torchref.fused(model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.onnx.export(fused, torch.randn(*x_shape), str(tmp / "m.onnx"), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"])
        try:
            manifest = compile_model(tmp / "m.onnx", tmp / "out", CompileOptions(
                layers=layers, patch=patch, backend=backend, gradient_outputs=backend == "onnx"))
        except GfcError as error:
            message = str(error)
            assert "\n" not in message and message, message
            event(f"refused: {message[:60]}")
            return
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(x_shape).astype(np.float32)
        y = rng.integers(0, 5, 2).astype(np.int64)
        if backend == "onnx":
            _, grads, values = step_gradients(tmp / "out", x, y)
        else:
            _, grads, values = torchref.ort_gradients(tmp / "out", x, y)
    reference = torchref.fused(model)
    names = torchref.conv_modules_in_order(reference)
    filtered_layers = {layer["name"] for layer in manifest["layers"] if layer["backward"] == "filtered"}
    onnx_convs = [layer["name"] for layer in manifest["layers"]]
    assert len(onnx_convs) == len(names)
    to_filter = [torch_name for torch_name, onnx_name in zip(names, onnx_convs) if onnx_name in filtered_layers]
    torchref.with_filtered_convs(reference, to_filter, patch)
    _, pairs = torchref.torch_gradients(reference, x, y)
    expected = torchref.match_by_value(values, pairs)
    for name, grad in grads.items():
        error = np.abs(grad - expected[name]).max() / (np.abs(expected[name]).max() + 1e-6)
        assert error < tolerance, (name, error, manifest["layers"])
    event(f"compared: {len(blocks)} blocks, {len(to_filter)} filtered of {layers} trained")
