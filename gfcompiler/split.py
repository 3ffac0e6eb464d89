"""Cutting a model at the boundary of its trained region: a frozen prefix and a trained suffix.

When only the last layers train, almost all of the forward pass is frozen. An
onnxruntime training session runs its forward with basic graph optimizations only
(no layout transformation, fewer fusions), so the frozen part costs 1.4–2.4× what it
costs in an inference session. Two-stage artifacts run it there instead:

* the **prefix** is every node that depends on no trained parameter. It is a plain
  inference model whose outputs are the *boundary* tensors;
* the **suffix** is the trained region (`Selection.trained_region`: the trained convs
  and everything downstream of them, which is exactly the set of nodes that depend on
  a trained parameter). Its inputs are the boundary tensors; onnxruntime-training
  builds the training artifacts from it alone.

The boundary is every tensor a suffix node reads that the suffix does not compute:
prefix outputs and data inputs, never initializers. A chain crosses with one tensor;
skip connections make several (resnet18 trained from ``layer4.0.conv2`` on needs the
layer-3 output for the trained downsample conv and the frozen ``layer4.0.conv1``
path's activation). A data input the suffix reads directly crosses as itself: the
runtime feeds it to both stages.

`export_model` is the third piece: the whole forward graph with the trainable
parameters as graph inputs. onnxruntime-training's ``export_model_for_inferencing``
fills those inputs with the trained values, so the runtime recombines prefix and
suffix into one inference model without the onnx package.

The graphs are cut with ``onnx_ir.convenience.extract`` (reachability from the
requested outputs back to the requested inputs) on the canonical, shape-inferred
model; every piece is a new `onnx_ir.Model`, the compiled model is left as it is.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from gfcompiler.loading import data_inputs
from gfcompiler.manifest import TensorRecord
from gfcompiler.selection import Selection

# A tensor that crosses from the prefix (or the data input) into the suffix: a manifest tensor
# record whose ``from_input`` says it is a data input the suffix reads directly.
BoundaryTensor = TensorRecord


@dataclasses.dataclass
class Split:
    """The pieces of a two-stage compilation, as models ready to save or hand to onnxruntime-training."""

    prefix: ir.Model
    suffix: ir.Model
    boundary: list[BoundaryTensor]
    prefix_nodes: int
    suffix_nodes: int


def boundary_values(graph: ir.Graph, region: set[ir.Node]) -> list[ir.Value]:
    """Values read by ``region`` nodes that no ``region`` node produces (initializers excluded), in node order."""
    crossing: list[ir.Value] = []
    for node in graph:
        if node not in region:
            continue
        for value in node.inputs:
            if value is None or value.is_initializer() or value in crossing:
                continue
            if value.producer() is None or value.producer() not in region:
                crossing.append(value)
    return crossing


def why_not_split(model: ir.Model, selection: Selection) -> str | None:
    """Why ``model`` cannot (or need not) be cut before its trained region; None when it can."""
    region = selection.trained_region
    frozen = [node for node in model.graph if node not in region]
    if not frozen:
        return "every node is in the trained region: there is no frozen prefix"
    inputs = set(data_inputs(model))
    crossing = boundary_values(model.graph, region)
    if not any(value not in inputs for value in crossing):
        return "the trained region reads only the data input: the frozen nodes do not feed it"
    first_output = model.graph.outputs[0]
    if first_output.producer() not in region:
        return f"the model output {first_output.name!r} does not depend on a trained layer"
    for value in crossing:
        if value.shape is None or value.dtype is None:
            return f"tensor {value.name!r} crossing into the trained region has no inferred type/shape"
    return None


def split_model(model: ir.Model, selection: Selection) -> Split:
    """Cut ``model`` into prefix and suffix at the trained region (`why_not_split` must be None)."""
    region = selection.trained_region
    crossing = boundary_values(model.graph, region)
    inputs = set(data_inputs(model))
    boundary = [BoundaryTensor.of_value(value, value in inputs, unknown_dtype="float32") for value in crossing]
    prefix = _piece(model, "prefix", data_inputs(model), [value for value in crossing if value not in inputs])
    outputs = [value for value in model.graph.outputs if value.producer() in region]
    suffix = _piece(model, "suffix", crossing, outputs)
    return Split(prefix, suffix, boundary, len(prefix.graph), len(suffix.graph))


def _piece(model: ir.Model, name: str, inputs: list[ir.Value], outputs: list[ir.Value]) -> ir.Model:
    """The nodes of ``model`` between ``inputs`` and ``outputs``, as a new model (initializers in the model's order)."""
    graph = ir.convenience.extract(model.graph, inputs, outputs)
    used = dict(graph.initializers)
    graph.initializers.clear()
    for initializer in model.graph.initializers:  # extract lists them in set order
        if initializer in used:
            graph.register_initializer(used[initializer])
    graph.name = f"{model.graph.name or 'model'}_{name}"
    return ir.Model(graph, ir_version=model.ir_version, producer_name=model.producer_name)


def export_model(model: ir.Model, trainable_params: list[str]) -> ir.Model:
    """The whole forward graph with ``trainable_params`` turned from initializers into graph inputs.

    onnxruntime-training's Module takes it as an eval model (its parameter inputs are
    bound to the checkpoint's values) and ``export_model_for_inferencing`` writes it back
    with the trained values as initializers.
    """
    export = model.clone()
    parameters_to_inputs(export.graph, trainable_params)
    return export


def parameters_to_inputs(graph: ir.Graph, names: list[str]) -> dict[str, ir.Value]:
    """Turn the named initializers into graph inputs, appended in ``names`` order; returns them by name."""
    inputs = {}
    for name in names:
        value = graph.initializers.pop(name)
        value.const_value = None
        graph.inputs.append(value)
        inputs[name] = value
    return inputs


