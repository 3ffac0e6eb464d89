"""Read a Conv node's geometry from the canonical (shape-inferred) graph.

`conv_shape` returns a `ConvShape` or the reason the gradient filter cannot apply to
the conv (which then keeps its exact backward): 1-D/3-D convs, unknown spatial
sizes, a computed (non-constant) weight. ``auto_pad`` SAME_UPPER / SAME_LOWER /
VALID are turned into the explicit pads they mean.
"""

from __future__ import annotations

import onnx_ir as ir

from gfcompiler.geometry import ConvShape, ceil_div


def _same_pads(size: int, kernel: int, stride: int, dilation: int, upper: bool) -> tuple[int, int]:
    total = max((ceil_div(size, stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    small, large = total // 2, total - total // 2
    return (small, large) if upper else (large, small)


def conv_shape(node: ir.Node) -> ConvShape | str:
    """The conv's `ConvShape`, or a one-line reason why its sizes are not usable."""
    x, w = node.inputs[0], node.inputs[1]
    if w is None or w.shape is None:
        return "weight shape unknown"
    if len(w.shape) != 4:
        return f"{len(w.shape) - 2}-D convolution (only 2-D convs are filtered)"
    if x.shape is None or len(x.shape) != 4:
        return "input shape unknown; pass --input-shape"
    if not all(isinstance(d, int) for d in w.shape):
        return "weight shape unknown"
    n, c, h, wd = x.shape
    if not isinstance(h, int) or not isinstance(wd, int) or not isinstance(c, int):
        return f"input spatial size unknown ({x.shape}); pass --input-shape"
    co, _, kh, kw = w.shape
    attrs = node.attributes
    strides = tuple(attrs.get_ints("strides", [1, 1]))
    dilations = tuple(attrs.get_ints("dilations", [1, 1]))
    group = attrs.get_int("group", 1)
    auto_pad = attrs.get_string("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        top, bottom = _same_pads(h, kh, strides[0], dilations[0], auto_pad == "SAME_UPPER")
        left, right = _same_pads(wd, kw, strides[1], dilations[1], auto_pad == "SAME_UPPER")
        pads = (top, left, bottom, right)
    elif auto_pad == "VALID":
        pads = (0, 0, 0, 0)
    else:
        pads = tuple(attrs.get_ints("pads", [0, 0, 0, 0]))
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    return ConvShape(
        batch=n if isinstance(n, int) else None,
        in_channels=c, out_channels=co, height=h, width=wd, kernel=(kh, kw),
        strides=strides, pads=pads, dilations=dilations, group=group, has_bias=has_bias,
    )
