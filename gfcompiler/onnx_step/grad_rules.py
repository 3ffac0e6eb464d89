"""Gradient rules for every differentiable non-Conv op: ``RULES[op_type] -> GradRule``.

Each rule differentiates one forward node (default ONNX domain) and emits its backward
as default-domain ops through ``ctx.e`` (see `rules_api` for the contract). Conventions:

* Returns one entry per node input, ``None`` where ``ctx.needs[i]`` is False; when every
  incoming gradient is ``None`` every entry is ``None`` (the `_rule` wrapper does both).
* A rule may return an incoming gradient value itself (Identity, Reshape-free paths,
  broadcast-free Add...): gradients are values, not fresh nodes.
* The emitted graph targets opset 13 to 21 (ReduceSum/Squeeze/Unsqueeze axes and Split
  sizes as inputs). The only op whose choice depends on the opset is MaxPool's
  scatter-add (``ScatterElements`` ``reduction`` needs opset 16).
* Shapes: static where the forward graph's shape inference knows them (spatial sizes
  are), dynamic ``Shape`` ops otherwise (a symbolic batch ``N``).
* Ties and kinks follow torch: MaxPool/GlobalMaxPool route to the first maximum, Max/Min
  split ties evenly (torch.maximum), Clip passes where ``min < x < max`` (torch's hardtanh/relu6,
  which exporters turn into Clip; torch.clamp would include the bounds), HardSigmoid/HardSwish use torch's bounds.
* Linear spatial resampling (Resize nearest/linear, AveragePool) is exact: per resized
  axis a constant matrix ``M`` (out x in) mirroring onnxruntime's coordinate arithmetic in
  float32 (and its AveragePool divisors), and ``dX = M_hᵀ · dY · M_w`` as MatMuls. The
  gradient is that of onnxruntime's forward where it departs from torch's: a ceil_mode
  AveragePool window with count_include_pad=1 that overhangs the padding is divided by
  the whole kernel.

What a rule cannot do raises `UnsupportedModelError` naming the op, the obstacle and
the node: ``no gradient rule for Resize mode cubic (node /head/Resize)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from gfcompiler.errors import UnsupportedModelError
from gfcompiler.onnx_step.rules_api import GradContext, GradRule, mark_spatially_constant

__all__ = ["RULES", "unbroadcast"]

RULES: dict[str, GradRule] = {}

INT64_MAX = 2**63 - 1
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

Grads = list["ir.Value | None"]


def _rule(*op_types: str):
    """Register a rule for ``op_types``; the wrapper handles all-None ``dys`` and ``needs``."""

    def register(fn):
        @functools.wraps(fn)
        def wrapped(ctx: GradContext, dys: list[ir.Value | None]) -> Grads:
            count = len(ctx.inputs)
            if all(dy is None for dy in dys):
                return [None] * count
            grads = list(fn(ctx, list(dys)))
            grads += [None] * (count - len(grads))
            return [grad if i < len(ctx.needs) and ctx.needs[i] else None for i, grad in enumerate(grads[:count])]

        for op_type in op_types:
            RULES[op_type] = wrapped
        return wrapped

    return register


# ----------------------------------------------------------------------------- helpers


def _refuse(ctx: GradContext, obstacle: str):
    raise UnsupportedModelError(f"no gradient rule for {ctx.node.op_type} {obstacle} (node {ctx.node.name})")


def _np_dtype(value: ir.Value | None):
    if value is None or value.dtype is None:
        return None
    try:
        return value.dtype.numpy()
    except (TypeError, ValueError, AttributeError):
        return None


def _dtype(ctx: GradContext):
    """The float dtype of the node's data: its first output's, else its first input's, else float32."""
    for value in (ctx.outputs[:1] + ctx.inputs[:1]):
        dtype = _np_dtype(value)
        if dtype is not None and np.issubdtype(dtype, np.floating):
            return dtype
    return np.dtype(np.float32)


def _onnx_dtype(ctx: GradContext) -> int:
    return ir.DataType.from_numpy(np.dtype(_dtype(ctx))).value


def _scalar(ctx: GradContext, name: str, value: float) -> ir.Value:
    return ctx.e.scalar(name, value, _dtype(ctx))


def _const(ctx: GradContext, name: str, array) -> ir.Value:
    return ctx.e.const(name, np.ascontiguousarray(np.asarray(array, dtype=_dtype(ctx))))


def _key(dim):
    """A comparable key for one dimension: the int, the symbol's name, or None (unknown)."""
    if isinstance(dim, int):
        return dim
    value = getattr(dim, "value", None)
    return ("sym", value) if isinstance(value, str) else None


def _dims(value: ir.Value) -> list | None:
    return None if value.shape is None else list(value.shape)


def _rank(ctx: GradContext, value: ir.Value, what: str = "an input of unknown rank") -> int:
    if value.shape is None:
        _refuse(ctx, what)
    return len(value.shape)


def _opset(ctx: GradContext) -> int:
    """The default-domain opset of the forward graph (13 when it cannot be told)."""
    graph = ctx.node.graph
    imports = getattr(graph, "opset_imports", None) or {}
    for domain in ("", "ai.onnx"):
        if domain in imports:
            return int(imports[domain])
    return ctx.node.version or 13


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _ints(ctx: GradContext, name: str, values) -> ir.Value:
    """An int64 constant: a scalar for an int, else 1-D."""
    if np.ndim(values) == 0:
        return ctx.e.ints(name, np.int64(values))
    return ctx.e.ints(name, [int(v) for v in values])


def _shape_value(ctx: GradContext, dims: Sequence, source: ir.Value, name: str) -> ir.Value:
    """A 1-D shape for Reshape/Expand: ``dims`` entries are ints, or ``("src", i)`` for
    dimension ``i`` of ``source`` (unknown statically). One unknown becomes -1 (no op),
    several are gathered from ``Shape(source)``."""
    unknown = [i for i, d in enumerate(dims) if not isinstance(d, int)]
    if not unknown:
        return _ints(ctx, name, dims)
    if len(unknown) == 1 and all(d != 0 for d in dims if isinstance(d, int)):
        return _ints(ctx, name, [-1 if not isinstance(d, int) else d for d in dims])
    shape = ctx.e.op("Shape", [source], f"{name}_source")
    parts = []
    for d in dims:
        if isinstance(d, int):
            parts.append(_ints(ctx, f"{name}_dim", [d]))
        else:
            parts.append(ctx.e.op("Gather", [shape, _ints(ctx, f"{name}_at", [d[1]])], f"{name}_dim"))
    return ctx.e.op("Concat", parts, name, axis=0)


def _target_shape(ctx: GradContext, like: ir.Value, name: str = "shape") -> ir.Value:
    """``like``'s shape as a Reshape target (constant when at most one dim is unknown)."""
    dims = _dims(like)
    if dims is None:
        return ctx.e.op("Shape", [like], name)
    return _shape_value(ctx, [d if isinstance(d, int) else ("src", i) for i, d in enumerate(dims)], like, name)


def _reshape_like(ctx: GradContext, grad: ir.Value, like: ir.Value, name: str = "dX") -> ir.Value:
    return ctx.e.op("Reshape", [grad, _target_shape(ctx, like, f"{name}_shape")], name)


def _zeros_like(ctx: GradContext, like: ir.Value, name: str = "zeros") -> ir.Value:
    dims = _dims(like)
    if dims is not None and all(isinstance(d, int) for d in dims):
        shape = _ints(ctx, f"{name}_shape", dims)
    else:
        shape = ctx.e.op("Shape", [like], f"{name}_shape")
    value = ir.tensor(np.zeros(1, dtype=_np_dtype(like) or _dtype(ctx)))
    return ctx.e.op("ConstantOfShape", [shape], name, value=value)


def _reduction_plan(grad_dims: list, like_dims: list):
    """(axes reduced keeping dims, number of leading axes dropped), or None when unclear."""
    lead = len(grad_dims) - len(like_dims)
    if lead < 0:
        return None
    keep = []
    for i, like_dim in enumerate(like_dims):
        kl, kg = _key(like_dim), _key(grad_dims[lead + i])
        if kl is not None and kl == kg:
            continue
        if kl == 1:
            keep.append(lead + i)
        elif kg == 1:
            continue
        else:
            return None
    return keep, lead


def unbroadcast(ctx: GradContext, grad: ir.Value, like: ir.Value, grad_shape: Sequence | None = None) -> ir.Value:
    """Sum ``grad`` down to ``like``'s shape, undoing numpy broadcasting.

    ``grad_shape`` is ``grad``'s shape (default: the node's first output's). With static
    (or identically symbolic) shapes the reduced axes are constants: one ReduceSum over the
    axes where ``like`` has 1, one over the leading axes it lacks, none when nothing was
    broadcast. Otherwise the axes are computed from ``Shape`` ops at run time.
    """
    if grad_shape is None:
        grad_shape = ctx.outputs[0].shape
    like_dims = _dims(like)
    if grad_shape is not None and like_dims is not None:
        plan = _reduction_plan(list(grad_shape), like_dims)
        if plan is not None:
            keep, lead = plan
            out = grad
            if keep:
                out = ctx.e.op("ReduceSum", [out, _ints(ctx, "unbroadcast_axes", keep)], "unbroadcast", keepdims=1)
            if lead:
                out = ctx.e.op("ReduceSum", [out, _ints(ctx, "unbroadcast_lead", range(lead))], "unbroadcast",
                               keepdims=0)
            return out
    return _unbroadcast_dynamic(ctx, grad, like)


def _unbroadcast_dynamic(ctx: GradContext, grad: ir.Value, like: ir.Value) -> ir.Value:
    """unbroadcast with run-time shapes: reduce where ``like``'s shape (left-padded with 1s) differs."""
    e = ctx.e
    grad_shape = e.op("Shape", [grad], "ub_grad_shape")
    like_shape = e.op("Shape", [like], "ub_like_shape")
    extra = e.op("Sub", [e.op("Size", [grad_shape], "ub_grad_rank"), e.op("Size", [like_shape], "ub_like_rank")],
                 "ub_extra")
    ones = e.op("ConstantOfShape", [e.op("Reshape", [extra, _ints(ctx, "ub_one", [1])], "ub_extra_1d")], "ub_ones",
                value=ir.tensor(np.ones(1, dtype=np.int64)))
    padded = e.op("Concat", [ones, like_shape], "ub_padded", axis=0)
    differ = e.op("Not", [e.op("Equal", [padded, grad_shape], "ub_same")], "ub_differ")
    axes = e.op("Reshape", [e.op("NonZero", [differ], "ub_nonzero"), _ints(ctx, "ub_flat", [-1])], "ub_axes")
    summed = e.op("ReduceSum", [grad, axes], "ub_sum", keepdims=1, noop_with_empty_axes=1)
    return e.op("Reshape", [summed, like_shape], "unbroadcast")


