"""Rewrite ops that onnxruntime-training 1.19.2 cannot differentiate into ones it can.

Measured: no gradient builder exists for HardSwish, HardSigmoid, Elu, Softplus or Selu.
Only nodes in the trained region (those whose backward is built) need rewriting;
the frozen prefix keeps the original, faster ops. Each rule is exact:

* ``HardSigmoid(x; α, β) = Clip(α·x + β, 0, 1)``
* ``HardSwish(x) = x · Clip(x/6 + 1/2, 0, 1)``
* ``Softplus(x) = Where(x > 0, x + Log(1 + Exp(-x⁺)), Log(1 + Exp(x⁻)))``
* ``Elu(x; α) = Where(x > 0, x, α·(Exp(x⁻) − 1))``
* ``Selu(x; α, γ) = γ·Elu(x; α)``

with ``x⁺ = Where(x > 0, x, 0)`` and ``x⁻ = Where(x > 0, 0, x)``: no branch overflows, and
at x = 0 the gradient is torch's (α for Elu, 1/2 for Softplus) rather than whatever a
``Min``/``Abs``/``Relu`` tie would give — exact zeros are common (zero padding, no bias).
* ``Sum(a, b, c, ...) = ((a + b) + c) + ...``  (old Caffe2 exports use variadic Sum for residuals)
* ``Clip(x, 0, max) = Clip(Relu(x), , max)`` (ReLU6 and friends): not for a missing
  gradient but for its kink: onnxruntime's ClipGrad passes the gradient at x = min,
  torch's relu6/hardtanh (what exporters turn into Clip) do not, and exact zeros are
  common; ReluGrad passes none at 0.
* ``Resize`` (nearest, integer up-scaling of H and W, as ``nn.Upsample`` exports it) =
  ``Reshape(Expand(Reshape(x, N,C,H,1,W,1), 1,1,1,sh,1,sw), N,C,H·sh,W·sw)``: onnxruntime
  has a ``ResizeGrad`` builder but no CPU kernel for it; Expand's gradient is a ReduceSum.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import numpy as np
import onnx_ir as ir

from gfcompiler.emit import Emitter, graph_names, insert_before

# Ops known to have no gradient builder in onnxruntime-training 1.19.2 (measured).
NO_GRADIENT_OPS = frozenset({"HardSwish", "HardSigmoid", "Elu", "Softplus", "Selu", "Sum", "Resize"})


def _constant(b: Emitter, name: str, value: float) -> ir.Value:
    """A float constant of shape [1], the shape these rules' constants have always had."""
    return b.const(name, np.full(1, value, np.float32))


def _clip01(b: Emitter, x: ir.Value, alpha: float, beta: float) -> ir.Value:
    affine = b.op("Add", [b.op("Mul", [x, _constant(b, "alpha", alpha)], "scaled"), _constant(b, "beta", beta)], "shifted")
    return b.op("Clip", [affine, _constant(b, "zero", 0.0), _constant(b, "one", 1.0)], "hard_sigmoid")


def _hard_sigmoid(b: Emitter, node: ir.Node) -> ir.Value:
    attrs = node.attributes
    return _clip01(b, node.inputs[0], attrs.get_float("alpha", 0.2), attrs.get_float("beta", 0.5))


def _hard_swish(b: Emitter, node: ir.Node) -> ir.Value:
    x = node.inputs[0]
    return b.op("Mul", [x, _clip01(b, x, 1.0 / 6.0, 0.5)], "hard_swish")


