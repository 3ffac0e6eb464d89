"""The ONNX builder of the gradient filter against the NumPy reference, through onnxruntime.

A property test draws conv configurations over every axis of docs/operator.md (batch, channels,
groups, kernels, strides, asymmetric pads, odd sizes, dilations on both sides of r,
patch sizes, with and without an input gradient); named cases pin the edge cases that
once needed special handling in the builder. Every output of the subgraph (X_sum,
W_sum, dX, dW, dB) must equal `gfcompiler.reference` up to float32 rounding.

Tolerance: the operator is multilinear in (dY, X, W) with nonnegative coefficients, so
running the reference on |dY|, |X|, |W| gives, element by element, the magnitude the
float32 rounding error scales with. Outputs must agree to 1e-4 of that magnitude: far
above rounding, far below any formulation error (those are of the order of the
magnitude itself).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from opharness import run_operator

from gfcompiler import reference
from gfcompiler.geometry import ConvShape, FilterGeometry
from gfcompiler.passes import filter_ops

settings.register_profile(
    "gfcompiler-ops",
    derandomize=True,  # the same examples on every run and machine
    database=None,
    deadline=None,  # each example builds an onnxruntime session
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
OPS = settings.get_profile("gfcompiler-ops")

RTOL = 1e-4
KERNELS = [(1, 1), (3, 3), (5, 5), (7, 7), (1, 3), (3, 1), (3, 5), (5, 3), (1, 7), (7, 1), (2, 3)]


def _inputs(conv: ConvShape, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, conv.in_channels, conv.height, conv.width)).astype(np.float32)
    w = rng.standard_normal(conv.weight_shape).astype(np.float32)
    dy = rng.standard_normal((batch, conv.out_channels, conv.out_height, conv.out_width)).astype(np.float32)
    return dy, x, w


def _reference(geom: FilterGeometry, dy, x, w, needs_input_grad: bool) -> dict[str, np.ndarray]:
    x_sum = reference.input_sum(x.astype(np.float64), geom)
    w_sum = reference.weight_sum(w.astype(np.float64))
    dx, dw, db = reference.filtered_backward(dy, x_sum, w_sum, geom, w, needs_input_grad)
    out = {"X_sum": x_sum, "W_sum": w_sum, "dW": dw, "dB": db}
    if needs_input_grad:
        out["dX"] = dx
    return out


def assert_operator_matches_reference(geom: FilterGeometry, batch: int, needs_input_grad: bool, seed: int = 0) -> None:
    dy, x, w = _inputs(geom.conv, batch, seed)
    got = run_operator(geom, dy, x, w, needs_input_grad)
    want = _reference(geom, dy, x, w, needs_input_grad)
    magnitude = _reference(geom, np.abs(dy), np.abs(x), np.abs(w), needs_input_grad)
    assert set(got) == set(want), f"outputs {sorted(got)} != {sorted(want)}"
    for name, expected in want.items():
        actual = got[name]
        if name == "W_sum":
            assert actual.shape == (*expected.shape, 1, 1), name
            actual = actual.reshape(expected.shape)
        assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
        assert actual.dtype == np.float32, name
        error = np.abs(actual.astype(np.float64) - expected)
        bound = RTOL * magnitude[name] + 1e-30
        worst = np.unravel_index(np.argmax(error - bound), error.shape)
        assert np.all(error <= bound), (
            f"{name} differs at {worst}: got {actual[worst]}, want {expected[worst]} "
            f"(magnitude {magnitude[name][worst]:.3g}); geometry {geom}"
        )


# ---------------------------------------------------------------------------- property test


@st.composite
def conv_configs(draw) -> tuple[FilterGeometry, int, bool]:
    """(geometry, runtime batch, needs_input_grad); the geometry's batch is None when dynamic."""
    r = draw(st.integers(1, 7), label="r")
    groups = draw(st.sampled_from(["ungrouped", "depthwise", "multiplier", "grouped"]), label="groups")
    if groups == "ungrouped":
        g, ci, co = 1, draw(st.integers(1, 6)), draw(st.integers(1, 6))
    elif groups == "depthwise":
        g = ci = co = draw(st.integers(1, 6))
    elif groups == "multiplier":
        g = ci = draw(st.integers(1, 4))
        co = ci * draw(st.integers(2, 3))
    else:
        g = draw(st.integers(2, 3))
        ci, co = g * draw(st.integers(2, 3)), g * draw(st.integers(1, 3))
    dilation = draw(st.sampled_from(["none", "below_r", "at_least_r"]), label="dilation")
    if dilation == "at_least_r":  # docs/operator.md step 8; the geometry supports it for 3x3 kernels only
        kernel = (3, 3)
        d = draw(st.integers(max(r, 2), max(r, 2) + 2))
        dilations = (d, d)
    else:
        kernel = draw(st.sampled_from(KERNELS), label="kernel")
        top = max(1, r - 1) if dilation == "below_r" else 1
        dilations = (draw(st.integers(1, top)), draw(st.integers(1, top)))
    strides = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pads = tuple(draw(st.integers(0, 3)) for _ in range(4))
    sizes = []
    for axis in (0, 1):
        reach = dilations[axis] * (kernel[axis] - 1) + 1  # the smallest padded input with one output
        low = max(1, reach - pads[axis] - pads[axis + 2])
        sizes.append(draw(st.integers(low, low + strides[axis] * min(r + 2, 6) + 4)))
    batch = draw(st.sampled_from([1, 2, 3, None]), label="batch")
    runtime_batch = batch if batch is not None else draw(st.integers(1, 3))
    conv = ConvShape(batch, ci, co, sizes[0], sizes[1], kernel, strides, pads, dilations, g)
    return FilterGeometry(conv, r), runtime_batch, draw(st.booleans(), label="needs_input_grad")


