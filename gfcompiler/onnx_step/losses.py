"""The training losses and their gradient with respect to the model output.

Each loss is the mean over the batch (and over elements for the regression losses),
as torch's ``reduction="mean"`` and onnxruntime-training's loss blocks compute it.
`build_loss` returns the loss and ``dL/d(output)`` written directly in closed form, so
the reverse pass starts at the model output rather than differentiating the loss ops:

* ``cross_entropy`` on N×C logits (trailing 1×1 dimensions allowed): ``SoftmaxCrossEntropyLoss``;
  gradient ``(softmax(z) − onehot(y)) / N``;
* ``cross_entropy`` on N×C×H×W logits (H·W > 1, any number of spatial axes): per pixel,
  labels N×H×W, as torch's ``F.cross_entropy(z, y, reduction="mean", ignore_index=i)``:
  the mean over the *labelled* pixels (those not equal to ``ignore_index``, default 255);
  gradient ``(softmax(z) − onehot(y))·mask / count(labelled)``. A batch with no labelled
  pixel has loss 0 and gradient 0 (torch: loss NaN, gradient 0), so one unlabelled batch
  neither stops training nor poisons the parameters;
* ``mse``: ``mean((z − t)²)``; gradient ``2(z − t) / numel``;
* ``l1``: ``mean(|z − t|)``; gradient ``sign(z − t) / numel`` (0 at a tie, as torch);
* ``bce`` (with logits): ``mean(max(z, 0) − z·t + log(1 + e^{−|z|}))``; gradient
  ``(sigmoid(z) − t) / numel``. On an N×1×H×W output this is a binary mask trained per
  pixel (torch's ``BCEWithLogitsLoss`` with a target shaped like the output).

`loss_form` names which of these a compile chose (and the task it implies), and
`build_class_map` gives a segmentation model's per-pixel class map for the export model.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from gfcompiler.emit import Emitter
from gfcompiler.errors import InputError, UnsupportedModelError
from gfcompiler.manifest import LOSSES, TASKS

DEFAULT_IGNORE_INDEX = 255  # the VOC / Cityscapes "void" label
CLASSIFICATION, SEGMENTATION = TASKS  # the manifest's "task"


@dataclasses.dataclass(frozen=True)
class LossForm:
    """Which loss a compile builds for the model output: the task, the label and a description."""

    kind: str  # one of LOSSES
    task: str | None  # CLASSIFICATION | SEGMENTATION | None (regression)
    per_pixel_classes: bool  # cross_entropy over the channels of every pixel
    ignore_index: int | None  # per-pixel cross_entropy only
    description: str  # e.g. "per-pixel cross-entropy over 5 classes, mean over labelled pixels, ignore_index 255"

    @property
    def segmentation(self) -> bool:
        return self.task == SEGMENTATION


@dataclasses.dataclass(frozen=True)
class LossGraph:
    label: ir.Value  # the new graph input
    loss: ir.Value  # float32 scalar
    output_grad: ir.Value | None  # dL/d(output); None when only the loss was built


def _dims_text(dims) -> str:
    return "×".join(str(d) for d in dims)


def _spatial_is_one(dims) -> bool:
    """Whether every axis after the channels is 1 (N×C or N×C×1×1: one prediction per sample)."""
    return all(d == 1 for d in dims[2:])


def loss_form(kind: str, output: ir.Value, ignore_index: int | None = None) -> LossForm:
    """The loss form ``kind`` takes on ``output``; ``ignore_index`` (None: 255) for per-pixel cross_entropy only."""
    if kind not in LOSSES:
        raise UnsupportedModelError(f"unknown loss {kind!r} (choose from {', '.join(LOSSES)})")
    if output.shape is None:
        raise UnsupportedModelError(f"the model output {output.name!r} has no inferred shape")
    dims = list(output.shape)
    per_pixel = len(dims) >= 3 and not _spatial_is_one(dims)
    channels = dims[1] if len(dims) >= 2 else None
    if kind == "cross_entropy" and len(dims) < 2:
        raise UnsupportedModelError(
            f"cross_entropy needs N×classes logits (or N×classes×H×W for per-pixel labels), the model output "
            f"{output.name!r} has shape {_dims_text(dims)}")
    if kind == "cross_entropy" and channels == 1:
        raise UnsupportedModelError(
            f"cross_entropy over one class is always 0: the model output {output.name!r} is {_dims_text(dims)}; "
            "train a one-channel output (a binary mask or score) with --loss bce")
    if ignore_index is not None and not (kind == "cross_entropy" and per_pixel):
        raise InputError(f"--ignore-index applies to per-pixel cross_entropy (an N×C×H×W output) only; "
                         f"the model output {output.name!r} is {_dims_text(dims)} with --loss {kind}")
    if kind == "cross_entropy" and per_pixel:
        ignore = DEFAULT_IGNORE_INDEX if ignore_index is None else int(ignore_index)
        return LossForm(kind, SEGMENTATION, True, ignore,
                        f"per-pixel cross-entropy over {channels} classes, mean over labelled pixels, "
                        f"ignore_index {ignore}")
    if kind == "cross_entropy":
        return LossForm(kind, CLASSIFICATION, False, None,
                        f"cross-entropy over {channels} classes, mean over the batch")
    if kind == "bce" and per_pixel and channels == 1:
        return LossForm(kind, SEGMENTATION, False, None,
                        "per-pixel BCE-with-logits (binary mask: target shaped like the output, 0/1), "
                        "mean over all pixels")
    if kind == "bce" and len(dims) >= 2 and _spatial_is_one(dims):
        return LossForm(kind, CLASSIFICATION, False, None,
                        f"BCE-with-logits over {channels} independent labels, mean over all elements")
    names = {"bce": "BCE-with-logits", "mse": "mean squared error", "l1": "mean absolute error"}
    return LossForm(kind, None, False, None, f"{names[kind]}, mean over all elements of the {_dims_text(dims)} output")


def label_input(kind: str, output: ir.Value) -> ir.Value:
    """The label graph input for ``output``: class indices (N, or N×H×W per pixel) or targets shaped like the output."""
    form = loss_form(kind, output)
    dims = list(output.shape)
    if kind == "cross_entropy":
        label_dims = dims[:1] + dims[2:] if form.per_pixel_classes else dims[:1]
        return ir.Value(name="labels", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(label_dims))
    return ir.Value(name="target", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(dims))


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


def _class_depth(e: Emitter, logits: ir.Value) -> ir.Value:
    """The number of classes (axis 1 of ``logits``) as a 1-element int64 tensor, for OneHot."""
    classes = logits.shape[1]
    if isinstance(classes, int):
        return e.ints("classes", [classes])
    return e.op("Gather", [e.op("Shape", [logits], "logits_shape"), e.ints("class_axis", [1])], "classes")


def _onehot(e: Emitter, labels: ir.Value, logits: ir.Value) -> ir.Value:
    """onehot(labels) along axis 1, shaped like ``logits`` (labels outside [0, C) give all zeros)."""
    values = e.const("onehot_values", np.array([0, 1], np.float32))
    return e.op("OneHot", [labels, _class_depth(e, logits), values], "onehot", axis=1)


def _classification_cross_entropy(e: Emitter, output: ir.Value, label: ir.Value, with_gradient: bool) -> LossGraph:
    """Cross-entropy of N×C (or N×C×1×1) logits against N class indices, mean over the batch."""
    logits = output
    if len(output.shape) > 2:  # N×C×1×1 (a conv head): the classes are the channels
        logits = e.op("Flatten", [output], "logits_2d", axis=1)
        logits.dtype, logits.shape = ir.DataType.FLOAT, ir.Shape(list(output.shape)[:2])
    loss, log_prob = e.ops("SoftmaxCrossEntropyLoss", [logits, label], "cross_entropy", 2, reduction="mean")
    log_prob.dtype, log_prob.shape = ir.DataType.FLOAT, logits.shape
    loss = e.op("Identity", [loss], "loss")
    grad = None
    if with_gradient:
        residual = e.op("Sub", [e.op("Exp", [log_prob], "softmax"), _onehot(e, label, logits)], "residual")
        grad = e.op("Div", [residual, _element_count(e, output, [0])], "dlogits")
        if logits is not output:
            grad = e.op("Reshape", [grad, e.op("Shape", [output], "output_shape")], "doutput")
    return LossGraph(label, loss, grad)


def _per_pixel_cross_entropy(e: Emitter, output: ir.Value, label: ir.Value, ignore_index: int,
                             with_gradient: bool) -> LossGraph:
    """Cross-entropy of N×C×H×W logits against N×H×W labels, mean over the labelled pixels.

    The sum over pixels comes from ``SoftmaxCrossEntropyLoss`` (ignored pixels add 0) and is
    divided by ``max(count, 1)``: onnxruntime's own mean of an all-ignored batch differs
    between versions (1.19: 0, 1.32: NaN), this is 0 everywhere.
    """
    total, log_prob = e.ops("SoftmaxCrossEntropyLoss", [output, label], "cross_entropy", 2, reduction="sum",
                            ignore_index=ignore_index)
    log_prob.dtype, log_prob.shape = ir.DataType.FLOAT, output.shape
    labelled = e.op("Not", [e.op("Equal", [label, e.const("ignore_index", np.array(ignore_index, np.int64))],
                                 "ignored")], "labelled")
    mask = e.op("Cast", [labelled], "labelled_mask", to=ir.DataType.FLOAT)
    count = e.op("ReduceSum", [mask], "labelled_count", keepdims=0)
    denominator = e.op("Max", [count, e.scalar("one", 1.0)], "labelled_count_at_least_one")
    loss = e.op("Div", [total, denominator], "loss")
    grad = None
    if with_gradient:
        # Ignored pixels get class 0 for OneHot (a negative ignore_index would otherwise index from the end);
        # the mask zeroes their row anyway.
        safe_label = e.op("Where", [labelled, label, e.const("class_zero", np.array(0, np.int64))], "labels_or_zero")
        residual = e.op("Sub", [e.op("Exp", [log_prob], "softmax"), _onehot(e, safe_label, output)], "residual")
        weight = e.op("Div", [e.op("Unsqueeze", [mask, e.ints("class_axis", [1])], "pixel_mask"), denominator],
                      "pixel_weight")
        grad = e.op("Mul", [residual, weight], "doutput")
    return LossGraph(label, loss, grad)


def _bce_with_logits(e: Emitter, output: ir.Value, target: ir.Value, with_gradient: bool):
    """Per element ``max(z, 0) − z·t + log(1 + e^{−|z|})`` (the numerically stable form) and ``sigmoid(z) − t``."""
    exp_neg_abs = e.op("Exp", [e.op("Neg", [e.op("Abs", [output], "abs_logits")], "neg_abs")], "exp_neg_abs")
    log1p_exp = e.op("Log", [e.op("Add", [e.scalar("one", 1.0), exp_neg_abs], "one_plus_exp")], "log1p_exp")
    linear = e.op("Sub", [e.op("Max", [output, e.scalar("zero", 0.0)], "relu_logits"),
                          e.op("Mul", [output, target], "logits_x_target")], "linear_part")
    per_element = e.op("Add", [linear, log1p_exp], "bce")
    grad = e.op("Sub", [e.op("Sigmoid", [output], "probability"), target], "residual") if with_gradient else None
    return per_element, grad


def build_loss(e: Emitter, kind: str, output: ir.Value, *, with_gradient: bool,
               ignore_index: int | None = None) -> LossGraph:
    """The loss of ``output`` against a new label input, and (``with_gradient``) dL/d(output).

    ``ignore_index`` (None: 255) applies to per-pixel cross_entropy (see `loss_form`).
    """
    form = loss_form(kind, output, ignore_index)
    label = label_input(kind, output)
    if kind == "cross_entropy":
        if form.per_pixel_classes:
            return _per_pixel_cross_entropy(e, output, label, form.ignore_index, with_gradient)
        return _classification_cross_entropy(e, output, label, with_gradient)
    difference = e.op("Sub", [output, label], "difference")
    if kind == "mse":
        per_element = e.op("Mul", [difference, difference], "squared")
        local_grad = e.op("Mul", [difference, e.scalar("two", 2.0)], "twice_difference") if with_gradient else None
    elif kind == "l1":
        per_element = e.op("Abs", [difference], "absolute")
        local_grad = e.op("Sign", [difference], "sign") if with_gradient else None
    else:
        per_element, local_grad = _bce_with_logits(e, output, label, with_gradient)
    loss = e.op("ReduceMean", [per_element], "loss", keepdims=0)
    grad = e.op("Div", [local_grad, _element_count(e, output, None)], "doutput") if with_gradient else None
    return LossGraph(label, loss, grad)


def build_class_map(e: Emitter, form: LossForm, output: ir.Value) -> ir.Value:
    """A segmentation model's per-pixel class map, N×H×W int64: argmax over the channels, or logit > 0 for C = 1."""
    if not form.segmentation:
        raise ValueError(f"no class map for a {form.task} model")
    if form.per_pixel_classes:
        classes = e.op("ArgMax", [output], "argmax", axis=1, keepdims=0)
    else:
        positive = e.op("Greater", [output, e.scalar("zero", 0.0)], "positive")
        classes = e.op("Squeeze", [e.op("Cast", [positive], "positive_int", to=ir.DataType.INT64),
                                   e.ints("channel_axis", [1])], "mask")
    dims = list(output.shape)
    classes.dtype, classes.shape = ir.DataType.INT64, ir.Shape(dims[:1] + dims[2:])
    return classes
