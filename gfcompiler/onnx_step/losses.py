"""The training losses and their gradient with respect to the model output.

Each loss is the mean over the batch (and over elements for the regression losses),
as torch's ``reduction="mean"`` and onnxruntime-training's loss blocks compute it.
`build_loss` returns the loss and ``dL/d(output)`` written directly in closed form, so
the reverse pass starts at the model output rather than differentiating the loss ops:

* ``cross_entropy``: ``SoftmaxCrossEntropyLoss``; gradient ``(softmax(z) − onehot(y)) / N``;
* ``mse``: ``mean((z − t)²)``; gradient ``2(z − t) / numel``;
* ``l1``: ``mean(|z − t|)``; gradient ``sign(z − t) / numel`` (0 at a tie, as torch);
* ``bce`` (with logits): ``mean(max(z, 0) − z·t + log(1 + e^{−|z|}))``; gradient
  ``(sigmoid(z) − t) / numel``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from gfcompiler.errors import UnsupportedModelError
from gfcompiler.emit import Emitter

LOSSES = ("cross_entropy", "mse", "bce", "l1")


@dataclasses.dataclass(frozen=True)
class LossGraph:
    label: ir.Value  # the new graph input
    loss: ir.Value  # float32 scalar
    output_grad: ir.Value | None  # dL/d(output); None when only the loss was built


def label_input(kind: str, output: ir.Value) -> ir.Value:
    """The label graph input for ``output``: class indices (N) or targets shaped like the output."""
    if output.shape is None:
        raise UnsupportedModelError(f"the model output {output.name!r} has no inferred shape")
    if kind == "cross_entropy":
        dims = list(output.shape)
        if len(dims) < 2 or any(d != 1 for d in dims[2:]):
            raise UnsupportedModelError(
                f"cross_entropy needs N×classes logits (trailing 1×1 dimensions allowed), the model output "
                f"{output.name!r} has shape {'×'.join(str(d) for d in dims)}"
            )
        return ir.Value(name="labels", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(dims[:1]))
    return ir.Value(name="target", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(list(output.shape)))


def _element_count(e: Emitter, output: ir.Value, axes: list[int] | None) -> ir.Value:
    """The number of elements over ``axes`` (all when None) as a float32 scalar, a constant when static."""
    dims = list(output.shape)
    chosen = dims if axes is None else [dims[a] for a in axes]
    if all(isinstance(d, int) for d in chosen):
        return e.scalar("count", float(np.prod(chosen)))
    shape = e.op("Shape", [output], "output_shape")
    if axes is not None:
        shape = e.op("Gather", [shape, e.ints("count_axes", axes)], "counted_dims", axis=0)
    count = e.op("ReduceProd", [shape], "count_int", keepdims=0)
    return e.op("Cast", [count], "count", to=ir.DataType.FLOAT)


def build_loss(e: Emitter, kind: str, output: ir.Value, *, with_gradient: bool) -> LossGraph:
    """The loss of ``output`` against a new label input, and (``with_gradient``) dL/d(output)."""
    if kind not in LOSSES:
        raise UnsupportedModelError(f"unknown loss {kind!r} (choose from {', '.join(LOSSES)})")
    label = label_input(kind, output)
    if kind == "cross_entropy":
        logits = output
        if len(output.shape) > 2:  # N×C×1×1 (a conv head): the classes are the channels
            logits = e.op("Flatten", [output], "logits_2d", axis=1)
            logits.dtype, logits.shape = ir.DataType.FLOAT, ir.Shape(list(output.shape)[:2])
        loss, log_prob = e.ops("SoftmaxCrossEntropyLoss", [logits, label], "cross_entropy", 2, reduction="mean")
        log_prob.dtype, log_prob.shape = ir.DataType.FLOAT, logits.shape
        loss = e.op("Identity", [loss], "loss")
        grad = None
        if with_gradient:
            classes = output.shape[1]
            depth = e.ints("classes", [classes]) if isinstance(classes, int) else e.op(
                "Gather", [e.op("Shape", [logits], "logits_shape"), e.ints("class_axis", [1])], "classes")
            onehot = e.op("OneHot", [label, depth, e.const("onehot_values", np.array([0, 1], np.float32))],
                          "onehot", axis=-1)
            residual = e.op("Sub", [e.op("Exp", [log_prob], "softmax"), onehot], "residual")
            grad = e.op("Div", [residual, _element_count(e, output, [0])], "dlogits")
            if logits is not output:
                grad = e.op("Reshape", [grad, e.op("Shape", [output], "output_shape")], "doutput")
        return LossGraph(label, loss, grad)
    difference = e.op("Sub", [output, label], "difference")
    if kind == "mse":
        per_element = e.op("Mul", [difference, difference], "squared")
        local_grad = e.op("Mul", [difference, e.scalar("two", 2.0)], "twice_difference") if with_gradient else None
    elif kind == "l1":
        per_element = e.op("Abs", [difference], "absolute")
        local_grad = e.op("Sign", [difference], "sign") if with_gradient else None
    else:  # bce with logits, the numerically stable form
        zero = e.scalar("zero", 0.0)
        softplus_neg_abs = e.op("Log", [e.op("Add", [e.scalar("one", 1.0), e.op("Exp", [e.op("Neg", [e.op("Abs", [output], "abs_logits")], "neg_abs")], "exp_neg_abs")], "one_plus_exp")], "log1p_exp")
        per_element = e.op("Add", [e.op("Sub", [e.op("Max", [output, zero], "relu_logits"), e.op("Mul", [output, label], "logits_x_target")], "linear_part"), softplus_neg_abs], "bce")
        local_grad = e.op("Sub", [e.op("Sigmoid", [output], "probability"), label], "residual") if with_gradient else None
    loss = e.op("ReduceMean", [per_element], "loss", keepdims=0)
    grad = e.op("Div", [local_grad, _element_count(e, output, None)], "doutput") if with_gradient else None
    return LossGraph(label, loss, grad)