def _apply_axis(ctx: GradContext, grad: ir.Value, axis: int, rank: int, matrix: np.ndarray, name: str) -> ir.Value:
    """``out[..., i, ...] = Σ_o grad[..., o, ...] · matrix[o, i]`` along ``axis`` (a MatMul)."""
    e = ctx.e
    if axis == rank - 1:
        return e.op("MatMul", [grad, _const(ctx, f"{name}_matrix", matrix)], name)
    if axis == rank - 2:
        return e.op("MatMul", [_const(ctx, f"{name}_matrix", np.ascontiguousarray(matrix.T)), grad], name)
    perm = [a for a in range(rank) if a != axis] + [axis]
    moved = e.op("Transpose", [grad], f"{name}_to_last", perm=perm)
    product = e.op("MatMul", [moved, _const(ctx, f"{name}_matrix", matrix)], f"{name}_matmul")
    return e.op("Transpose", [product], name, perm=[int(i) for i in np.argsort(perm)])


def _where(ctx: GradContext, condition: ir.Value, then: ir.Value, otherwise: ir.Value | None, name: str) -> ir.Value:
    """``then`` where ``condition``, else ``otherwise`` (zero when None).

    The zero case is ``then · float(condition)``: onnxruntime's CPU ``Where`` is several times
    slower than a ``Cast`` and a ``Mul`` (benchmarks/README.md, "Formulation choices").
    A NaN/Inf in ``then`` survives the mask, which only matters when the loss is
    already non-finite (and the step leaves the state unchanged then).
    """
    if otherwise is None:
        mask = ctx.e.op("Cast", [condition], f"{name}_mask", to=_onnx_dtype(ctx))
        return ctx.e.op("Mul", [then, mask], name)
    return ctx.e.op("Where", [condition, then, otherwise], name)


def _constant_ints(ctx: GradContext, value: ir.Value | None, what: str) -> list[int] | None:
    if value is None:
        return None
    folded = _fold(ctx, value)
    if folded is None or not all(isinstance(v, (int, float)) for v in folded):
        _refuse(ctx, f"with a non-constant {what}")
    return [int(v) for v in folded]


_FOLD_DEPTH = 8


def _fold(ctx: GradContext, value: ir.Value | None, depth: int = 0) -> list | None:
    """The elements of a small 1-D (or scalar) value known at compile time, or None.

    Follows constants and the shape arithmetic exporters emit for Resize sizes, axes and
    the like (Shape, Slice, Gather, Concat, Cast, Unsqueeze, Squeeze, Reshape, Identity).
    Elements are numbers, or ``_key`` tuples of a symbolic dimension read by ``Shape``,
    or None where unknown.
    """
    if value is None or depth > _FOLD_DEPTH:
        return None
    array = ctx.constant_array(value)
    if array is not None:
        flat = np.asarray(array).reshape(-1)
        return [v.item() for v in flat] if flat.size <= 4096 else None
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    inputs = list(node.inputs)
    op = node.op_type
    if op == "Constant":
        for name in ("value_int", "value_float", "value_ints", "value_floats"):
            if name in node.attributes:
                return list(np.asarray(node.attributes[name].value).reshape(-1).tolist())
        return None

    def fold(i):
        return _fold(ctx, inputs[i], depth + 1) if i < len(inputs) and inputs[i] is not None else None

    if op == "Shape":
        dims = _dims(inputs[0])
        if dims is None:
            return None
        start = node.attributes["start"].value if "start" in node.attributes else 0
        end = node.attributes["end"].value if "end" in node.attributes else len(dims)
        return [d if isinstance(d, int) else _key(d) for d in dims[slice(start, end)]]
    if op in ("Identity", "Reshape", "Unsqueeze", "Squeeze"):
        return fold(0)
    if op == "Cast":
        parts = fold(0)
        if parts is None:
            return None
        to = ir.DataType(node.attributes["to"].value)
        cast = float if to.is_floating_point() else int
        return [cast(v) if isinstance(v, (int, float)) else v for v in parts]
    if op == "Concat":
        parts = [fold(i) for i in range(len(inputs))]
        return None if any(p is None for p in parts) else [v for p in parts for v in p]
    if op == "Slice":
        data, bounds = fold(0), [fold(i) for i in range(1, len(inputs))]
        if data is None or any(b is None or not all(isinstance(v, int) for v in b) for b in bounds[:2]):
            return None
        steps = bounds[3] if len(bounds) > 3 and bounds[3] is not None else [1]
        return data[slice(bounds[0][0], bounds[1][0], steps[0])]
    if op == "Gather":
        data, index = fold(0), fold(1)
        if data is None or index is None or not all(isinstance(i, int) for i in index):
            return None
        return [data[i] for i in index]
    return None


def _input(ctx: GradContext, i: int) -> ir.Value | None:
    inputs = ctx.inputs
    return inputs[i] if i < len(inputs) else None


# ----------------------------------------------------------------------------- elementwise


@_rule("Add", "Sum")
def add_grad(ctx, dys):
    """Y = A + B (+ ...): each input gets dY summed over the axes it was broadcast along."""
    return [unbroadcast(ctx, dys[0], x) if need else None for x, need in zip(ctx.inputs, ctx.needs)]


@_rule("Mean")
def mean_grad(ctx, dys):
    """Y = (X_1 + ... + X_n) / n: dX_i = unbroadcast(dY / n)."""
    scaled = ctx.e.op("Mul", [dys[0], _scalar(ctx, "inv_n", 1.0 / len(ctx.inputs))], "scaled")
    return [unbroadcast(ctx, scaled, x) if need else None for x, need in zip(ctx.inputs, ctx.needs)]


@_rule("Sub")
def sub_grad(ctx, dys):
    """Y = A - B: dA = dY, dB = -dY (each unbroadcast)."""
    a, b = ctx.inputs
    da = unbroadcast(ctx, dys[0], a) if ctx.needs[0] else None
    db = unbroadcast(ctx, ctx.e.op("Neg", [dys[0]], "neg"), b) if ctx.needs[1] else None
    return [da, db]


@_rule("Mul")
def mul_grad(ctx, dys):
    """Y = A · B: dA = dY · B, dB = dY · A (each unbroadcast)."""
    a, b = ctx.inputs
    da = unbroadcast(ctx, ctx.e.op("Mul", [dys[0], b], "dY_B"), a) if ctx.needs[0] else None
    db = unbroadcast(ctx, ctx.e.op("Mul", [dys[0], a], "dY_A"), b) if ctx.needs[1] else None
    return [da, db]


@_rule("Div")
def div_grad(ctx, dys):
    """Y = A / B: dA = dY / B, dB = -dY · Y / B (each unbroadcast)."""
    a, b = ctx.inputs
    g = ctx.e.op("Div", [dys[0], b], "dY_over_B")
    da = unbroadcast(ctx, g, a) if ctx.needs[0] else None
    db = None
    if ctx.needs[1]:
        db = unbroadcast(ctx, ctx.e.op("Neg", [ctx.e.op("Mul", [g, ctx.outputs[0]], "g_Y")], "neg"), b)
    return [da, db]


@_rule("Neg")
def neg_grad(ctx, dys):
    """Y = -X: dX = -dY."""
    return [ctx.e.op("Neg", [dys[0]], "dX")]


@_rule("Identity")
def identity_grad(ctx, dys):
    """Y = X: dX = dY."""
    return [dys[0]]


@_rule("Abs")
def abs_grad(ctx, dys):
    """Y = |X|: dX = dY · sign(X) (0 at 0, as torch)."""
    return [ctx.e.op("Mul", [dys[0], ctx.e.op("Sign", [ctx.inputs[0]], "sign")], "dX")]


@_rule("Reciprocal")
def reciprocal_grad(ctx, dys):
    """Y = 1/X: dX = -dY · Y²."""
    y = ctx.outputs[0]
    squared = ctx.e.op("Mul", [y, y], "Y2")
    return [ctx.e.op("Neg", [ctx.e.op("Mul", [dys[0], squared], "dY_Y2")], "dX")]


@_rule("Sqrt")
def sqrt_grad(ctx, dys):
    """Y = √X: dX = dY / (2Y)."""
    quotient = ctx.e.op("Div", [dys[0], ctx.outputs[0]], "dY_over_Y")
    return [ctx.e.op("Mul", [quotient, _scalar(ctx, "half", 0.5)], "dX")]


@_rule("Pow")
def pow_grad(ctx, dys):
    """Y = A^B: dA = dY · B · A^(B-1); dB = dY · Y · ln A (each unbroadcast)."""
    e = ctx.e
    a, b = ctx.inputs
    y, dy = ctx.outputs[0], dys[0]
    da = db = None
    exponent = ctx.constant_array(b)
    if ctx.needs[0]:
        if exponent is not None and exponent.size == 1:
            p = float(np.asarray(exponent).reshape(-1)[0])
            if p == 0.0:
                da = _zeros_like(ctx, a, "dA")
            elif p == 1.0:
                da = unbroadcast(ctx, dy, a)
            else:
                power = a if p == 2.0 else e.op("Pow", [a, _scalar(ctx, "p_minus_1", p - 1.0)], "A_pow")
                da = unbroadcast(ctx, e.op("Mul", [dy, e.op("Mul", [power, _scalar(ctx, "p", p)], "p_A_pow")],
                                           "dA_full"), a)
        else:
            b_cast = b if _np_dtype(b) == _np_dtype(a) else e.op("Cast", [b], "B_cast", to=_onnx_dtype(ctx))
            power = e.op("Pow", [a, e.op("Sub", [b_cast, _scalar(ctx, "one", 1.0)], "B_minus_1")], "A_pow")
            da = unbroadcast(ctx, e.op("Mul", [dy, e.op("Mul", [b_cast, power], "B_A_pow")], "dA_full"), a)
    if ctx.needs[1]:
        log_a = e.op("Log", [a], "log_A")
        db = unbroadcast(ctx, e.op("Mul", [dy, e.op("Mul", [y, log_a], "Y_log_A")], "dB_full"), b)
    return [da, db]


