"""Assemble the standard-ONNX training artifacts: step, eval and export models.

From the canonical forward model and its layer selection (`gfcompiler.selection`):

* **step model** — one training step as a plain ONNX model. The trainable parameters
  and the optimizer state become graph inputs; ``learning_rate`` and ``step`` (the
  1-based step index) are scalar inputs. Frozen layers stay initializers, so
  onnxruntime optimizes them as in inference. The forward is followed by the loss
  (`losses`), the reverse pass (`autodiff` with `grad_rules`; trained convs get the
  gradient filter of `gfcompiler.passes.filter_ops` or the exact `conv_backward`),
  and the optimizer update (`optimizers`). Outputs: ``loss``, the model output, and
  the updated value of every state tensor (``<name>.updated``). The update is guarded
  for in-place execution (`optimizers.build_guard`): no state tensor is written before
  its last read, and a NaN or infinite loss leaves every state tensor unchanged, so
  the runtime may bind each ``<name>.updated`` output to the buffer of input
  ``<name>``. The model says so in its metadata (`IN_PLACE_KEY`) once
  `in_place_hazards` has checked the built graph (a graph that failed the check
  would run functionally, with fresh output buffers).
* **eval model** — forward and loss, the trainable parameters as inputs.
* **export model** — the forward with the trainable parameters removed; the runtime
  appends the trained values as initializers (`gfcompiler.runtime`). A segmentation
  model's export model also outputs ``classes``, the per-pixel class map.

Filtered convs compute their forward summaries (``X_sum``, ``W_sum``) next to the
conv, and the conv's bias gains a zero-valued data dependency on ``X_sum`` (as in
`gfcompiler.passes.gradient_filter`): onnxruntime then pools in the forward pass and
frees the full-resolution input right after the conv instead of keeping it for the
backward. The dependency is added after differentiation, so no gradient flows
through it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from gfcompiler.artifacts import OptimizerSpec
from gfcompiler.emit import Emitter, append, graph_names, insert_before
from gfcompiler.geometry import FilterGeometry
from gfcompiler.manifest import CLASS_MAP_OUTPUT, IN_PLACE_KEY, IN_PLACE_VALUE, StateRecord
from gfcompiler.onnx_step import autodiff, conv_rules, optimizers
from gfcompiler.onnx_step.grad_rules import RULES
from gfcompiler.onnx_step.losses import build_class_map, build_loss, loss_form
from gfcompiler.passes import filter_ops
from gfcompiler.passes.gradient_filter import add_forward_dependency
from gfcompiler.selection import Selection
from gfcompiler.split import parameters_to_inputs

LEARNING_RATE = "learning_rate"
STEP = "step"
UPDATED_SUFFIX = ".updated"
GRAD_SUFFIX = ".grad"
# Model metadata: the step model may run with each state output bound to its input's
# buffer (gfcompiler.runtime.onnx_engine reads the same key).
# Ops whose output onnxruntime may place in its input's buffer (a view), and the
# elementwise ops that may write a state tensor over the one they read.
_VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
_IN_PLACE_WRITERS = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Identity"})


@dataclasses.dataclass(frozen=True)
class StateEntry:
    """One tensor carried from step to step: a trainable parameter or an optimizer slot."""

    name: str
    kind: str  # "parameter" | "optimizer"
    param: str

    @property
    def updated(self) -> str:
        return f"{self.name}{UPDATED_SUFFIX}"

    def to_manifest(self) -> StateRecord:
        return StateRecord(self.name, self.updated, self.kind, self.param)


@dataclasses.dataclass
class StepModel:
    """A built step model and what the compiler reports about it."""

    model: ir.Model
    state: list[StateEntry]  # in graph input order
    initial_state: dict[str, np.ndarray]
    layer_nodes: dict[str, set[ir.Node]]  # per trained conv: its backward (and forward summary) nodes
    needs_input_grad: dict[str, bool]  # per trained conv: whether its backward computes dX
    # Why the state may not be updated in place (`in_place_hazards`); empty (the rule) when it may.
    in_place_hazards: list[str] = dataclasses.field(default_factory=list)


def _copy(model: ir.Model) -> ir.Model:
    return model.clone()  # new nodes and values; the (read-only) tensors are shared


def _keep_outputs(model: ir.Model, outputs: list[ir.Value]) -> None:
    model.graph.outputs.clear()
    model.graph.outputs.extend(outputs)
    common_passes.RemoveUnusedNodesPass()(model)


def _scalar_input(name: str) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]))


def _model_output(model: ir.Model) -> ir.Value:
    return model.graph.outputs[0]


def build_export_model(model: ir.Model, trainable: list[str], loss: str | None = None) -> ir.Model:
    """The forward with ``trainable`` initializers removed (the runtime appends trained values).

    When ``loss`` trains a segmentation model (`losses.loss_form`), a second output
    ``classes`` (`manifest.CLASS_MAP_OUTPUT`) follows the logits: the per-pixel class map,
    N×H×W int64.
    """
    export = _copy(model)
    outputs = [_model_output(export)]
    form = loss_form(loss, outputs[0]) if loss is not None else None
    if form is not None and form.segmentation:
        tape = ir.tape.Tape()
        classes = build_class_map(Emitter(tape, "class_map", graph_names(export.graph)), form, outputs[0])
        append(export.graph, tape)
        classes.name = CLASS_MAP_OUTPUT
        outputs.append(classes)
    _keep_outputs(export, outputs)
    for name in trainable:
        export.graph.initializers.pop(name)
    return export


def build_eval_model(model: ir.Model, trainable: list[str], loss: str, ignore_index: int | None = None) -> ir.Model:
    """Forward and loss; inputs: data, the trainable parameters, the labels (``ignore_index``: `losses.build_loss`)."""
    evaluation = _copy(model)
    graph = evaluation.graph
    output = _model_output(evaluation)
    parameters_to_inputs(graph, trainable)
    tape = ir.tape.Tape()
    built = build_loss(Emitter(tape, "loss", graph_names(graph), phase="forward"), loss, output, with_gradient=False,
                       ignore_index=ignore_index)
    append(graph, tape)
    graph.inputs.append(built.label)
    built.loss.name = "loss"
    _keep_outputs(evaluation, [built.loss, output])
    return evaluation


def build_step_model(model: ir.Model, selection: Selection, geometries: dict[str, FilterGeometry], loss: str,
                     optimizer: OptimizerSpec, *, force_forward_pooling: bool = True,
                     gradient_outputs: bool = False, ignore_index: int | None = None) -> StepModel:
    """The step model of the module docstring for ``selection``; ``geometries``: the filtered convs.

    ``gradient_outputs`` adds each parameter's gradient as an output ``<param>.grad``
    (for verification; the runtime does not read them). ``ignore_index``: per-pixel
    cross_entropy's unlabelled class (`losses.build_loss`; None: 255).
    """
    step = _copy(model)
    graph = step.graph
    trainable = list(selection.trainable_params)
    output = _model_output(step)
    trained_names = {conv.name for conv in selection.trained_convs}
    convs = {node.name: node for node in graph if node.name in trained_names}
    names = graph_names(graph)

    initial = {name: graph.initializers[name].const_value.numpy().copy() for name in trainable}
    params = parameters_to_inputs(graph, trainable)

    # Forward summaries of filtered convs, inserted right before each conv.
    summaries: dict[str, tuple[ir.Value, ir.Value, list[ir.Node]]] = {}
    for name, geometry in geometries.items():
        conv = convs[name]
        summary = Emitter(ir.tape.Tape(), f"{name}/gf", names, layer=name, phase="forward")
        x_sum, w_sum = filter_ops.build_forward_summaries(summary, conv.inputs[0], conv.inputs[1], geometry)
        batch = conv.inputs[0].shape[0] if conv.inputs[0].shape is not None else "N"
        x_sum.dtype, x_sum.shape = ir.DataType.FLOAT, ir.Shape([batch, geometry.conv.in_channels, *geometry.patches])
        summaries[name] = (x_sum, w_sum, insert_before(graph, summary.tape, conv))

    tape = ir.tape.Tape()
    loss_graph = build_loss(Emitter(tape, "loss", names, phase="forward"), loss, output, with_gradient=True,
                           ignore_index=ignore_index)
    backward = Emitter(tape, "", names, phase="backward")
    overrides = {convs[name]: conv_rules.filtered_conv_rule(x_sum, w_sum, geometries[name])
                 for name, (x_sum, w_sum, _) in summaries.items()}
    gradients = autodiff.differentiate(graph, {output: loss_graph.output_grad}, list(params.values()), backward,
                                       {**RULES, **conv_rules.RULES}, overrides)

    slots = optimizers.state_slots(optimizer, trainable)
    state_inputs = {slot.name: ir.Value(name=slot.name, type=ir.TensorType(ir.DataType.FLOAT),
                                        shape=ir.Shape(list(initial[slot.param].shape))) for slot in slots}
    lr, step_index = _scalar_input(LEARNING_RATE), _scalar_input(STEP)
    grads = {name: gradients.of[value] for name, value in params.items()}
    update = Emitter(tape, "", names, phase="optimizer")
    # The guard reads the loss after the backward: typed, it counts (4 bytes) in the held-bytes accounting.
    loss_graph.loss.dtype, loss_graph.loss.shape = ir.DataType.FLOAT, ir.Shape([])
    ok = optimizers.build_guard(update, loss_graph.loss, grads)
    updated_params, updated_state = optimizers.build_update(update, optimizer, params, grads, state_inputs, lr,
                                                            step_index, ok=ok)
    append(graph, tape)

    if force_forward_pooling:
        for name, (x_sum, _, _) in summaries.items():
            anchor = Emitter(ir.tape.Tape(), f"{name}/gf", names, layer=name, phase="forward")
            add_forward_dependency(anchor, convs[name], x_sum, geometries[name])
            insert_before(graph, anchor.tape, convs[name])

    state = [StateEntry(name, "parameter", name) for name in trainable]
    state += [StateEntry(slot.name, "optimizer", slot.param) for slot in slots]
    initial.update({slot.name: np.zeros_like(initial[slot.param]) for slot in slots})
    graph.inputs.extend([loss_graph.label, lr, step_index, *state_inputs.values()])
    updates = []
    for entry in state:
        value = updated_params[entry.name] if entry.kind == "parameter" else updated_state[entry.name]
        if value.is_graph_input() or value.is_graph_output() or value.is_initializer():
            identity = ir.node("Identity", [value], name=f"{entry.updated}/identity")
            graph.append(identity)
            value = identity.outputs[0]
        value.name = entry.updated
        updates.append(value)
    loss_graph.loss.name = "loss"
    extra = []
    if gradient_outputs:
        for name, value in params.items():
            identity = ir.node("Identity", [gradients.of[value]], name=f"{name}.grad/identity")
            graph.append(identity)
            identity.outputs[0].name = f"{name}{GRAD_SUFFIX}"
            extra.append(identity.outputs[0])
    _keep_outputs(step, [loss_graph.loss, output, *updates, *extra])
    # The guard makes this hold by construction; should a graph escape it, the model runs functionally.
    hazards = in_place_hazards(graph, [entry.name for entry in state])
    if not hazards:
        step.metadata_props[IN_PLACE_KEY] = IN_PLACE_VALUE

    layer_nodes = {}
    by_forward = gradients.backward_nodes
    for name, conv in convs.items():
        nodes = set(by_forward.get(conv, []))
        if name in summaries:
            nodes |= set(summaries[name][2])
        layer_nodes[name] = nodes
    needs_input_grad = {name: gradients.needs.get(conv, [False])[0] for name, conv in convs.items()}
    return StepModel(step, state, initial, layer_nodes, needs_input_grad, hazards)


def in_place_hazards(graph: ir.Graph, state: list[str]) -> list[str]:
    """Why ``graph`` may not run with output ``<name>.updated`` in the buffer of input ``<name>``.

    For each ``name`` in ``state``: the node writing ``<name>.updated`` (the writer)
    overwrites the input while it runs, so every other node reading the input, or a
    view of it (`_VIEW_OPS`, which onnxruntime may place in the input's buffer), must
    be an ancestor of the writer: whatever order onnxruntime picks, it then reads the
    old values. The writer itself may read the input only elementwise (`_IN_PLACE_WRITERS`,
    output shaped as the input). Returns one line per violation (none: safe).
    """
    inputs = {value.name: value for value in graph.inputs}
    producers = {value.name: node for node in graph for value in node.outputs if value.name}
    order = {node: index for index, node in enumerate(graph)}
    ancestors: dict[ir.Node, int] = {}  # node -> its ancestors, a bit set over `order` (memoized)

    def ancestors_of(node: ir.Node) -> int:
        if node not in ancestors:
            pending = [node]
            while pending:  # iterative: deep graphs would exhaust the recursion limit
                current = pending[-1]
                if current in ancestors:
                    pending.pop()
                    continue
                parents = [v.producer() for v in current.inputs if v is not None and v.producer() is not None]
                missing = [p for p in parents if p not in ancestors]
                if missing:
                    pending.extend(missing)
                    continue
                bits = 0
                for parent in parents:
                    bits |= ancestors[parent] | (1 << order[parent])
                ancestors[current] = bits
                pending.pop()
        return ancestors[node]

    hazards = []
    for name in state:
        value, writer = inputs.get(name), producers.get(f"{name}{UPDATED_SUFFIX}")
        if value is None or writer is None:
            hazards.append(f"{name}: no input {name!r} or no node writing {name + UPDATED_SUFFIX!r}")
            continue
        before = ancestors_of(writer)
        readers, views = {}, [value]  # node -> the value (the input or a view of it) it reads
        while views:
            viewed = views.pop()
            for node, _ in viewed.uses():
                readers[node] = viewed
                if node.op_type in _VIEW_OPS and node is not writer:
                    views.extend(node.outputs)
        for node, read in readers.items():
            if node is writer:
                elementwise = node.op_type in _IN_PLACE_WRITERS and read is value
                if not (elementwise and value.shape is not None and node.outputs[0].shape == value.shape):
                    hazards.append(f"{name} is overwritten by {node.op_type} node {node.name!r}, which reads it "
                                   "other than elementwise")
            elif not (before >> order[node]) & 1:
                hazards.append(f"{name} is read by {node.op_type} node {node.name!r}, which may run after "
                               f"{writer.name!r} writes {name}{UPDATED_SUFFIX}")
    return hazards