@settings(OPS, max_examples=120)
@given(conv_configs())
def test_operator_matches_reference(config):
    geom, batch, needs_input_grad = config
    assume(geom.conv.out_height >= 1 and geom.conv.out_width >= 1)
    assume(geom.unsupported_reason() is None)
    conv = geom.conv
    event("groups: " + ("1" if conv.group == 1 else "depthwise" if conv.is_depthwise else "other"))
    event("dX_small rule: " + ("step 8" if geom.uses_dilated_kernel else "kernel sum"))
    event("dilation: " + ("1" if conv.dilations == (1, 1) else ">= r" if max(conv.dilations) >= geom.patch else "< r"))
    event("batch: " + ("dynamic" if conv.batch is None else "static"))
    event("centered input padding: " + ("negative" if min(geom.input_pad_begin) < 0 else ">= 0"))
    if not filter_ops._is_depthwise_like(geom) and not geom.uses_dilated_kernel:
        event("per-group products: " + ("batch folded" if filter_ops._folds_batch(geom) else "per sample"))
    assert_operator_matches_reference(geom, batch, needs_input_grad)


@settings(OPS, max_examples=30)
@given(
    r=st.integers(1, 7),
    stride=st.integers(1, 3),
    pad=st.integers(0, 3),
    height=st.integers(9, 41),
    width=st.integers(9, 41),
)
def test_larger_maps_match_reference(r, stride, pad, height, width):
    """Larger, mostly non-divisible maps for a plain 3x3 conv (many windows, partial last ones)."""
    conv = ConvShape(2, 3, 4, height, width, (3, 3), (stride, stride), (pad, pad, pad, pad))
    geom = FilterGeometry(conv, r)
    assume(geom.unsupported_reason() is None)
    event("per-group products: " + ("batch folded" if filter_ops._folds_batch(geom) else "per sample"))
    assert_operator_matches_reference(geom, 2, True)


# ---------------------------------------------------------------------------- named edge cases

