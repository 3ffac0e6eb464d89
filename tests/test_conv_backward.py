"""The exact conv backward of `gfcompiler.onnx_step.conv_backward` against torch autograd.

Each case builds a Conv node (so `ConvAttrs.from_node` is exercised too), then a model
with inputs (dY, X, W) and outputs (dX, dW, dB) from `build_exact_conv_backward`, runs
it in an onnxruntime InferenceSession and compares with ``conv2d(...).backward(dY)``.

Tolerance: the gradients are bilinear with nonnegative coefficients, so torch's
float64 gradients of |dY|, |X|, |W| bound, element by element, the magnitude the
float32 rounding error scales with; outputs must agree to 1e-4 of it (inputs whose
gradient is exactly zero, rows the stride skips, must come out exactly zero).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gfcompiler.emit import Emitter
from gfcompiler.onnx_step import conv_backward as cb
from gfcompiler.onnx_step.conv_backward import ConvAttrs, build_exact_conv_backward

RTOL = 1e-4
F32 = ir.TensorType(ir.DataType.FLOAT)


def _value(name: str, shape) -> ir.Value:
    return ir.Value(name=name, type=F32, shape=ir.Shape(list(shape)))


def conv_node(x_shape, w_shape, **attributes) -> ir.Node:
    """A lone Conv node over inputs of the given shapes (None in x_shape: a dynamic batch)."""
    x = _value("X", [d if d is not None else "N" for d in x_shape])
    w = _value("W", w_shape)
    return ir.node("Conv", [x, w], attributes=attributes, name="conv")


def backward_model(conv: ConvAttrs, needs=(True, True, True), validate: bool = False) -> bytes:
    n = conv.batch if conv.batch is not None else "N"
    spatial_x = (conv.height, conv.width) if conv.rank == 2 else (conv.width,)
    spatial_y = (conv.out_height, conv.out_width) if conv.rank == 2 else (conv.out_width,)
    kernel = conv.kernel if conv.rank == 2 else conv.kernel[1:]
    dy = _value("dY", [n, conv.out_channels, *spatial_y])
    x = _value("X", [n, conv.in_channels, *spatial_x])
    w = _value("W", [conv.out_channels, conv.in_per_group, *kernel])
    tape = ir.tape.Tape()
    grads = build_exact_conv_backward(
        Emitter(tape, "conv/grad"), dy, x, w, conv,
        needs_input_grad=needs[0], needs_weight_grad=needs[1], needs_bias_grad=needs[2],
    )
    outputs = []
    for name, grad, needed, like in zip(("dX", "dW", "dB"), grads, needs, (x.shape, w.shape, [conv.out_channels])):
        assert (grad is not None) == needed, name
        if grad is not None:
            grad.type, grad.shape = F32, ir.Shape(list(like))
            outputs.append(grad)
    graph = ir.Graph([dy, x, w], outputs, nodes=tape.nodes, initializers=tape.initializers,
                     opset_imports={"": 17}, name="conv_backward")
    for node in graph:
        assert node.domain == "", node
    proto = ir.to_proto(ir.Model(graph, ir_version=8))
    if validate:  # valid opset-17 ONNX whose shape inference agrees with the gradients' shapes
        onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def _session(model: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def torch_grads(conv: ConvAttrs, dy, x, w) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 (dX, dW, dB) of conv2d/conv1d (asymmetric pads applied by F.pad first)."""
    tx = torch.from_numpy(x).double().requires_grad_()
    tw = torch.from_numpy(w).double().requires_grad_()
    tb = torch.zeros(conv.out_channels, dtype=torch.float64, requires_grad=True)
    top, left, bottom, right = conv.pads
    if conv.rank == 2:
        y = torch.nn.functional.conv2d(
            torch.nn.functional.pad(tx, (left, right, top, bottom)), tw, tb, conv.strides, 0, conv.dilations, conv.group
        )
    else:
        y = torch.nn.functional.conv1d(
            torch.nn.functional.pad(tx, (left, right)), tw, tb, conv.strides[1], 0, conv.dilations[1], conv.group
        )
    y.backward(torch.from_numpy(dy).double())
    return tx.grad.numpy(), tw.grad.numpy(), tb.grad.numpy()


