"""Gradient rules of trained convs: the exact backward and the gradient filter.

`RULES` gives every ``Conv`` the exact backward of `conv_backward`. A trained conv
the filter applies to gets `filtered_conv_rule` as a per-node override instead: its
backward reads only the forward summaries ``X_sum`` and ``W_sum`` (docs/operator.md, built by
`gfcompiler.passes.filter_ops`) and the incoming gradient, never the full-resolution
input.
"""

from __future__ import annotations

import onnx_ir as ir

from gfcompiler.errors import UnsupportedModelError
from gfcompiler.geometry import FilterGeometry
from gfcompiler.onnx_step.conv_backward import ConvAttrs, build_exact_conv_backward
from gfcompiler.onnx_step.rules_api import GradContext, GradRule, spatially_constant_source
from gfcompiler.passes import filter_ops


def _conv_attrs(node: ir.Node) -> ConvAttrs:
    try:
        return ConvAttrs.from_node(node)
    except (ValueError, NotImplementedError) as error:
        raise UnsupportedModelError(f"no gradient for Conv {node.name!r}: {error}") from None


def exact_conv(ctx: GradContext, dys: list[ir.Value | None]) -> list[ir.Value | None]:
    """dX = ConvTranspose(dY, W), dW = the correlation of X with dY, dB = ΣdY (`conv_backward`)."""
    x, w = ctx.inputs[0], ctx.inputs[1]
    needs = ctx.needs + [False] * (3 - len(ctx.needs))
    dx, dw, db = build_exact_conv_backward(
        ctx.e, dys[0], x, w, _conv_attrs(ctx.node),
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
            ctx.e.child(f"{ctx.node.name}/gf"), dys[0], x_sum, w_sum, geometry,
            needs_input_grad=needs[0], needs_bias_grad=needs[2], weight=ctx.inputs[1],
            constant_dy=spatially_constant_source(dys[0]),
        )
        return [grads.input_grad if needs[0] else None, grads.weight_grad if needs[1] else None,
                grads.bias_grad if needs[2] else None][: len(ctx.inputs)]

    return filtered_conv


def _static_dims(value: ir.Value) -> list | None:
    if value.shape is None or not all(isinstance(d, int) for d in list(value.shape)[1:]):
        return None
    return list(value.shape)


def conv_transpose(ctx: GradContext, dys: list[ir.Value | None]) -> list[ir.Value | None]:
    """Y = ConvTranspose(X, W, b) is the input gradient of the conv C(A) = Conv(A, W) at dC = X.

    So dX = Conv(dY, W) with the same strides, pads, dilations and groups; dW is that
    conv's weight gradient with dY as its input and X as its output gradient
    (`conv_backward`); dB = ΣdY. 2-D, explicit pads (``output_padding`` only adds rows
    the equivalent conv never reads).
    """
    node, e = ctx.node, ctx.e
    x, w, y, dy = ctx.inputs[0], ctx.inputs[1], ctx.outputs[0], dys[0]
    attrs = node.attributes
    x_dims, y_dims, w_dims = _static_dims(x), _static_dims(y), _static_dims(w)
    if x_dims is None or y_dims is None or w_dims is None or len(x_dims) != 4 or len(w_dims) != 4:
        raise UnsupportedModelError(f"no gradient rule for ConvTranspose {node.name!r}: needs a 2-D transposed conv "
                                    "with known channel and spatial sizes")
    if attrs.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or "output_shape" in attrs:
        raise UnsupportedModelError(f"no gradient rule for ConvTranspose {node.name!r} with auto_pad/output_shape; "
                                    "export it with explicit pads")
    group = attrs.get_int("group", 1)
    equivalent = ConvAttrs(
        kernel=tuple(w_dims[2:]), strides=tuple(attrs.get_ints("strides", [1, 1])),
        pads=tuple(attrs.get_ints("pads", [0, 0, 0, 0])), dilations=tuple(attrs.get_ints("dilations", [1, 1])),
        group=group, batch=x_dims[0], in_channels=y_dims[1], height=y_dims[2], width=y_dims[3],
        out_channels=x_dims[1],
    )
    needs = ctx.needs + [False] * (3 - len(ctx.needs))
    dx = dw = db = None
    if needs[0]:
        dx = e.op("Conv", [dy, w], "dX", kernel_shape=list(equivalent.kernel), strides=list(equivalent.strides),
                  pads=list(equivalent.pads), dilations=list(equivalent.dilations), group=group)
    if needs[1]:
        _, dw, _ = build_exact_conv_backward(e, x, dy, w, equivalent, needs_input_grad=False,
                                             needs_weight_grad=True, needs_bias_grad=False)
    if needs[2]:
        db = e.op("ReduceSum", [dy, e.ints("bias_axes", [0, 2, 3])], "dB", keepdims=0)
    return [dx, dw, db][: len(ctx.inputs)]


RULES: dict[str, GradRule] = {"Conv": exact_conv, "ConvTranspose": conv_transpose}