@_rule("Max", "Min")
def maxmin_grad(ctx, dys):
    """Y = max(X_1, ...): dX_i = dY where X_i == Y, shared evenly among tied inputs (torch.maximum)."""
    e, y, dy = ctx.e, ctx.outputs[0], dys[0]
    if len(ctx.inputs) == 1:
        return [dy]
    to = _onnx_dtype(ctx)
    masks = [e.op("Cast", [e.op("Equal", [x, y], "is_max")], "mask", to=to) for x in ctx.inputs]
    count = e.op("Sum", masks, "ties")
    share = e.op("Div", [dy, count], "share")
    return [unbroadcast(ctx, e.op("Mul", [share, mask], "routed"), x) if need else None
            for x, mask, need in zip(ctx.inputs, masks, ctx.needs)]


@_rule("Where")
def where_grad(ctx, dys):
    """Y = where(C, A, B): dA = dY where C, dB = dY elsewhere (each unbroadcast)."""
    condition, a, b = ctx.inputs
    zero = _scalar(ctx, "zero", 0.0)
    da = unbroadcast(ctx, ctx.e.op("Where", [condition, dys[0], zero], "dA_full"), a) if ctx.needs[1] else None
    db = unbroadcast(ctx, ctx.e.op("Where", [condition, zero, dys[0]], "dB_full"), b) if ctx.needs[2] else None
    return [None, da, db]


# ----------------------------------------------------------------------------- activations


@_rule("Relu")
def relu_grad(ctx, dys):
    """Y = max(X, 0): dX = dY where Y > 0 (0 at 0, as torch)."""
    positive = ctx.e.op("Greater", [ctx.outputs[0], _scalar(ctx, "zero", 0.0)], "positive")
    return [_where(ctx, positive, dys[0], None, "dX")]


@_rule("LeakyRelu")
def leaky_relu_grad(ctx, dys):
    """Y = X if X > 0 else alpha·X: dX = dY where X > 0, alpha·dY elsewhere."""
    alpha = ctx.attr("alpha", 0.01)
    positive = ctx.e.op("Greater", [ctx.inputs[0], _scalar(ctx, "zero", 0.0)], "positive")
    scaled = ctx.e.op("Mul", [dys[0], _scalar(ctx, "alpha", alpha)], "alpha_dY")
    return [ctx.e.op("Where", [positive, dys[0], scaled], "dX")]


@_rule("PRelu")
def prelu_grad(ctx, dys):
    """Y = X if X > 0 else s·X: dX = dY or s·dY; ds = unbroadcast(dY·X where X <= 0)."""
    e = ctx.e
    x, slope = ctx.inputs
    positive = e.op("Greater", [x, _scalar(ctx, "zero", 0.0)], "positive")
    dx = e.op("Where", [positive, dys[0], e.op("Mul", [dys[0], slope], "slope_dY")], "dX") if ctx.needs[0] else None
    ds = None
    if ctx.needs[1]:
        ds = unbroadcast(ctx, _where(ctx, positive, _scalar(ctx, "zero", 0.0), e.op("Mul", [dys[0], x], "dY_X"),
                                     "dslope_full"), slope)
    return [dx, ds]


@_rule("Sigmoid")
def sigmoid_grad(ctx, dys):
    """Y = σ(X): dX = dY · Y · (1 - Y)."""
    y = ctx.outputs[0]
    slope = ctx.e.op("Mul", [y, ctx.e.op("Sub", [_scalar(ctx, "one", 1.0), y], "one_minus_Y")], "slope")
    return [ctx.e.op("Mul", [dys[0], slope], "dX")]


@_rule("Tanh")
def tanh_grad(ctx, dys):
    """Y = tanh(X): dX = dY · (1 - Y²)."""
    y = ctx.outputs[0]
    slope = ctx.e.op("Sub", [_scalar(ctx, "one", 1.0), ctx.e.op("Mul", [y, y], "Y2")], "slope")
    return [ctx.e.op("Mul", [dys[0], slope], "dX")]


@_rule("Clip")
def clip_grad(ctx, dys):
    """Y = clamp(X, min, max): dX = dY where min < X < max (torch's relu6/hardtanh, the sources of Clip in
    exported CNNs: a ReLU6 input of exactly 0, e.g. a bias-free conv over zero padding, passes no gradient);
    dmin = dY where X < min, dmax = dY where X > max."""
    e = ctx.e
    x = ctx.inputs[0]
    low, high = _input(ctx, 1), _input(ctx, 2)
    if low is None and "min" in ctx.node.attributes:  # opset < 11
        low = _scalar(ctx, "min", ctx.attr("min"))
    if high is None and "max" in ctx.node.attributes:
        high = _scalar(ctx, "max", ctx.attr("max"))
    conditions = []
    if low is not None:
        conditions.append(e.op("Greater", [x, low], "above_min"))
    if high is not None:
        conditions.append(e.op("Less", [x, high], "below_max"))
    grads: Grads = [None, None, None]
    if ctx.needs[0]:
        if not conditions:
            grads[0] = dys[0]
        else:
            inside = conditions[0] if len(conditions) == 1 else e.op("And", conditions, "inside")
            grads[0] = _where(ctx, inside, dys[0], None, "dX")
    if len(ctx.needs) > 1 and ctx.needs[1] and low is not None:
        grads[1] = unbroadcast(ctx, _where(ctx, e.op("Less", [x, low], "under"), dys[0], None, "dmin_full"), low)
    if len(ctx.needs) > 2 and ctx.needs[2] and high is not None:
        grads[2] = unbroadcast(ctx, _where(ctx, e.op("Greater", [x, high], "over"), dys[0], None, "dmax_full"), high)
    return grads


@_rule("HardSigmoid")
def hard_sigmoid_grad(ctx, dys):
    """Y = clamp(alpha·X + beta, 0, 1): dX = alpha·dY where 0 < alpha·X + beta < 1 (strict, as torch)."""
    e = ctx.e
    alpha, beta = ctx.attr("alpha", 0.2), ctx.attr("beta", 0.5)
    t = e.op("Add", [e.op("Mul", [ctx.inputs[0], _scalar(ctx, "alpha", alpha)], "alpha_X"),
                     _scalar(ctx, "beta", beta)], "t")
    inside = e.op("And", [e.op("Greater", [t, _scalar(ctx, "zero", 0.0)], "above_0"),
                          e.op("Less", [t, _scalar(ctx, "one", 1.0)], "below_1")], "inside")
    return [_where(ctx, inside, e.op("Mul", [dys[0], _scalar(ctx, "alpha", alpha)], "alpha_dY"), None, "dX")]


@_rule("HardSwish")
def hard_swish_grad(ctx, dys):
    """Y = X·clamp(X/6 + 1/2, 0, 1): dX = 0 for X <= -3, dY for X >= 3, dY·(X/3 + 1/2) between (torch)."""
    e = ctx.e
    x, dy = ctx.inputs[0], dys[0]
    slope = e.op("Add", [e.op("Mul", [x, _scalar(ctx, "third", 1.0 / 3.0)], "x_third"), _scalar(ctx, "half", 0.5)],
                 "slope")
    middle = e.op("Where", [e.op("Less", [x, _scalar(ctx, "three", 3.0)], "below_3"),
                            e.op("Mul", [dy, slope], "slope_dY"), dy], "upper")
    low = e.op("LessOrEqual", [x, _scalar(ctx, "minus_three", -3.0)], "below_minus_3")
    return [e.op("Where", [low, _scalar(ctx, "zero", 0.0), middle], "dX")]


@_rule("Elu")
def elu_grad(ctx, dys):
    """Y = X if X > 0 else alpha·(e^X - 1): dX = dY for X > 0, dY·(Y + alpha) otherwise."""
    e = ctx.e
    alpha = ctx.attr("alpha", 1.0)
    y = ctx.outputs[0]
    sign_source = y if alpha > 0 else ctx.inputs[0]
    positive = e.op("Greater", [sign_source, _scalar(ctx, "zero", 0.0)], "positive")
    negative = e.op("Mul", [dys[0], e.op("Add", [y, _scalar(ctx, "alpha", alpha)], "Y_alpha")], "neg_branch")
    return [e.op("Where", [positive, dys[0], negative], "dX")]


@_rule("Selu")
def selu_grad(ctx, dys):
    """Y = gamma·(X if X > 0 else alpha·(e^X - 1)): dX = gamma·dY for X > 0, dY·(Y + alpha·gamma) otherwise."""
    e = ctx.e
    alpha = ctx.attr("alpha", 1.67326319217681884765625)
    gamma = ctx.attr("gamma", 1.05070102214813232421875)
    y = ctx.outputs[0]
    positive = e.op("Greater", [y, _scalar(ctx, "zero", 0.0)], "positive")
    pos = e.op("Mul", [dys[0], _scalar(ctx, "gamma", gamma)], "pos_branch")
    neg = e.op("Mul", [dys[0], e.op("Add", [y, _scalar(ctx, "alpha_gamma", alpha * gamma)], "Y_ag")], "neg_branch")
    return [e.op("Where", [positive, pos, neg], "dX")]


@_rule("Softplus")
def softplus_grad(ctx, dys):
    """Y = ln(1 + e^X): dX = dY · σ(X) (1/2 at 0, as torch)."""
    return [ctx.e.op("Mul", [dys[0], ctx.e.op("Sigmoid", [ctx.inputs[0]], "sigmoid")], "dX")]


@_rule("Mish")
def mish_grad(ctx, dys):
    """Y = X·tanh(softplus(X)): dX = dY·(t + X·(1 - t²)·σ(X)), t = tanh(softplus(X))."""
    e, x = ctx.e, ctx.inputs[0]
    t = e.op("Tanh", [e.op("Softplus", [x], "softplus")], "t")
    sech2 = e.op("Sub", [_scalar(ctx, "one", 1.0), e.op("Mul", [t, t], "t2")], "sech2")
    tail = e.op("Mul", [e.op("Mul", [x, sech2], "x_sech2"), e.op("Sigmoid", [x], "sigmoid")], "tail")
    return [e.op("Mul", [dys[0], e.op("Add", [t, tail], "slope")], "dX")]