EDGE_CASES = {
    # ph·qh < H: the centered padding is negative, the windows start inside X (a Slice).
    "negative_centered_padding": (ConvShape(2, 3, 4, 20, 21, (7, 7)), 4),
    # Ho = 5, r = 4: the second window holds one valid row (count_include_pad = 0 matters).
    "patch_larger_than_half_map": (ConvShape(2, 3, 4, 5, 7, (3, 3), pads=(1, 1, 1, 1)), 4),
    "pointwise_stride2": (ConvShape(2, 8, 6, 15, 14, (1, 1), (2, 2)), 2),
    "mobilenetv2_depthwise_3x3_s2_r2": (ConvShape(2, 16, 16, 28, 28, (3, 3), (2, 2), (1, 1, 1, 1), group=16), 2),
    "mobilenetv2_depthwise_3x3_s2_r4": (ConvShape(1, 16, 16, 27, 29, (3, 3), (2, 2), (1, 1, 1, 1), group=16), 4),
    "depthwise_channel_multiplier": (ConvShape(2, 4, 12, 13, 11, (3, 3), pads=(1, 1, 1, 1), group=4), 2),
    "groups_2": (ConvShape(2, 4, 6, 12, 12, (3, 3), pads=(1, 1, 1, 1), group=2), 2),
    # Padding of a whole window or more: windows lying wholly in the padding.
    "padding_wider_than_window": (ConvShape(1, 3, 4, 3, 4, (3, 3), pads=(3, 3, 3, 3)), 2),
    "dilation_below_patch": (ConvShape(2, 3, 4, 17, 19, (3, 3), pads=(2, 2, 2, 2), dilations=(2, 2)), 4),
    "dilation_at_patch_step8": (ConvShape(2, 3, 4, 17, 19, (3, 3), pads=(2, 2, 2, 2), dilations=(2, 2)), 2),
    "depthwise_dilation_step8": (ConvShape(2, 5, 5, 16, 16, (3, 3), pads=(4, 4, 4, 4), dilations=(4, 4), group=5), 2),
    "patch_1_pointwise": (ConvShape(2, 5, 3, 7, 9, (1, 1)), 1),
    "patch_1_3x3_step8": (ConvShape(2, 3, 4, 7, 9, (3, 3), pads=(1, 1, 1, 1)), 1),
    "asymmetric_stride_and_pads": (ConvShape(3, 3, 5, 19, 10, (3, 5), (3, 1), (0, 2, 3, 1)), 3),
    # P = 80 > 16 cells: per-sample products; the batch is only known at run time.
    "paper_layer_shape_dynamic_batch": (ConvShape(None, 32, 32, 30, 40, (3, 3), pads=(1, 1, 1, 1)), 4),
    # P = 4 cells: the batch is folded into the GEMM columns although it is only known at run time.
    "grouped_7x7_dynamic_batch_folded": (ConvShape(None, 6, 9, 7, 7, (3, 3), pads=(1, 1, 1, 1), group=3), 4),
}


@pytest.mark.parametrize("needs_input_grad", [True, False], ids=["with_dX", "without_dX"])
@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_case_matches_reference(name, needs_input_grad):
    conv, r = EDGE_CASES[name]
    geom = FilterGeometry(conv, r)
    assert geom.unsupported_reason() is None
    assert_operator_matches_reference(geom, conv.batch or 2, needs_input_grad)


def test_edge_cases_cover_their_geometry():
    """The named cases really exercise what their names claim (guards against edits that drift)."""
    neg = FilterGeometry(*EDGE_CASES["negative_centered_padding"])
    assert min(neg.input_pad_begin) < 0
    wide = FilterGeometry(*EDGE_CASES["padding_wider_than_window"])
    assert max(*wide.input_pad_begin, *wide.input_pad_end) >= min(wide.input_patch)
    assert FilterGeometry(*EDGE_CASES["dilation_at_patch_step8"]).uses_dilated_kernel
    assert not FilterGeometry(*EDGE_CASES["dilation_below_patch"]).uses_dilated_kernel
    assert not filter_ops._folds_batch(FilterGeometry(*EDGE_CASES["paper_layer_shape_dynamic_batch"]))
    assert filter_ops._folds_batch(FilterGeometry(*EDGE_CASES["grouped_7x7_dynamic_batch_folded"]))
    half = FilterGeometry(*EDGE_CASES["patch_larger_than_half_map"])
    assert half.patch > half.conv.out_height / 2