def _split_at_zero(b: Emitter, x: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
    """(x > 0, x⁺, x⁻): the condition and both halves, each finite wherever x is."""
    zero = _constant(b, "zero", 0.0)
    positive = b.op("Greater", [x, zero], "is_positive")
    return positive, b.op("Where", [positive, x, zero], "x_pos"), b.op("Where", [positive, zero, x], "x_neg")


def _softplus(b: Emitter, node: ir.Node) -> ir.Value:
    x = node.inputs[0]
    positive, x_pos, x_neg = _split_at_zero(b, x)
    one = _constant(b, "one", 1.0)
    exp_minus = b.op("Exp", [b.op("Neg", [x_pos], "minus_x_pos")], "exp_minus_x_pos")
    log_upper = b.op("Log", [b.op("Add", [one, exp_minus], "one_plus_exp_minus")], "log_upper")
    upper = b.op("Add", [x_pos, log_upper], "upper")
    lower = b.op("Log", [b.op("Add", [one, b.op("Exp", [x_neg], "exp_x_neg")], "one_plus_exp")], "lower")
    return b.op("Where", [positive, upper, lower], "softplus")


def _elu_of(b: Emitter, x: ir.Value, alpha: float) -> ir.Value:
    positive, _, x_neg = _split_at_zero(b, x)
    expm1 = b.op("Sub", [b.op("Exp", [x_neg], "exp"), _constant(b, "one", 1.0)], "expm1")
    return b.op("Where", [positive, x, b.op("Mul", [expm1, _constant(b, "alpha", alpha)], "scaled_expm1")], "elu")


def _elu(b: Emitter, node: ir.Node) -> ir.Value:
    return _elu_of(b, node.inputs[0], node.attributes.get_float("alpha", 1.0))


def _selu(b: Emitter, node: ir.Node) -> ir.Value:
    attrs = node.attributes
    elu = _elu_of(b, node.inputs[0], attrs.get_float("alpha", 1.67326319217681884765625))
    return b.op("Mul", [elu, _constant(b, "gamma", attrs.get_float("gamma", 1.05070102214813232421875))], "selu")


def _sum(b: Emitter, node: ir.Node) -> ir.Value:
    total = node.inputs[0]
    for index, term in enumerate(node.inputs[1:], start=1):
        total = b.op("Add", [total, term], f"partial_sum_{index}")
    if total is node.inputs[0]:
        total = b.op("Identity", [total], "single_term")
    return total


def _nearest_integer_scales(node: ir.Node) -> tuple[int, int] | None:
    """(sh, sw) when ``node`` is a nearest Resize that repeats each pixel sh×sw times."""
    attrs = node.attributes
    if attrs.get_string("mode", "nearest") != "nearest":
        return None
    transform = attrs.get_string("coordinate_transformation_mode", "half_pixel")
    rounding = attrs.get_string("nearest_mode", "round_prefer_floor")
    if (transform, rounding) not in {("asymmetric", "floor"), ("half_pixel", "round_prefer_floor"),
                                     ("half_pixel", "round_prefer_ceil"), ("pytorch_half_pixel", "round_prefer_floor")}:
        return None
    x, out = node.inputs[0], node.outputs[0]
    if x.shape is None or out.shape is None or len(x.shape) != 4 or len(out.shape) != 4:
        return None
    dims_in, dims_out = list(x.shape), list(out.shape)
    if not all(isinstance(d, int) for d in dims_in[1:] + dims_out[1:]) or dims_in[1] != dims_out[1]:
        return None
    (h, w), (oh, ow) = dims_in[2:], dims_out[2:]
    if oh % h or ow % w:
        return None
    return oh // h, ow // w


def _resize(b: Emitter, node: ir.Node) -> ir.Value:
    sh, sw = _nearest_integer_scales(node)
    x = node.inputs[0]
    _, c, h, w = x.shape
    split = b.op("Reshape", [x, b.ints("split_shape", [0, c, h, 1, w, 1])], "split")
    repeated = b.op("Expand", [split, b.ints("repeats", [1, 1, 1, sh, 1, sw])], "repeated")
    return b.op("Reshape", [repeated, b.ints("merged_shape", [0, c, h * sh, w * sw])], "upsampled")


def _constant_value(value: ir.Value | None) -> float | None:
    if value is None or value.const_value is None or value.const_value.numpy().size != 1:
        return None
    return float(value.const_value.numpy().reshape(()))


def _clips_at_zero(node: ir.Node) -> bool:
    return len(node.inputs) >= 2 and _constant_value(node.inputs[1]) == 0.0


def _clip_at_zero(b: Emitter, node: ir.Node) -> ir.Value:
    rectified = b.op("Relu", [node.inputs[0]], "relu")
    upper = node.inputs[2] if len(node.inputs) > 2 else None
    if upper is None:
        return rectified
    return b.op("Clip", [rectified, None, upper], "clip_max")


RULES: dict[str, Callable[[Emitter, ir.Node], ir.Value]] = {
    "Clip": _clip_at_zero,
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _hard_swish,
    "Softplus": _softplus,
    "Elu": _elu,
    "Selu": _selu,
    "Sum": _sum,
    "Resize": _resize,
}

# Rules that apply only to some forms of their op.
APPLIES = {"Resize": lambda node: _nearest_integer_scales(node) is not None, "Clip": _clips_at_zero}


class DecomposeGradientlessOpsPass(ir.passes.InPlacePass):
    """Replace each no-gradient op among ``nodes`` by the equivalent ops of `RULES`."""

    def __init__(self, nodes: Collection[ir.Node]) -> None:
        super().__init__()
        self.nodes = nodes

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        names = graph_names(model.graph)
        selected = set(self.nodes)
        for node in [node for node in model.graph if node in selected]:  # graph order: deterministic names
            rule = RULES.get(node.op_type)
            if rule is None or node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type in APPLIES and not APPLIES[node.op_type](node):
                continue
            emitter = Emitter(ir.tape.Tape(), node.name or node.outputs[0].name, names)
            replacement = rule(emitter, node)
            insert_before(model.graph, emitter.tape, node)
            original = node.outputs[0]
            replacement.name, replacement.shape, replacement.dtype = original.name, original.shape, original.dtype
            node.outputs[0].replace_all_uses_with(replacement, replace_graph_outputs=True)
            model.graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)