@_rule("Celu")
def celu_grad(ctx, dys):
    """Y = max(0, X) + min(0, alpha·(e^(X/alpha) - 1)): dX = dY for X > 0, dY·(Y/alpha + 1) otherwise."""
    e, y = ctx.e, ctx.outputs[0]
    alpha = ctx.attr("alpha", 1.0)
    positive = e.op("Greater", [y, _scalar(ctx, "zero", 0.0)], "positive")
    slope = e.op("Add", [e.op("Mul", [y, _scalar(ctx, "inv_alpha", 1.0 / alpha)], "y_over_alpha"),
                         _scalar(ctx, "one", 1.0)], "slope")
    return [e.op("Where", [positive, dys[0], e.op("Mul", [dys[0], slope], "neg_branch")], "dX")]


@_rule("Softsign")
def softsign_grad(ctx, dys):
    """Y = X / (1 + |X|): dX = dY / (1 + |X|)²."""
    e = ctx.e
    denominator = e.op("Add", [e.op("Abs", [ctx.inputs[0]], "abs"), _scalar(ctx, "one", 1.0)], "one_abs")
    return [e.op("Div", [dys[0], e.op("Mul", [denominator, denominator], "squared")], "dX")]


@_rule("Exp")
def exp_grad(ctx, dys):
    """Y = e^X: dX = dY · Y."""
    return [ctx.e.op("Mul", [dys[0], ctx.outputs[0]], "dX")]


@_rule("Log")
def log_grad(ctx, dys):
    """Y = ln X: dX = dY / X."""
    return [ctx.e.op("Div", [dys[0], ctx.inputs[0]], "dX")]


@_rule("Erf")
def erf_grad(ctx, dys):
    """Y = erf(X): dX = dY · 2/√π · e^(-X²)."""
    e, x = ctx.e, ctx.inputs[0]
    density = e.op("Exp", [e.op("Neg", [e.op("Mul", [x, x], "X2")], "minus_X2")], "exp")
    return [e.op("Mul", [dys[0], e.op("Mul", [density, _scalar(ctx, "two_over_sqrt_pi", _TWO_OVER_SQRT_PI)],
                                      "slope")], "dX")]


@_rule("Gelu")
def gelu_grad(ctx, dys):
    """Y = X·Φ(X): dX = dY·(Φ(X) + X·φ(X)); approximate='tanh' differentiates the tanh form (torch)."""
    e, x = ctx.e, ctx.inputs[0]
    approximate = ctx.attr("approximate", "none")
    half = _scalar(ctx, "half", 0.5)
    one = _scalar(ctx, "one", 1.0)
    x2 = e.op("Mul", [x, x], "X2")
    if approximate == "tanh":
        k = 0.044715
        inner = e.op("Mul", [e.op("Add", [x, e.op("Mul", [e.op("Mul", [x2, x], "X3"), _scalar(ctx, "k", k)], "kX3")],
                                  "poly"), _scalar(ctx, "c", _SQRT_2_OVER_PI)], "u")
        t = e.op("Tanh", [inner], "t")
        left = e.op("Mul", [e.op("Add", [one, t], "one_plus_t"), half], "left")
        du = e.op("Mul", [e.op("Add", [one, e.op("Mul", [x2, _scalar(ctx, "3k", 3 * k)], "3kX2")], "dpoly"),
                          _scalar(ctx, "c", _SQRT_2_OVER_PI)], "du")
        sech2 = e.op("Sub", [one, e.op("Mul", [t, t], "t2")], "sech2")
        right = e.op("Mul", [e.op("Mul", [e.op("Mul", [x, half], "half_x"), sech2], "hx_sech2"), du], "right")
        slope = e.op("Add", [left, right], "slope")
    elif approximate == "none":
        cdf = e.op("Mul", [e.op("Add", [one, e.op("Erf", [e.op("Mul", [x, _scalar(ctx, "inv_sqrt2", 1 / math.sqrt(2))],
                                                                "x_s")], "erf")], "one_erf"), half], "cdf")
        pdf = e.op("Mul", [e.op("Exp", [e.op("Mul", [x2, _scalar(ctx, "minus_half", -0.5)], "mh_x2")], "exp"),
                           _scalar(ctx, "inv_sqrt_2pi", _INV_SQRT_2PI)], "pdf")
        slope = e.op("Add", [cdf, e.op("Mul", [x, pdf], "x_pdf")], "slope")
    else:
        _refuse(ctx, f"approximate={approximate!r}")
    return [e.op("Mul", [dys[0], slope], "dX")]


def _softmax_axis(ctx: GradContext) -> int:
    rank = _rank(ctx, ctx.inputs[0])
    axis = _norm_axis(ctx.attr("axis", -1 if _opset(ctx) >= 13 else 1), rank)
    if _opset(ctx) < 13 and axis != rank - 1:
        _refuse(ctx, "in opset < 13 over several axes (coerced to 2-D)")
    return axis


@_rule("Softmax")
def softmax_grad(ctx, dys):
    """Y = softmax(X) along axis: dX = Y · (dY - Σ_axis dY·Y)."""
    e, y, dy = ctx.e, ctx.outputs[0], dys[0]
    axis = _softmax_axis(ctx)
    total = e.op("ReduceSum", [e.op("Mul", [dy, y], "dY_Y"), _ints(ctx, "axis", [axis])], "sum", keepdims=1)
    return [e.op("Mul", [y, e.op("Sub", [dy, total], "centered")], "dX")]


@_rule("LogSoftmax")
def log_softmax_grad(ctx, dys):
    """Y = log softmax(X) along axis: dX = dY - e^Y · Σ_axis dY."""
    e, y, dy = ctx.e, ctx.outputs[0], dys[0]
    axis = _softmax_axis(ctx)
    total = e.op("ReduceSum", [dy, _ints(ctx, "axis", [axis])], "sum", keepdims=1)
    return [e.op("Sub", [dy, e.op("Mul", [e.op("Exp", [y], "softmax"), total], "p_sum")], "dX")]


# ----------------------------------------------------------------------------- shape ops


@_rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape_grad(ctx, dys):
    """Y = X with another shape: dX = reshape(dY, shape(X))."""
    return [_reshape_like(ctx, dys[0], ctx.inputs[0])]


@_rule("Transpose")
def transpose_grad(ctx, dys):
    """Y = transpose(X, perm): dX = transpose(dY, perm⁻¹)."""
    perm = ctx.attr("perm")
    if perm is None:
        perm = list(reversed(range(_rank(ctx, ctx.inputs[0]))))
    return [ctx.e.op("Transpose", [dys[0]], "dX", perm=[int(i) for i in np.argsort(perm)])]


@_rule("Concat")
def concat_grad(ctx, dys):
    """Y = concat(X_1, ..., axis): dX_i = the i-th slab of dY (one Split with the inputs' sizes)."""
    e, inputs = ctx.e, ctx.inputs
    if len(inputs) == 1:
        return [dys[0]]
    rank = _rank(ctx, ctx.outputs[0], "an output of unknown rank")
    axis = _norm_axis(ctx.attr("axis"), rank)
    sizes = [(_dims(x) or [None] * rank)[axis] for x in inputs]
    if all(isinstance(s, int) for s in sizes):
        split = _ints(ctx, "sizes", sizes)
    else:
        parts = [_ints(ctx, "size", [s]) if isinstance(s, int) else
                 e.op("Gather", [e.op("Shape", [x], "shape"), _ints(ctx, "axis", [axis])], "size")
                 for x, s in zip(inputs, sizes)]
        split = e.op("Concat", parts, "sizes", axis=0)
    return e.ops("Split", [dys[0], split], "dX", outputs=len(inputs), axis=axis)


@_rule("Split")
def split_grad(ctx, dys):
    """Y_1, ... = split(X, axis): dX = concat(dY_1, ..., axis), a missing dY_i as zeros."""
    outputs = ctx.outputs
    if len(outputs) == 1:
        return [dys[0]]
    rank = _rank(ctx, ctx.inputs[0])
    axis = _norm_axis(ctx.attr("axis", 0), rank)
    parts = [dy if dy is not None else _zeros_like(ctx, y, f"zeros_{i}") for i, (dy, y) in enumerate(zip(dys, outputs))]
    return [ctx.e.op("Concat", parts, "dX", axis=axis), None]


@_rule("Slice")
def slice_grad(ctx, dys):
    """Y = X[starts:ends:steps]: dX = dY zero-padded back to X's shape (steps ≠ 1: a one-hot MatMul per axis)."""
    e, x = ctx.e, ctx.inputs[0]
    rank = _rank(ctx, x)
    dims = _dims(x)
    starts = _constant_ints(ctx, _input(ctx, 1), "starts")
    ends = _constant_ints(ctx, _input(ctx, 2), "ends")
    axes = _constant_ints(ctx, _input(ctx, 3), "axes") or list(range(len(starts)))
    steps = _constant_ints(ctx, _input(ctx, 4), "steps") or [1] * len(starts)
    begin_pad, end_pad = [0] * rank, [0] * rank
    grad = dys[0]
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _norm_axis(axis, rank)
        size = dims[axis]
        if not isinstance(size, int):
            if step == 1 and start >= 0 and end >= 2**31 - 1:
                begin_pad[axis] = start
                continue
            _refuse(ctx, f"along axis {axis} of unknown size")
        picked = range(size)[slice(start, end, step)]
        if step == 1:
            if len(picked) == 0:
                return [_zeros_like(ctx, x, "dX")]
            begin_pad[axis], end_pad[axis] = picked.start, size - picked.stop
        else:
            matrix = np.zeros((len(picked), size))
            matrix[np.arange(len(picked)), list(picked)] = 1.0
            grad = _apply_axis(ctx, grad, axis, rank, matrix, f"unslice_{axis}")
    if any(begin_pad) or any(end_pad):
        grad = e.op("Pad", [grad, _ints(ctx, "pads", begin_pad + end_pad)], "dX", mode="constant")
    return [grad]


@_rule("Gather")
def gather_grad(ctx, dys):
    """Y = take(X, I, axis) with constant I: dX = onehot(I)ᵀ · dY along axis (repeats add up)."""
    x, index = ctx.inputs
    rank = _rank(ctx, x)
    axis = _norm_axis(ctx.attr("axis", 0), rank)
    indices = ctx.constant_array(index)
    if indices is None:
        _refuse(ctx, "with non-constant indices")
    dims = _dims(x)
    size = dims[axis]
    if not isinstance(size, int):
        _refuse(ctx, f"along axis {axis} of unknown size")
    flat = np.asarray(indices, dtype=np.int64).reshape(-1)
    flat = np.where(flat < 0, flat + size, flat)
    onehot = np.zeros((flat.size, size))
    onehot[np.arange(flat.size), flat] = 1.0
    target = [d if isinstance(d, int) else ("src", i) for i, d in enumerate(dims)]
    target[axis] = int(flat.size)
    grad = ctx.e.op("Reshape", [dys[0], _shape_value(ctx, target, x, "gathered_shape")], "gathered")
    return [_apply_axis(ctx, grad, axis, rank, onehot, "dX"), None]