def check(conv: ConvAttrs, batch: int, needs=(True, True, True), seed: int = 0, validate: bool = False) -> None:
    rng = np.random.default_rng(seed)
    squeeze = (lambda shape: shape) if conv.rank == 2 else (lambda shape: (*shape[:2], *shape[3:]))
    x = rng.standard_normal(squeeze((batch, conv.in_channels, conv.height, conv.width))).astype(np.float32)
    w = rng.standard_normal(squeeze(conv.weight_shape)).astype(np.float32)
    dy = rng.standard_normal(squeeze((batch, conv.out_channels, conv.out_height, conv.out_width))).astype(np.float32)
    got = _session(backward_model(conv, needs, validate)).run(None, {"dY": dy, "X": x, "W": w})
    want = torch_grads(conv, dy, x, w)
    magnitude = torch_grads(conv, np.abs(dy), np.abs(x), np.abs(w))
    got = iter(got)
    for name, expected, mag, needed in zip(("dX", "dW", "dB"), want, magnitude, needs):
        if not needed:
            continue
        actual = next(got)
        assert actual.dtype == np.float32, name
        assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}; {conv}"
        error = np.abs(actual.astype(np.float64) - expected)
        bound = RTOL * mag
        worst = np.unravel_index(np.argmax(error - bound), error.shape)
        assert np.all(error <= bound), (
            f"{name} differs at {worst}: got {actual[worst]}, want {expected[worst]} "
            f"(magnitude {mag[worst]:.3g}); {conv}"
        )


