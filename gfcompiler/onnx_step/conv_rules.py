"""Gradient rules of trained convs: the exact backward and the gradient filter.

`RULES` gives every ``Conv`` the exact backward of `conv_backward`. A trained conv
the filter applies to gets `filtered_conv_rule` as a per-node override instead: its
backward reads only the forward summaries ``X_sum`` and ``W_sum`` (docs/operator.md, built by
`gfcompiler.passes.filter_ops`) and the incoming gradient, never the full-resolution
input.
"""

from __future__ import annotations

import onnx_ir as ir

from gfcompiler.geometry import FilterGeometry
from gfcompiler.onnx_step.conv_backward import ConvAttrs, build_exact_conv_backward
from gfcompiler.onnx_step.rules_api import GradContext, GradRule, spatially_constant_source
from gfcompiler.passes import filter_ops


def exact_conv(ctx: GradContext, dys: list[ir.Value | None]) -> list[ir.Value | None]:
    """dX = ConvTranspose(dY, W), dW = the correlation of X with dY, dB = ΣdY (`conv_backward`)."""
    x, w = ctx.inputs[0], ctx.inputs[1]
    needs = ctx.needs + [False] * (3 - len(ctx.needs))
    dx, dw, db = build_exact_conv_backward(
        ctx.e, dys[0], x, w, ConvAttrs.from_node(ctx.node),
        needs_input_grad=needs[0], needs_weight_grad=needs[1], needs_bias_grad=needs[2],
    )
    return [dx, dw, db][: len(ctx.inputs)]


def filtered_conv_rule(x_sum: ir.Value, w_sum: ir.Value, geometry: FilterGeometry) -> GradRule:
    """The gradient filter's backward for one conv, from its forward summaries.

    A spatially constant dY (a global-average-pool head right after the conv) stays
    small: the filter reads the N×Co×1×1 tensor, never the broadcast full map.
    """

    def filtered_conv(ctx: GradContext, dys: list[ir.Value | None]) -> list[ir.Value | None]:
        needs = ctx.needs + [False] * (3 - len(ctx.needs))
        grads = filter_ops.build_filtered_backward(
            ctx.e.tape, dys[0], x_sum, w_sum, geometry, f"{ctx.node.name}/gf",
            needs_input_grad=needs[0], needs_bias_grad=needs[2], weight=ctx.inputs[1],
            constant_dy=spatially_constant_source(dys[0]),
        )
        return [grads.input_grad if needs[0] else None, grads.weight_grad if needs[1] else None,
                grads.bias_grad if needs[2] else None][: len(ctx.inputs)]

    return filtered_conv


RULES: dict[str, GradRule] = {"Conv": exact_conv}