@_rule("Expand")
def expand_grad(ctx, dys):
    """Y = broadcast(X, shape): dX = dY summed over the broadcast axes."""
    return [unbroadcast(ctx, dys[0], ctx.inputs[0]), None]


@_rule("Pad")
def pad_grad(ctx, dys):
    """Y = pad(X, pads) in constant mode: dX = dY sliced back to X's region (cropped parts get 0)."""
    e, x = ctx.e, ctx.inputs[0]
    mode = ctx.attr("mode", "constant")
    if mode != "constant":
        _refuse(ctx, f"mode {mode}")
    rank = _rank(ctx, x)
    pads = _constant_ints(ctx, _input(ctx, 1), "pads")
    if pads is None:  # opset < 11
        pads = [int(p) for p in ctx.attr("pads")]
    axes = _constant_ints(ctx, _input(ctx, 3), "axes") or list(range(rank))
    axes = [_norm_axis(a, rank) for a in axes]
    begins, ends = pads[: len(axes)], pads[len(axes):]
    slice_starts, slice_ends, slice_axes = [], [], []
    regrow = [0] * (2 * rank)
    for axis, begin, end in zip(axes, begins, ends):
        if begin > 0 or end > 0:
            slice_axes.append(axis)
            slice_starts.append(max(begin, 0))
            slice_ends.append(-end if end > 0 else INT64_MAX)
        regrow[axis], regrow[rank + axis] = max(-begin, 0), max(-end, 0)
    grad = dys[0]
    if slice_axes:
        grad = e.op("Slice", [grad, _ints(ctx, "starts", slice_starts), _ints(ctx, "ends", slice_ends),
                              _ints(ctx, "axes", slice_axes)], "dX")
    if any(regrow):
        grad = e.op("Pad", [grad, _ints(ctx, "regrow", regrow)], "dX", mode="constant")
    return [grad]


@_rule("Tile")
def tile_grad(ctx, dys):
    """Y = tile(X, repeats): dX = dY reshaped to (r_0, d_0, r_1, d_1, ...) and summed over the r axes."""
    x = ctx.inputs[0]
    repeats = _constant_ints(ctx, _input(ctx, 1), "repeats")
    dims = _dims(x)
    if dims is None:
        _refuse(ctx, "on an input of unknown rank")
    interleaved = []
    for i, (r, d) in enumerate(zip(repeats, dims)):
        interleaved += [r, d if isinstance(d, int) else ("src", i)]
    unknown = [d for d in interleaved if not isinstance(d, int)]
    if len(unknown) > 1:
        _refuse(ctx, "with several dimensions of unknown size")
    grad = ctx.e.op("Reshape", [dys[0], _shape_value(ctx, interleaved, x, "interleaved_shape")], "interleaved")
    axes = [2 * i for i in range(len(repeats))]
    return [ctx.e.op("ReduceSum", [grad, _ints(ctx, "repeat_axes", axes)], "dX", keepdims=0), None]


# ----------------------------------------------------------------------------- reductions


def _reduce_axes(ctx: GradContext, rank: int) -> list[int] | None:
    """The reduced axes (sorted, non-negative), or None for 'no reduction' (noop_with_empty_axes)."""
    axes = ctx.attr("axes")
    if axes is None:
        axes = _constant_ints(ctx, _input(ctx, 1), "axes")
    axes = list(axes or [])
    if not axes:
        return None if ctx.attr("noop_with_empty_axes", 0) else list(range(rank))
    return sorted(_norm_axis(int(a), rank) for a in axes)


@_rule("ReduceSum", "ReduceMean")
def reduce_grad(ctx, dys):
    """Y = Σ (or mean) of X over axes: dX = dY (/ count) broadcast back over the reduced axes."""
    e, x, y = ctx.e, ctx.inputs[0], ctx.outputs[0]
    rank = _rank(ctx, x)
    axes = _reduce_axes(ctx, rank)
    if axes is None:
        return [dys[0]]
    grad = dys[0]
    if not ctx.attr("keepdims", 1):
        grad = e.op("Unsqueeze", [grad, _ints(ctx, "axes", axes)], "kept")
    dims = _dims(x)
    reduced = [dims[a] for a in axes]
    if ctx.node.op_type == "ReduceMean":
        if all(isinstance(d, int) for d in reduced):
            grad = e.op("Mul", [grad, _scalar(ctx, "inv_count", 1.0 / max(1, int(np.prod(reduced))))], "mean")
        else:
            count = e.op("Div", [e.op("Size", [x], "size_X"), e.op("Size", [y], "size_Y")], "count_int")
            grad = e.op("Div", [grad, e.op("Cast", [count], "count", to=_onnx_dtype(ctx))], "mean")
    if all(isinstance(d, int) for d in reduced):
        target = _ints(ctx, "expand_shape", [dims[a] if a in axes else 1 for a in range(rank)])
    else:
        target = e.op("Shape", [x], "expand_shape")
    return [e.op("Expand", [grad, target], "dX")] + [None] * (len(ctx.inputs) - 1)


def _kept(ctx: GradContext, value: ir.Value, axes: list[int], name: str) -> ir.Value:
    """``value`` (a reduction's output or its gradient) with the reduced axes back as 1s."""
    if ctx.attr("keepdims", 1):
        return value
    return ctx.e.op("Unsqueeze", [value, _ints(ctx, "axes", axes)], name)


@_rule("ReduceMax", "ReduceMin")
def reduce_max_grad(ctx, dys):
    """Y = max (min) of X over axes: dX = dY where X == Y, shared evenly among ties (torch.amax)."""
    e, x = ctx.e, ctx.inputs[0]
    axes = _reduce_axes(ctx, _rank(ctx, x))
    if axes is None:
        return [dys[0]]
    hit = e.op("Cast", [e.op("Equal", [x, _kept(ctx, ctx.outputs[0], axes, "Y_kept")], "is_extreme")], "hits",
               to=_onnx_dtype(ctx))
    ties = e.op("ReduceSum", [hit, _ints(ctx, "axes", axes)], "ties", keepdims=1)
    share = e.op("Div", [_kept(ctx, dys[0], axes, "dY_kept"), ties], "share")
    return [e.op("Mul", [hit, share], "dX")]


@_rule("ReduceL2")
def reduce_l2_grad(ctx, dys):
    """Y = √(Σ X²) over axes: dX = dY · X / Y, 0 where Y = 0 (torch's norm)."""
    e, x = ctx.e, ctx.inputs[0]
    axes = _reduce_axes(ctx, _rank(ctx, x))
    if axes is None:
        return [e.op("Mul", [dys[0], e.op("Sign", [x], "sign")], "dX")]
    y = _kept(ctx, ctx.outputs[0], axes, "Y_kept")
    zero = _scalar(ctx, "zero", 0.0)
    safe = e.op("Where", [e.op("Equal", [y, zero], "is_zero"), _scalar(ctx, "one", 1.0), y], "safe_Y")
    ratio = e.op("Where", [e.op("Equal", [y, zero], "is_zero"), zero,
                           e.op("Div", [_kept(ctx, dys[0], axes, "dY_kept"), safe], "dY_over_Y")], "ratio")
    return [e.op("Mul", [x, ratio], "dX")]


@_rule("ReduceSumSquare")
def reduce_sum_square_grad(ctx, dys):
    """Y = Σ X² over axes: dX = 2 · X · dY (broadcast back)."""
    e, x = ctx.e, ctx.inputs[0]
    axes = _reduce_axes(ctx, _rank(ctx, x))
    grad = dys[0] if axes is None else _kept(ctx, dys[0], axes, "dY_kept")
    return [e.op("Mul", [e.op("Mul", [x, _scalar(ctx, "two", 2.0)], "two_X"), grad], "dX")]


# ----------------------------------------------------------------------------- pooling


def _spatial_static(ctx: GradContext, value: ir.Value) -> list[int]:
    dims = _dims(value)
    if dims is None or len(dims) < 3 or not all(isinstance(d, int) for d in dims[2:]):
        _refuse(ctx, "with spatial sizes unknown at compile time")
    return list(dims[2:])


