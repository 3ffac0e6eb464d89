"""Train one output: keep the graph output the loss trains, drop the others and what only they need.

Detectors, OCR pipelines and face models often have several outputs (boxes and scores
per stride, landmarks next to a face score...). A loss trains one tensor, so the
compiler must know which: ``--train-output NAME`` names it. `SelectOutputPass` makes
that value the graph's only output and removes the nodes, initializers and graph
inputs that no longer feed it, so the training graph, the eval model and the exported
model all compute the chosen output alone (and only it is exported).

`select_trained_output` is the compile step: a model with one output needs no choice;
a model with several and no choice is refused with the list of outputs and their
shapes; an unknown name is refused with the same list.

Dropping outputs often leaves a ``Split`` with an unused part (a detector head split
into scores and boxes, boxes dropped). onnxruntime-training's Split gradient
concatenates the gradients of the used outputs only, so the input's gradient has the
wrong size and the weights before it get garbage updates.
`SliceSplitsWithUnusedOutputsPass` replaces such a Split by one ``Slice`` per used
part (the same values; both backends differentiate Slice exactly).

Invariants kept: topological order (nodes are only removed), unique names (nothing is
renamed), the chosen output keeps its name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from gfcompiler.emit import Emitter, graph_names, insert_before
from gfcompiler.errors import InputError, UnsupportedModelError
from gfcompiler.loading import data_inputs

META_KEY = "gfcompiler.selected_output"  # ir.Model.meta key: `select_trained_output` leaves its `SelectedOutput`
FLAG = "--train-output"


@dataclasses.dataclass(frozen=True)
class SelectedOutput:
    """The output kept for the loss, and what was dropped from the graph with the others."""

    output: str
    dropped_outputs: tuple[str, ...]
    dropped_inputs: tuple[str, ...]
    removed_nodes: int


@dataclasses.dataclass
class OutputSelectionResult(ir.passes.PassResult):
    selected: SelectedOutput | None = None


class SelectOutputPass(ir.passes.InPlacePass):
    """Make the graph output named ``name`` the only one; remove what no longer feeds it."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def call(self, model: ir.Model) -> OutputSelectionResult:
        graph = model.graph
        chosen = next(value for value in graph.outputs if value.name == self.name)
        dropped = tuple(value.name for value in graph.outputs if value is not chosen)
        nodes_before = len(graph)
        graph.outputs.clear()
        graph.outputs.append(chosen)
        RemoveUnusedNodesPass()(model)
        unused_inputs = [value for value in graph.inputs if not value.uses() and value is not chosen]
        for value in unused_inputs:
            graph.inputs.remove(value)
        RemoveUnusedNodesPass()(model)  # initializers that were also (now removed) graph inputs
        selected = SelectedOutput(chosen.name, dropped, tuple(value.name for value in unused_inputs),
                                  nodes_before - len(graph))
        return OutputSelectionResult(model, bool(dropped), selected)