def attrs(ci, co, hw, kernel, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1,
          batch: int | None = 2) -> ConvAttrs:
    """ConvAttrs through `ConvAttrs.from_node` of a Conv node with these attributes."""
    node = conv_node((batch, ci, *hw), (co, ci // group, *kernel), kernel_shape=list(kernel), strides=list(strides),
                     pads=list(pads), dilations=list(dilations), group=group)
    return ConvAttrs.from_node(node)


# ---------------------------------------------------------------------------- named cases

CASES = {
    # name: (ci, co, (h, w), kernel, strides, pads, dilations, group, batch)
    "3x3 s1 p1": (4, 6, (8, 9), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, 2),
    "3x3 s1 p1 batch1": (5, 4, (7, 6), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, 1),
    "3x3 s2 p1 even": (4, 6, (8, 10), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1, 3),
    "3x3 s2 p1 odd": (4, 6, (9, 11), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1, 3),
    "3x3 s2 uneven skip": (3, 5, (10, 12), (3, 3), (2, 2), (0, 0, 0, 0), (1, 1), 1, 2),
    "3x3 s(2,1)": (4, 4, (9, 7), (3, 3), (2, 1), (1, 1, 1, 1), (1, 1), 1, 2),
    "3x3 s3 rows skipped": (2, 3, (11, 13), (3, 3), (3, 3), (0, 1, 0, 0), (1, 1), 1, 2),
    "3x3 asym pads": (3, 4, (7, 8), (3, 3), (1, 1), (0, 2, 1, 0), (1, 1), 1, 2),
    "3x3 dil2": (3, 4, (9, 10), (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 1, 2),
    "3x3 dil2 s2": (3, 4, (12, 11), (3, 3), (2, 2), (1, 2, 2, 1), (2, 2), 1, 3),
    "3x3 dil(1,2) s(2,1)": (3, 4, (10, 9), (3, 3), (2, 1), (1, 0, 1, 2), (1, 2), 1, 2),
    "5x5 s1 p2": (3, 4, (9, 8), (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 1, 2),
    "5x5 s2 p2 odd": (3, 4, (11, 9), (5, 5), (2, 2), (2, 2, 2, 2), (1, 1), 1, 2),
    "1x3": (4, 5, (6, 9), (1, 3), (1, 1), (0, 1, 0, 1), (1, 1), 1, 2),
    "1x3 s2": (4, 5, (6, 10), (1, 3), (2, 2), (0, 1, 0, 0), (1, 1), 1, 2),
    "3x1 dil2": (4, 5, (10, 6), (3, 1), (1, 1), (2, 0, 2, 0), (2, 1), 1, 2),
    "1x1": (6, 8, (5, 7), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, 3),
    "1x1 batch1": (6, 8, (5, 7), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, 1),
    "1x1 s2 odd": (6, 8, (7, 9), (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1, 2),
    "1x1 s2 even": (6, 8, (8, 6), (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1, 2),
    "1x1 padded": (3, 4, (5, 5), (1, 1), (1, 1), (1, 0, 0, 1), (1, 1), 1, 2),
    "1x1 group2": (6, 4, (5, 7), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 2, 2),
    "group2 3x3": (4, 6, (7, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2, 2),
    "group2 3x3 batch1": (4, 6, (7, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2, 1),
    "group3 s2": (6, 9, (9, 8), (3, 3), (2, 2), (1, 0, 0, 1), (1, 1), 3, 3),
    "depthwise 3x3": (6, 6, (7, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 6, 2),
    "depthwise 3x3 batch1": (6, 6, (7, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 6, 1),
    "depthwise 3x3 s2 odd": (5, 5, (9, 9), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 5, 3),
    "depthwise 5x5 dil2": (4, 4, (12, 10), (5, 5), (1, 1), (4, 3, 4, 5), (2, 2), 4, 2),
    "depthwise x2 multiplier": (4, 8, (7, 6), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4, 2),
    "depthwise x3 multiplier s2": (3, 9, (9, 8), (3, 3), (2, 2), (0, 1, 1, 0), (1, 1), 3, 3),
    "depthwise 1x1": (5, 5, (4, 6), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 5, 2),
    "kernel covers input": (3, 4, (5, 5), (5, 5), (1, 1), (0, 0, 0, 0), (1, 1), 1, 2),
    # large enough for the size rules to pick the flipped-conv dX (and shifted dY columns)
    "large map": (8, 6, (20, 24), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, 2),
    "large map group2 dil2 asym": (8, 6, (18, 17), (3, 3), (1, 1), (2, 1, 1, 2), (2, 2), 2, 1),
    "large map depthwise": (6, 6, (17, 16), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 6, 2),
}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", list(CASES))
def test_named_case(name: str, dynamic: bool) -> None:
    ci, co, hw, kernel, strides, pads, dilations, group, batch = CASES[name]
    conv = attrs(ci, co, hw, kernel, strides, pads, dilations, group, None if dynamic else batch)
    check(conv, batch, validate=True)


# Every formulation the module can pick, forced on every named case it applies to (the
# module picks by size, and the small test convs alone would not reach them all).
FORMULATIONS = {
    "dX:convtranspose": ("_input_grad", lambda e, dy, w, c: cb._input_grad_conv_transpose(e, dy, w, c), None),
    "dX:flipped-conv": ("_input_grad", lambda e, dy, w, c: cb._input_grad_flipped_conv(e, dy, w, c),
                        lambda c: c.strides == (1, 1) and min(cb._flipped_conv_pads(c)) >= 0),
    "dW:gemm": ("_weight_grad", lambda e, dy, x, c: cb._weight_grad_gemm(e, dy, x, c, ()), None),
    "dW:gemm-A=X": ("_weight_grad", lambda e, dy, x, c: cb._weight_grad_gemm(e, dy, x, c, (), "X"), None),
    "dW:gemm-shift-cols": ("_weight_grad", lambda e, dy, x, c: cb._weight_grad_gemm(e, dy, x, c, (1,)),
                           lambda c: c.strides[1] == 1),
    "dW:gemm-shift-rows-A=X": ("_weight_grad", lambda e, dy, x, c: cb._weight_grad_gemm(e, dy, x, c, (0,), "X"),
                               lambda c: c.strides[0] == 1),
    "dW:gemm-shift-both": ("_weight_grad", lambda e, dy, x, c: cb._weight_grad_gemm(e, dy, x, c, (0, 1)),
                           lambda c: c.strides == (1, 1)),
    "dW:depthwise": ("_weight_grad", lambda e, dy, x, c: cb._weight_grad_depthwise(e, dy, x, c),
                     lambda c: c.in_per_group == 1),
}


@pytest.mark.parametrize("formulation", list(FORMULATIONS))
def test_every_formulation(formulation: str, monkeypatch) -> None:
    target, builder, applies = FORMULATIONS[formulation]
    monkeypatch.setattr(cb, target, builder)
    ran = 0
    for i, (ci, co, hw, kernel, strides, pads, dilations, group, batch) in enumerate(CASES.values()):
        conv = attrs(ci, co, hw, kernel, strides, pads, dilations, group, None if i % 2 else batch)
        if applies is None or applies(conv):
            check(conv, batch)
            ran += 1
    assert ran >= 5


def test_size_rules() -> None:
    """The size rules pick each dX and dW formulation where the measurements said so."""
    big = ConvAttrs(kernel=(3, 3), pads=(1, 1, 1, 1), batch=1, in_channels=128, height=120, width=160, out_channels=128)
    small = dataclasses.replace(big, batch=8, in_channels=512, out_channels=512, height=7, width=7)
    assert cb._shift_columns_pays(big) and not cb._shift_columns_pays(small)
    ci, co, hw, kernel, strides, pads, dilations, group, batch = CASES["large map"]
    tested = attrs(ci, co, hw, kernel, strides, pads, dilations, group, batch)
    assert cb._shift_columns_pays(tested)
    for conv, op in ((big, "Conv"), (small, "ConvTranspose"), (tested, "Conv")):
        tape = ir.tape.Tape()
        dx = cb._input_grad(Emitter(tape, "g"), _value("dY", [1]), _value("W", [1]), conv)
        assert dx.producer().op_type == op


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True)])
def test_only_needed_gradients(needs) -> None:
    check(attrs(4, 6, (7, 8), (3, 3), (2, 2), (1, 1, 1, 1), group=2), 2, needs)


# ---------------------------------------------------------------------------- property


@st.composite
def conv_configs(draw):
    kind = draw(st.sampled_from(["dense", "group", "depthwise", "multiplier"]))
    if kind == "dense":
        group, ci, co = 1, draw(st.integers(1, 5)), draw(st.integers(1, 5))
    elif kind == "group":
        group = draw(st.integers(2, 3))
        ci, co = group * draw(st.integers(1, 3)), group * draw(st.integers(1, 3))
    else:
        group = ci = draw(st.integers(1, 5))
        co = ci * (1 if kind == "depthwise" else draw(st.integers(2, 3)))
    kernel = draw(st.sampled_from([(1, 1), (3, 3), (5, 5), (1, 3), (3, 1), (2, 3)]))
    strides = draw(st.sampled_from([(1, 1), (2, 2), (2, 1), (1, 3), (3, 3)]))
    dilations = draw(st.sampled_from([(1, 1), (1, 1), (2, 2), (1, 2)]))
    pads = tuple(draw(st.integers(0, (k - 1) * d)) for k, d in zip(kernel * 2, dilations * 2))
    hw = tuple(
        draw(st.integers(max(1, (k - 1) * d + 1 - pads[i] - pads[i + 2]), 12))
        for i, (k, d) in enumerate(zip(kernel, dilations))
    )
    batch = draw(st.integers(1, 3))
    dynamic = draw(st.booleans())
    return (ci, co, hw, kernel, strides, pads, dilations, group), batch, dynamic


@settings(derandomize=True, database=None, deadline=None, max_examples=60,
          suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs())
def test_random_convs(config) -> None:
    (ci, co, hw, kernel, strides, pads, dilations, group), batch, dynamic = config
    conv = attrs(ci, co, hw, kernel, strides, pads, dilations, group, None if dynamic else batch)
    check(conv, batch)


# ---------------------------------------------------------------------------- ConvAttrs.from_node


def test_from_node_defaults() -> None:
    conv = ConvAttrs.from_node(conv_node((None, 3, 10, 12), (8, 3, 3, 3)))
    assert conv == ConvAttrs(kernel=(3, 3), batch=None, in_channels=3, height=10, width=12, out_channels=8)
    assert (conv.out_height, conv.out_width) == (8, 10)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("strides", [(1, 1), (2, 2), (3, 2)])
def test_from_node_auto_pad(auto_pad: str, strides) -> None:
    """Explicit pads from auto_pad give the output size onnxruntime's Conv gives, and a correct backward."""
    node = conv_node((2, 3, 9, 10), (4, 3, 3, 2), auto_pad=auto_pad, strides=list(strides))
    conv = ConvAttrs.from_node(node)
    if auto_pad != "VALID":
        assert (conv.out_height, conv.out_width) == (-(-9 // strides[0]), -(-10 // strides[1]))
    graph = ir.Graph(list(node.inputs), list(node.outputs), nodes=[node], opset_imports={"": 17}, name="fwd")
    model = ir.to_proto(ir.Model(graph, ir_version=8)).SerializeToString()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 9, 10)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    (y,) = _session(model).run(None, {"X": x, "W": w})
    assert y.shape == (2, 4, conv.out_height, conv.out_width)
    check(conv, 2)


def test_from_node_same_needs_sizes() -> None:
    with pytest.raises(ValueError, match="auto_pad"):
        ConvAttrs.from_node(conv_node((None, 3, "H", "W"), (4, 3, 3, 3), auto_pad="SAME_UPPER"))


def test_missing_sizes_refused() -> None:
    conv = ConvAttrs.from_node(conv_node((None, 3, "H", 10), (4, 3, 3, 3)))
    tape = ir.tape.Tape()
    with pytest.raises(ValueError, match="height"):
        build_exact_conv_backward(Emitter(tape, "g"), _value("dY", [1]), _value("X", [1]), _value("W", [1]), conv,
                                  needs_input_grad=True, needs_weight_grad=True, needs_bias_grad=True)


def test_3d_conv_refused() -> None:
    with pytest.raises(NotImplementedError):
        ConvAttrs.from_node(conv_node((1, 2, 4, 4, 4), (3, 2, 3, 3, 3)))


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("dynamic", [False, True])
def test_1d_conv(group: int, strides: int, dynamic: bool) -> None:
    node = conv_node((None if dynamic else 3, 4, 11), (6, 4 // group, 3), strides=[strides], pads=[1, 2],
                     dilations=[2], group=group)
    conv = ConvAttrs.from_node(node)
    assert conv.rank == 1 and conv.kernel == (1, 3) and conv.pads == (0, 1, 0, 2)
    check(conv, 3)