def _pool_geometry(ctx: GradContext):
    """(in sizes, out sizes, kernel, strides, dilations, pads begin, pads end) of a pooling node."""
    in_sizes = _spatial_static(ctx, ctx.inputs[0])
    out_sizes = _spatial_static(ctx, ctx.outputs[0])
    n = len(in_sizes)
    kernel = [int(k) for k in ctx.attr("kernel_shape")]
    strides = [int(s) for s in (ctx.attr("strides") or [1] * n)]
    dilations = [int(d) for d in (ctx.attr("dilations") or [1] * n)]
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for i in range(n):
            total = max((out_sizes[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - in_sizes[i], 0)
            small, large = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else large)
            ends.append(total - begins[-1])
    elif auto_pad == "VALID":
        begins, ends = [0] * n, [0] * n
    else:
        pads = [int(p) for p in (ctx.attr("pads") or [0] * (2 * n))]
        begins, ends = pads[:n], pads[n:]
    return in_sizes, out_sizes, kernel, strides, dilations, begins, ends


@_rule("MaxPool")
def max_pool_grad(ctx, dys):
    """Y = max over each window: dX = dY added at each window's (first) argmax.

    The argmax comes from the node's Indices output when it has one (then X need not be
    kept for the backward), else from MaxPool recomputed with Indices; onnxruntime's
    indices are flat over N·C·H·W, so the gradient is a 1-D ScatterElements-add into
    zeros (opset ≥ 16). Below opset 16 (no reduction attribute): a plain scatter when
    windows do not overlap, else col2im (`_max_pool_col2im`).
    """
    e, x, dy = ctx.e, ctx.inputs[0], dys[0]
    if dy is None:
        return [None]
    indices = ctx.outputs[1] if len(ctx.outputs) > 1 and ctx.outputs[1] is not None else None
    if indices is None or ctx.attr("storage_order", 0) != 0:
        attributes = {name: attr.value for name, attr in ctx.node.attributes.items()}
        attributes["storage_order"] = 0
        indices = e.ops("MaxPool", [x], "argmax", outputs=2, **attributes)[1]
    kernel = [int(k) for k in ctx.attr("kernel_shape")]
    strides = [int(s) for s in (ctx.attr("strides") or [1] * len(kernel))]
    dilations = [int(d) for d in (ctx.attr("dilations") or [1] * len(kernel))]
    opset = _opset(ctx)
    overlapping = any(s < (k - 1) * d + 1 for s, k, d in zip(strides, kernel, dilations))
    if opset < 16 and overlapping:
        in_sizes, _, _, _, _, begins, _ = _pool_geometry(ctx)
        return [_max_pool_col2im(ctx, dy, indices, in_sizes, kernel, strides, dilations, begins)]
    dims = _dims(x)
    if all(isinstance(d, int) for d in dims):
        total = _ints(ctx, "numel", [int(np.prod(dims))])
    else:
        total = e.op("Reshape", [e.op("Size", [x], "size"), _ints(ctx, "one", [1])], "numel")
    zeros = e.op("ConstantOfShape", [total], "zeros", value=ir.tensor(np.zeros(1, dtype=_dtype(ctx))))
    flat_index = e.op("Reshape", [indices, _ints(ctx, "flat", [-1])], "flat_indices")
    flat_dy = e.op("Reshape", [dy, _ints(ctx, "flat", [-1])], "flat_dY")
    extra = {"reduction": "add"} if opset >= 16 else {}
    scattered = e.op("ScatterElements", [zeros, flat_index, flat_dy], "scattered", axis=0, **extra)
    return [_reshape_like(ctx, scattered, x)]


def _max_pool_col2im(ctx, dy, indices, in_sizes, kernel, strides, dilations, begins) -> ir.Value:
    """Opset < 16 MaxPool gradient for overlapping windows: route dY to each window's argmax
    offset (one-hot over the K kernel positions, the planes N·C folded into the batch), then
    one ConvTranspose with a one-hot kernel per offset places every offset at its input position."""
    e, x = ctx.e, ctx.inputs[0]
    n = len(in_sizes)
    rank = n + 2
    out_sizes = _spatial_static(ctx, ctx.outputs[0])
    plane = int(np.prod(in_sizes))
    k_total = int(np.prod(kernel))
    position = e.op("Mod", [indices, _ints(ctx, "plane", plane)], "in_plane")
    offset = None
    for j in range(n):
        inner = int(np.prod(in_sizes[j + 1:]))
        coord = position if inner == 1 else e.op("Div", [position, _ints(ctx, "inner", inner)], f"coord_{j}")
        if j > 0:
            coord = e.op("Mod", [coord, _ints(ctx, "size", in_sizes[j])], f"coord_{j}")
        grid_shape = [1] * rank
        grid_shape[2 + j] = out_sizes[j]
        start = (np.arange(out_sizes[j]) * strides[j] - begins[j]).reshape(grid_shape)
        local = e.op("Sub", [coord, ctx.e.ints(f"window_start_{j}", start)], f"local_{j}")
        if dilations[j] != 1:
            local = e.op("Div", [local, _ints(ctx, "dilation", dilations[j])], f"local_{j}")
        weight = int(np.prod(kernel[j + 1:]))
        term = local if weight == 1 else e.op("Mul", [local, _ints(ctx, "weight", weight)], f"term_{j}")
        offset = term if offset is None else e.op("Add", [offset, term], "offset")
    offsets = np.arange(k_total, dtype=np.int64).reshape([1, 1, k_total] + [1] * n)
    onehot = e.op("Equal", [e.op("Unsqueeze", [offset, _ints(ctx, "axis", [2])], "offset_k"),
                            ctx.e.ints("kernel_offsets", offsets)], "onehot")
    routed = e.op("Where", [onehot, e.op("Unsqueeze", [dy, _ints(ctx, "axis", [2])], "dY_k"),
                            _scalar(ctx, "zero", 0.0)], "routed")
    columns = e.op("Reshape", [routed, _ints(ctx, "columns_shape", [-1, k_total] + out_sizes)], "columns")
    kernel_weights = np.zeros([k_total, 1] + kernel, dtype=_dtype(ctx))
    for q, pos in enumerate(np.ndindex(*kernel)):
        kernel_weights[(q, 0) + pos] = 1.0
    spread = e.op("ConvTranspose", [columns, ctx.e.const("col2im_kernel", kernel_weights)], "spread",
                  kernel_shape=kernel, strides=strides, dilations=dilations, pads=list(begins) + [0] * n)
    natural = [(o - 1) * s + (k - 1) * d + 1 - b
               for o, s, k, d, b in zip(out_sizes, strides, kernel, dilations, begins)]
    return _reshape_like(ctx, _fit_spatial(ctx, spread, natural, in_sizes), x)


def _fit_spatial(ctx: GradContext, grad: ir.Value, have: list[int], want: list[int]) -> ir.Value:
    """Crop or zero-pad the trailing end of each spatial axis from ``have`` to ``want``."""
    e = ctx.e
    n = len(want)
    crop_axes = [2 + j for j in range(n) if have[j] > want[j]]
    if crop_axes:
        grad = e.op("Slice", [grad, _ints(ctx, "zeros", [0] * len(crop_axes)),
                              _ints(ctx, "ends", [want[a - 2] for a in crop_axes]), _ints(ctx, "axes", crop_axes)],
                    "cropped")
    grow = [max(w - h, 0) for h, w in zip(have, want)]
    if any(grow):
        grad = e.op("Pad", [grad, _ints(ctx, "pads", [0] * (n + 2) + [0, 0] + grow)], "grown", mode="constant")
    return grad


def _average_pool_matrix(in_size, out_size, kernel, stride, dilation, begin, include_pad) -> np.ndarray:
    """AveragePool along one axis as an (out, in) matrix, onnxruntime 1.19's divisors: the in-image
    count, or with count_include_pad the whole kernel, even for a ceil_mode window that overhangs the
    padded image (torch clips that one to the padded image)."""
    matrix = np.zeros((out_size, in_size))
    for o in range(out_size):
        start = o * stride - begin
        valid = [h for h in range(start, start + kernel * dilation, dilation) if 0 <= h < in_size]
        if valid:
            matrix[o, valid] = 1.0 / (kernel if include_pad else len(valid))
    return matrix


@_rule("AveragePool")
def average_pool_grad(ctx, dys):
    """Y = window means: separable, so dX = A_hᵀ · dY · A_w with constant (out x in) averaging matrices
    (divisors as onnxruntime's: `_average_pool_matrix`)."""
    in_sizes, out_sizes, kernel, strides, dilations, begins, _ = _pool_geometry(ctx)
    include_pad = bool(ctx.attr("count_include_pad", 0))
    rank = len(in_sizes) + 2
    matrices = [_average_pool_matrix(i, o, k, s, d, b, include_pad)
                for i, o, k, s, d, b in zip(in_sizes, out_sizes, kernel, strides, dilations, begins)]
    return [_apply_matrices(ctx, dys[0], matrices, rank, "dX")]


def _apply_matrices(ctx: GradContext, grad: ir.Value, matrices: list[np.ndarray | None], rank: int,
                    name: str) -> ir.Value:
    """Apply per-spatial-axis (out x in) matrices transposed, the most shrinking axis first."""
    order = sorted((j for j, m in enumerate(matrices) if m is not None),
                   key=lambda j: matrices[j].shape[1] / matrices[j].shape[0])
    for j in order:
        grad = _apply_axis(ctx, grad, rank - len(matrices) + j, rank, matrices[j], f"{name}_axis{j}")
    return grad


@_rule("GlobalAveragePool")
def global_average_pool_grad(ctx, dys):
    """Y = mean over H·W: dX = dY / (H·W) broadcast over H, W (Mul on the small tensor, then one Expand,
    last, so a later pass can keep the spatially constant gradient small)."""
    e, x, y = ctx.e, ctx.inputs[0], ctx.outputs[0]
    dims = _dims(x)
    if dims is not None and len(dims) >= 3 and all(isinstance(d, int) for d in dims[2:]):
        spatial = list(dims[2:])
        scaled = e.op("Mul", [dys[0], _scalar(ctx, "inv_area", 1.0 / max(1, int(np.prod(spatial))))], "mean")
        full = e.op("Expand", [scaled, _ints(ctx, "spatial", [1, 1] + spatial)], "dX")
        return [mark_spatially_constant(full, scaled) if len(dims) == 4 else full]
    count = e.op("Cast", [e.op("Div", [e.op("Size", [x], "size_X"), e.op("Size", [y], "size_Y")], "area_int")],
                 "area", to=_onnx_dtype(ctx))
    return [e.op("Expand", [e.op("Div", [dys[0], count], "mean"), e.op("Shape", [x], "shape")], "dX")]


@_rule("GlobalMaxPool")
def global_max_pool_grad(ctx, dys):
    """Y = max over H·W: dX = dY at the first argmax of each (n, c) plane (torch's adaptive_max_pool)."""
    e, x = ctx.e, ctx.inputs[0]
    spatial = _spatial_static(ctx, x)
    area = int(np.prod(spatial))
    flat = e.op("Reshape", [x, _ints(ctx, "planes", [0, 0, area])], "planes")
    argmax = e.op("ArgMax", [flat], "argmax", axis=2, keepdims=1, select_last_index=0)
    onehot = e.op("Equal", [argmax, _ints(ctx, "positions", np.arange(area))], "onehot")
    dy = e.op("Reshape", [dys[0], _ints(ctx, "column", [0, 0, 1])], "dY_column")
    routed = _where(ctx, onehot, dy, None, "routed")
    return [e.op("Reshape", [routed, _ints(ctx, "x_shape", [0, 0] + spatial)], "dX")]


# ----------------------------------------------------------------------------- linear


@_rule("Gemm")
def gemm_grad(ctx, dys):
    """Y = alpha·A'·B' + beta·C (A' = A or Aᵀ, B' likewise): dA' = alpha·dY·B'ᵀ, dB' = alpha·A'ᵀ·dY,
    dC = beta·unbroadcast(dY); each emitted as one Gemm with the transposes folded in."""
    e, dy = ctx.e, dys[0]
    a, b = ctx.inputs[:2]
    c = _input(ctx, 2)
    alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
    trans_a, trans_b = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    scale = {"alpha": alpha} if alpha != 1.0 else {}
    da = db = dc = None
    if ctx.needs[0]:
        if not trans_a:
            da = e.op("Gemm", [dy, b], "dA", transB=1 - trans_b, **scale)
        else:
            da = e.op("Gemm", [b, dy], "dA", transA=trans_b, transB=1, **scale)
    if ctx.needs[1]:
        if not trans_b:
            db = e.op("Gemm", [a, dy], "dB", transA=1 - trans_a, **scale)
        else:
            db = e.op("Gemm", [dy, a], "dB", transA=1, transB=trans_a, **scale)
    if c is not None and len(ctx.needs) > 2 and ctx.needs[2]:
        scaled = dy if beta == 1.0 else e.op("Mul", [dy, _scalar(ctx, "beta", beta)], "beta_dY")
        dc = unbroadcast(ctx, scaled, c)
    return [da, db, dc]


def _swap_last(rank: int) -> list[int]:
    return list(range(rank - 2)) + [rank - 1, rank - 2]


@_rule("MatMul")
def matmul_grad(ctx, dys):
    """Y = A @ B (numpy semantics): dA = dY @ Bᵀ, dB = Aᵀ @ dY, each summed over its broadcast batch axes
    (a 1-D operand is promoted to a matrix and back)."""
    e, dy = ctx.e, dys[0]
    a, b = ctx.inputs
    y = ctx.outputs[0]
    ra, rb = _rank(ctx, a), _rank(ctx, b)
    _rank(ctx, y, "with an output of unknown rank")
    a_dims, b_dims, y_dims = _dims(a), _dims(b), _dims(y)
    da = db = None
    if ra == 1 and rb == 1:
        da = e.op("Mul", [dy, b], "dA") if ctx.needs[0] else None
        db = e.op("Mul", [dy, a], "dB") if ctx.needs[1] else None
        return [da, db]
    if ra == 1:  # Y[..., m] = Σ_k A[k] B[..., k, m]
        dy_row = e.op("Unsqueeze", [dy, _ints(ctx, "axis", [-2])], "dY_row")
        batch = y_dims[:-1]
        if ctx.needs[0]:  # (..., 1, k) summed over everything but k
            full = e.op("MatMul", [dy_row, e.op("Transpose", [b], "Bt", perm=_swap_last(rb))], "dA_rows")
            da = _sum_leading(ctx, full, len(batch) + 1)
        if ctx.needs[1]:
            a_col = e.op("Unsqueeze", [a, _ints(ctx, "axis", [-1])], "A_col")
            db = unbroadcast(ctx, e.op("MatMul", [a_col, dy_row], "dB_full"), b, batch + [a_dims[0], y_dims[-1]])
        return [da, db]
    if rb == 1:  # Y[..., n] = Σ_k A[..., n, k] B[k]
        if ctx.needs[0]:
            da = unbroadcast(ctx, e.op("Mul", [e.op("Unsqueeze", [dy, _ints(ctx, "axis", [-1])], "dY_col"), b],
                                       "dA_full"), a, y_dims + [b_dims[0]])
        if ctx.needs[1]:
            dy_row = e.op("Unsqueeze", [dy, _ints(ctx, "axis", [-2])], "dY_row")
            full = e.op("MatMul", [dy_row, a], "dB_rows")  # (..., 1, k)
            db = _sum_leading(ctx, full, len(y_dims))
        return [da, db]
    batch = y_dims[:-2]
    if ctx.needs[0]:
        full = e.op("MatMul", [dy, e.op("Transpose", [b], "Bt", perm=_swap_last(rb))], "dA_full")
        da = unbroadcast(ctx, full, a, batch + list(a_dims[-2:]))
    if ctx.needs[1]:
        k, m = a_dims[-1], y_dims[-1]
        if rb == 2 and ra > 2 and isinstance(k, int) and isinstance(m, int):
            a_rows = e.op("Reshape", [a, _ints(ctx, "rows_k", [-1, k])], "A_rows")
            dy_rows = e.op("Reshape", [dy, _ints(ctx, "rows_m", [-1, m])], "dY_rows")
            db = e.op("Gemm", [a_rows, dy_rows], "dB", transA=1)
        else:
            full = e.op("MatMul", [e.op("Transpose", [a], "At", perm=_swap_last(ra)), dy], "dB_full")
            db = unbroadcast(ctx, full, b, batch + list(b_dims[-2:]))
    return [da, db]


def _sum_leading(ctx: GradContext, grad: ir.Value, count: int) -> ir.Value:
    if count == 0:
        return grad
    return ctx.e.op("ReduceSum", [grad, _ints(ctx, "lead", range(count))], "lead_sum", keepdims=0)


# ----------------------------------------------------------------------------- Resize


def _f32(v) -> np.float32:
    return np.float32(v)


def _original_coordinate(mode: str, x: int, scale: np.float32, out_len: int, in_len: int) -> np.float32:
    """onnxruntime's resized → original coordinate, float32 arithmetic as in upsamplebase.h."""
    xf, lr, lo = _f32(x), _f32(out_len), _f32(in_len)
    with np.errstate(all="ignore"):
        if mode == "asymmetric":
            return xf / scale
        if mode == "pytorch_half_pixel":
            return (xf + _f32(0.5)) / scale - _f32(0.5) if out_len > 1 else _f32(0.0)
        if mode == "tf_half_pixel_for_nn":
            return (xf + _f32(0.5)) / scale
        if mode == "align_corners":
            return _f32(0.0) if out_len == 1 else xf * (lo - _f32(1)) / (lr - _f32(1))
        if mode == "half_pixel_symmetric":
            output_width = scale * lo
            adjustment = lr / output_width
            center = lo / _f32(2)
            offset = center * (_f32(1) - adjustment)
            return _f32(float(offset) + (float(xf) + 0.5) / float(scale) - 0.5)
        return (xf + _f32(0.5)) / scale - _f32(0.5)  # half_pixel


def _nearest_pixel(mode: str, original: np.float32) -> int:
    value = float(original)
    if mode == "floor":
        return math.floor(value)
    if mode == "ceil":
        return math.ceil(value)
    rounded = int(math.copysign(math.floor(abs(value) + 0.5), value))  # std::round
    if mode == "round_prefer_ceil":
        return rounded
    if value == float(_f32(int(value)) + _f32(0.5)):  # round_prefer_floor: halves go down
        return math.floor(value)
    return rounded


def _resize_matrix(mode: str, transform: str, nearest: str, in_len: int, out_len: int, scale: np.float32):
    """Resize along one axis as an (out, in) float32 matrix, onnxruntime's arithmetic."""
    matrix = np.zeros((out_len, in_len), dtype=np.float32)
    for o in range(out_len):
        if scale == _f32(1.0):
            original = _f32(o)
        else:
            original = _original_coordinate(transform, o, scale, out_len, in_len)
        if mode == "nearest":
            index = min(max(_nearest_pixel(nearest, original), 0), in_len - 1)
            matrix[o, index] += 1.0
            continue
        v = max(_f32(0.0), min(original, _f32(in_len - 1)))
        low = min(int(v), in_len - 1)
        high = min(low + 1, in_len - 1)
        d_low, d_high = abs(v - _f32(low)), abs(v - _f32(high))
        if low == high:
            d_low = d_high = _f32(0.5)
        matrix[o, low] += d_high
        matrix[o, high] += d_low
    return matrix


@_rule("Resize")
def resize_grad(ctx, dys):
    """Y = M_h · X · M_wᵀ per plane (nearest or linear, any resized axes): dX = M_hᵀ · dY · M_w,
    the constant matrices mirroring onnxruntime's coordinates; integer nearest upsampling that
    maps o → o // s is a Reshape + ReduceSum instead."""
    x, y = ctx.inputs[0], ctx.outputs[0]
    mode = ctx.attr("mode", "nearest")
    if mode not in ("nearest", "linear"):
        _refuse(ctx, f"mode {mode}")
    transform = ctx.attr("coordinate_transformation_mode", "half_pixel")
    if transform == "tf_crop_and_resize":
        _refuse(ctx, "coordinate_transformation_mode tf_crop_and_resize")
    if ctx.attr("antialias", 0):
        _refuse(ctx, "with antialias=1")
    nearest = ctx.attr("nearest_mode", "round_prefer_floor")
    x_dims, y_dims = _dims(x), _dims(y)
    if x_dims is None or y_dims is None:
        _refuse(ctx, "on tensors of unknown rank")
    rank = len(x_dims)
    axes = [_norm_axis(int(a), rank) for a in (ctx.attr("axes") or range(rank))]
    out_dims = list(y_dims)
    scales = [_f32(1.0)] * rank
    given_scales = _fold(ctx, _input(ctx, 2)) if _input(ctx, 2) is not None else None
    sizes_value = _input(ctx, 3)
    if _input(ctx, 2) is not None and given_scales is None and sizes_value is None:
        _refuse(ctx, "with non-constant scales")
    if given_scales:
        for axis, s in zip(axes, given_scales):
            if not isinstance(s, (int, float)):
                _refuse(ctx, "with non-constant scales")
            scales[axis] = _f32(s)
            if not isinstance(out_dims[axis], int) and isinstance(x_dims[axis], int):
                out_dims[axis] = int(_f32(s) * _f32(x_dims[axis]))  # onnxruntime's output size
    elif sizes_value is not None:
        if ctx.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
            _refuse(ctx, "with keep_aspect_ratio_policy other than stretch")
        sizes = _fold(ctx, sizes_value) or [None] * len(axes)
        for axis, size in zip(axes, sizes):
            i, o = x_dims[axis], out_dims[axis]
            if not isinstance(o, int) and size is not None:
                o = out_dims[axis] = size  # an int, or the key of a dimension read by Shape
            if _key(i) is not None and _key(i) in (_key(o), o):
                continue  # the same size (a symbolic batch kept by the exporter's Shape-derived sizes)
            if not (isinstance(i, int) and isinstance(o, int)):
                _refuse(ctx, f"along axis {axis} of unknown size")
            scales[axis] = _f32(1.0) if i == 0 else _f32(o) / _f32(i)
    else:
        _refuse(ctx, "without scales or sizes")
    matrices: list[np.ndarray | None] = [None] * rank
    blocks: list[int | None] = [None] * rank
    for axis in range(rank):
        i, o = x_dims[axis], out_dims[axis]
        if scales[axis] == _f32(1.0):  # onnxruntime copies such an axis as is
            continue
        if not (isinstance(i, int) and isinstance(o, int)):
            _refuse(ctx, f"along axis {axis} of unknown size")
        matrix = _resize_matrix(mode, transform, nearest, i, o, scales[axis])
        if i == o and np.array_equal(matrix, np.eye(i, dtype=np.float32)):
            continue
        matrices[axis] = matrix
        if mode == "nearest" and o % i == 0 and np.array_equal(matrix.argmax(1), np.arange(o) // (o // i)):
            blocks[axis] = o // i
    resized = [a for a in range(rank) if matrices[a] is not None]
    if not resized:
        return [dys[0]]
    if all(blocks[a] is not None for a in resized):
        return [_block_sum(ctx, dys[0], x, x_dims, blocks)]
    return [_apply_matrices(ctx, dys[0], matrices, rank, "dX")]


def _block_sum(ctx: GradContext, grad: ir.Value, x: ir.Value, x_dims: list, blocks: list) -> ir.Value:
    """Nearest upsampling by integer factors s (o → o // s): dX = Σ of dY over each s-block."""
    e = ctx.e
    target, axes = [], []
    for i, (d, s) in enumerate(zip(x_dims, blocks)):
        target.append(d if isinstance(d, int) else ("src", i))
        if s is not None:
            target.append(int(s))
            axes.append(len(target) - 1)
    unknown = [t for t in target if not isinstance(t, int)]
    if len(unknown) > 1:  # two unknown dims: name them 0 where Reshape can copy them (before the first split)
        first = axes[0] - 1
        target = [0 if (not isinstance(t, int) and k < first) else t for k, t in enumerate(target)]
        if sum(not isinstance(t, int) for t in target) > 1:
            matrices = [None if s is None else
                        np.repeat(np.eye(d, dtype=np.float32), s, axis=0) for d, s in zip(x_dims, blocks)]
            return _apply_matrices(ctx, grad, matrices, len(x_dims), "dX")
    blocked = e.op("Reshape", [grad, _shape_value(ctx, target, x, "blocked_shape")], "blocked")
    return e.op("ReduceSum", [blocked, _ints(ctx, "block_axes", axes)], "dX", keepdims=0)


# ----------------------------------------------------------------------------- normalization, casts


@_rule("BatchNormalization")
def batch_norm_grad(ctx, dys):
    """Inference mode, Y = scale·(X - mean)/√(var + eps) + bias: dX = dY·scale/√(var + eps) per channel;
    dscale = Σ dY·(X - mean)/√(var + eps), dbias = Σ dY over all but the channel axis."""
    e, dy = ctx.e, dys[0]
    if ctx.attr("training_mode", 0):
        _refuse(ctx, "in training mode (batch statistics)")
    if any(ctx.needs[3:5]):
        _refuse(ctx, "with trainable running mean or variance")
    x, scale, _, mean, var = ctx.inputs[:5]
    rank = _rank(ctx, x)
    eps = float(ctx.attr("epsilon", 1e-5))
    channel_shape = [-1] + [1] * (rank - 2)
    scale_c, var_c = ctx.constant_array(scale), ctx.constant_array(var)
    inv_std = None
    if scale_c is not None and var_c is not None:
        factor = _const(ctx, "factor", (scale_c.astype(np.float64) / np.sqrt(var_c.astype(np.float64) + eps))
                        .reshape(channel_shape))
    else:
        inv_std = e.op("Reciprocal", [e.op("Sqrt", [e.op("Add", [var, _scalar(ctx, "eps", eps)], "var_eps")],
                                           "std")], "inv_std")
        factor = e.op("Reshape", [e.op("Mul", [scale, inv_std], "factor_vec"), _ints(ctx, "channel", channel_shape)],
                      "factor")
    grads: Grads = [None] * len(ctx.inputs)
    if ctx.needs[0]:
        grads[0] = e.op("Mul", [dy, factor], "dX")
    others = [a for a in range(rank) if a != 1]
    if ctx.needs[1]:
        if inv_std is None:
            var_c = ctx.constant_array(var)
            inv_std = (_const(ctx, "inv_std", 1.0 / np.sqrt(var_c.astype(np.float64) + eps)) if var_c is not None else
                       e.op("Reciprocal", [e.op("Sqrt", [e.op("Add", [var, _scalar(ctx, "eps", eps)], "var_eps")],
                                                "std")], "inv_std"))
        centered = e.op("Sub", [x, e.op("Reshape", [mean, _ints(ctx, "channel", channel_shape)], "mean_c")],
                        "centered")
        summed = e.op("ReduceSum", [e.op("Mul", [dy, centered], "dY_centered"), _ints(ctx, "axes", others)],
                      "dscale_sum", keepdims=0)
        grads[1] = e.op("Mul", [summed, inv_std], "dscale")
    if ctx.needs[2]:
        grads[2] = e.op("ReduceSum", [dy, _ints(ctx, "axes", others)], "dbias", keepdims=0)
    return grads


def _normalization_backward(ctx: GradContext, dy: ir.Value, axes: list[int], gamma: ir.Value | None, eps: float,
                            mean: ir.Value | None = None, inv_std: ir.Value | None = None):
    """dX and X̂ of Y = gamma·X̂ + beta, X̂ = (X - μ)/√(σ² + eps) with μ, σ² over ``axes`` of X:
    dX = r·(g - mean(g) - X̂·mean(g·X̂)) with g = dY·gamma and r = 1/√(σ² + eps)."""
    e, x = ctx.e, ctx.inputs[0]
    dims = _dims(x)
    sizes = [dims[a] for a in axes]
    if not all(isinstance(d, int) for d in sizes):
        _refuse(ctx, "over axes of unknown size")
    axes_value = _ints(ctx, "norm_axes", axes)
    inv_count = _scalar(ctx, "inv_count", 1.0 / max(1, int(np.prod(sizes))))

    def average(value, name):
        return e.op("Mul", [e.op("ReduceSum", [value, axes_value], f"{name}_sum", keepdims=1), inv_count], name)

    if mean is None:
        mean = average(x, "mean")
    centered = e.op("Sub", [x, mean], "centered")
    if inv_std is None:
        variance = average(e.op("Mul", [centered, centered], "squares"), "variance")
        inv_std = e.op("Reciprocal", [e.op("Sqrt", [e.op("Add", [variance, _scalar(ctx, "eps", eps)], "var_eps")],
                                            "std")], "inv_std")
    x_hat = e.op("Mul", [centered, inv_std], "x_hat")
    g = dy if gamma is None else e.op("Mul", [dy, gamma], "g")
    inner = e.op("Sub", [e.op("Sub", [g, average(g, "mean_g")], "g_centered"),
                         e.op("Mul", [x_hat, average(e.op("Mul", [g, x_hat], "g_x_hat"), "mean_g_x_hat")],
                              "projection")], "inner")
    return e.op("Mul", [inner, inv_std], "dX"), x_hat


@_rule("LayerNormalization")
def layer_norm_grad(ctx, dys):
    """Y = scale·X̂ + B over the axes from ``axis`` on: dX by `_normalization_backward`,
    dscale = unbroadcast(dY·X̂), dB = unbroadcast(dY). Reuses the Mean/InvStdDev outputs when present."""
    e, x, dy = ctx.e, ctx.inputs[0], dys[0]
    if dy is None:
        _refuse(ctx, "with a gradient into Mean or InvStdDev only")
    rank = _rank(ctx, x)
    axes = list(range(_norm_axis(ctx.attr("axis", -1), rank), rank))
    scale, bias = ctx.inputs[1], _input(ctx, 2)
    outputs = ctx.outputs
    mean = outputs[1] if len(outputs) > 1 and outputs[1] is not None and outputs[1].name else None
    inv_std = outputs[2] if len(outputs) > 2 and outputs[2] is not None and outputs[2].name else None
    dx, x_hat = _normalization_backward(ctx, dy, axes, scale, float(ctx.attr("epsilon", 1e-5)), mean, inv_std)
    dscale = unbroadcast(ctx, e.op("Mul", [dy, x_hat], "dY_x_hat"), scale, x.shape) if ctx.needs[1] else None
    dbias = unbroadcast(ctx, dy, bias, x.shape) if bias is not None and ctx.needs[2] else None
    return [dx, dscale, dbias]


@_rule("InstanceNormalization")
def instance_norm_grad(ctx, dys):
    """Y = scale_c·X̂ + B_c, X̂ normalized over the spatial axes of each (n, c): dX by
    `_normalization_backward`; dscale = Σ dY·X̂, dB = Σ dY over all but the channel axis."""
    e, x, dy = ctx.e, ctx.inputs[0], dys[0]
    rank = _rank(ctx, x)
    channel = _ints(ctx, "channel", [-1] + [1] * (rank - 2))
    scale = e.op("Reshape", [ctx.inputs[1], channel], "scale_c")
    dx, x_hat = _normalization_backward(ctx, dy, list(range(2, rank)), scale, float(ctx.attr("epsilon", 1e-5)))
    others = _ints(ctx, "others", [a for a in range(rank) if a != 1])
    dscale = e.op("ReduceSum", [e.op("Mul", [dy, x_hat], "dY_x_hat"), others], "dscale", keepdims=0) \
        if ctx.needs[1] else None
    dbias = e.op("ReduceSum", [dy, others], "dbias", keepdims=0) if ctx.needs[2] else None
    return [dx, dscale, dbias]


@_rule("Cast", "CastLike")
def cast_grad(ctx, dys):
    """Y = cast(X) between float types: dX = cast(dY) back to X's type (no gradient into integers)."""
    source = _np_dtype(ctx.inputs[0])
    target = _np_dtype(ctx.outputs[0])
    if source is None or not np.issubdtype(source, np.floating):
        return [None]
    if target is not None and not np.issubdtype(target, np.floating):
        return [None]
    if source == target:
        return [dys[0]]
    return [ctx.e.op("Cast", [dys[0]], "dX", to=ir.DataType.from_numpy(np.dtype(source)).value)]


@_rule("Dropout")
def dropout_grad(ctx, dys):
    """Y = X in inference: dX = dY (training-mode Dropout is refused)."""
    training = _input(ctx, 2)
    if training is not None:
        value = ctx.constant_array(training)
        if value is None or bool(np.asarray(value).reshape(-1)[0]):
            _refuse(ctx, "in training mode")
    return [dys[0]]