class SliceSplitsWithUnusedOutputsPass(ir.passes.InPlacePass):
    """Replace each ``Split`` that has used and unused outputs by Slices of its used parts.

    A Split whose part sizes cannot be known (no ``split`` sizes and an unknown axis
    length) is left as it is.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        names = graph_names(model.graph)
        for node in list(model.graph):
            used = [bool(value.uses()) or value.is_graph_output() for value in node.outputs]
            if node.op_type != "Split" or node.domain not in ("", "ai.onnx") or all(used) or not any(used):
                continue
            sizes = _split_sizes(model, node)
            if sizes is None:
                continue
            _slice_used_parts(model.graph, node, sizes, used, Emitter(ir.tape.Tape(), node.name or "Split", names))
            modified = True
        return ir.passes.PassResult(model, modified)


def _split_sizes(model: ir.Model, node: ir.Node) -> list[int] | None:
    """The length of each part along the split axis, or None when it cannot be known."""
    opset = node.version if node.version is not None else model.opset_imports.get("", 13)
    given = node.inputs[1] if len(node.inputs) > 1 else None
    if given is not None:
        return [int(size) for size in given.const_value.numpy()] if given.const_value is not None else None
    if opset < 13 and "split" in node.attributes:
        return list(node.attributes.get_ints("split"))
    shape = node.inputs[0].shape
    axis = node.attributes.get_int("axis", 0)
    if shape is None or not -len(shape) <= axis < len(shape) or not isinstance(shape[axis], int):
        return None
    parts = len(node.outputs)
    chunk = math.ceil(shape[axis] / parts)  # opset 18's uneven num_outputs: the last part is smaller
    return [chunk] * (parts - 1) + [shape[axis] - chunk * (parts - 1)]


def _slice_used_parts(graph: ir.Graph, split: ir.Node, sizes: list[int], used: list[bool], e: Emitter) -> None:
    """Put a Slice for each used output of ``split`` before it, then remove it (its unused outputs have no users)."""
    axis = split.attributes.get_int("axis", 0)
    ends = [sum(sizes[:index + 1]) for index in range(len(sizes))]
    parts = {
        index: e.op("Slice", [split.inputs[0], e.ints(f"start{index}", [ends[index] - sizes[index]]),
                              e.ints(f"end{index}", [ends[index]]), e.ints(f"axis{index}", [axis])], f"part{index}")
        for index in range(len(sizes)) if used[index]
    }
    insert_before(graph, e.tape, split)
    for index, part in parts.items():
        output = split.outputs[index]
        name, part.shape, part.type = output.name, output.shape, output.type
        output.replace_all_uses_with(part, replace_graph_outputs=True)
        output.name, part.name = None, name
    graph.remove(split, safe=True)


def describe_value(value: ir.Value) -> str:
    """``'name' (1×3×?×?)``: a graph input or output with its shape, ``?`` for a dynamic dim."""
    if value.shape is None:
        return f"{value.name!r} (shape unknown)"
    dims = "×".join(str(dim) if isinstance(dim, int) else "?" for dim in value.shape)
    return f"{value.name!r} ({dims or 'scalar'})"


def _listing(graph: ir.Graph) -> str:
    return ", ".join(describe_value(value) for value in graph.outputs)


def _check_choice(graph: ir.Graph, name: str | None) -> str:
    """The name of the output to train: ``name``, or the only output; refuses what cannot be chosen."""
    names = [value.name for value in graph.outputs]
    if name is None:
        if len(names) == 1:
            return names[0]
        raise UnsupportedModelError(
            f"the model has {len(names)} outputs: {_listing(graph)}; the loss trains one: choose it with "
            f"{FLAG} NAME (the others are dropped from the training graph and the export)")
    if name not in names:
        raise InputError(f"{FLAG} {name!r} is not an output of the model; its outputs: {_listing(graph)}")
    chosen = graph.outputs[names.index(name)]
    if chosen.producer() is None:
        raise UnsupportedModelError(f"output {name!r} is a graph input or an initializer, not computed by the model: "
                                    "there is nothing to train")
    return name


def _batch_axis_reason(model: ir.Model, output: ir.Value) -> str | None:
    """Why ``output`` does not hold the samples along axis 0 (None when it does, or when that cannot be told).

    Told only from a named dynamic batch: the data input's first dim is a symbol that
    appears in the output on another axis (a time-major T×N×C sequence output).
    """
    inputs = data_inputs(model)
    if len(inputs) != 1 or not inputs[0].shape or not output.shape:
        return None
    batch = inputs[0].shape[0]
    if isinstance(batch, int) or batch.value is None:
        return None
    axes = [axis for axis, dim in enumerate(output.shape) if not isinstance(dim, int) and dim.value == batch.value]
    if not axes or 0 in axes:
        return None
    return (f"output {describe_value(output)} has the batch {batch.value!r} of input {inputs[0].name!r} on axis "
            f"{axes[0]}, not axis 0, where the loss and the runtime take the samples (a time-major sequence "
            "output needs a Transpose at the end of the model)")


def _require_batch_first(model: ir.Model) -> None:
    reason = _batch_axis_reason(model, model.graph.outputs[0])
    if reason is not None:
        raise UnsupportedModelError(reason)


def select_trained_output(model: ir.Model, name: str | None, progress: Callable[[str], None]) -> SelectedOutput | None:
    """The compile step: keep the output the loss trains (``name``, or the only one).

    Refuses a model with several outputs when ``name`` is None (`UnsupportedModelError`)
    and a ``name`` that is not an output (`InputError`), both listing the outputs and
    their shapes; refuses an output whose samples are not along axis 0. Leaves the
    `SelectedOutput` in ``model.meta[META_KEY]`` (for the manifest notes) and returns
    it; None when the model had one output.
    """
    chosen = _check_choice(model.graph, name)
    selected = None
    if len(model.graph.outputs) > 1:
        result = SelectOutputPass(chosen)(model)
        assert isinstance(result, OutputSelectionResult) and result.selected is not None
        selected = result.selected
        if not data_inputs(model):
            raise UnsupportedModelError(f"output {chosen!r} does not depend on any data input: there is nothing to train")
    SliceSplitsWithUnusedOutputsPass()(model)
    _require_batch_first(model)
    if selected is None:
        return None
    inputs = f" and input(s) {', '.join(map(repr, selected.dropped_inputs))}" if selected.dropped_inputs else ""
    progress(f"training output {selected.output!r}; dropped output(s) {', '.join(map(repr, selected.dropped_outputs))}"
             f"{inputs} ({selected.removed_nodes} nodes fed only those)")
    model.meta[META_KEY] = selected
    return selected
