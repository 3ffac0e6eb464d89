"""Which layers train: the last N convolutions (or named ones) and everything after them.

The rule (stated in ``gfc compile --help`` and the README):

* ``--layers N``: the last N ``Conv`` nodes in the graph's node order. ONNX nodes are
  topologically sorted and exporters list them in forward order, so this is
  deterministic and matches "the last N layers" of the source model.
* ``--layers name1,name2``: exactly those Conv nodes. ``--layers all``: every Conv.
  Without ``--layers``: the last 4 convs (all of them in a model with fewer).
* Trainable parameters: the weight and bias of each selected conv, plus every
  parameter of a node downstream of a selected conv (the head): Conv/ConvTranspose
  weights and biases, Gemm B and C, MatMul constant operands and the constant bias of
  an Add that follows such a MatMul. Every other initializer is frozen (frozen
  BatchNorm affines included) and no backward is built for it.

The dataflow graph is a networkx DiGraph of nodes, so "downstream" is
`networkx.descendants`.
"""

from __future__ import annotations

import dataclasses

import networkx as nx
import onnx_ir as ir

from gfcompiler.constants import add_initializer
from gfcompiler.errors import InputError, UnsupportedModelError

PARAMETRIC_OPS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1)}


@dataclasses.dataclass
class Selection:
    """The outcome of layer selection."""

    convs: list[ir.Node]  # every Conv, in node order
    trained_convs: list[ir.Node]
    trainable_params: list[str]
    trained_region: set[ir.Node]  # nodes downstream of (and including) a trained conv
    rule: str

    def is_trained(self, conv: ir.Node) -> bool:
        return conv in self.trained_convs


def dataflow_graph(graph: ir.Graph) -> nx.DiGraph:
    """Nodes as vertices; an edge a→b when b consumes an output of a."""
    dag = nx.DiGraph()
    dag.add_nodes_from(graph)
    for node in graph:
        for output in node.outputs:
            for consumer in output.consumers():
                dag.add_edge(node, consumer)
    return dag


def conv_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [node for node in graph if node.op_type == "Conv" and node.domain in ("", "ai.onnx")]


def parse_layers(text: str) -> int | list[str] | str:
    """``--layers``: a positive count, ``all``, or comma-separated Conv node names."""
    text = text.strip()
    if text == "all":
        return "all"
    try:
        count = int(text)
    except ValueError:
        names = [name.strip() for name in text.split(",") if name.strip()]
        if not names:
            raise InputError("--layers expects a positive count, 'all', or Conv node names") from None
        return names
    if count <= 0:
        raise InputError(f"--layers must be positive, got {count}")
    return count


DEFAULT_LAYERS = 4


def _choose_convs(convs: list[ir.Node], layers: int | list[str] | str | None) -> tuple[list[ir.Node], str]:
    if not convs:
        raise UnsupportedModelError("model has no Conv node: nothing for gradient filtering to train")
    if layers is None:  # the default: the last 4 convs, or all of them in a smaller model
        count = min(DEFAULT_LAYERS, len(convs))
        return convs[-count:], f"last {count} of {len(convs)} Conv nodes in graph order (default)"
    if layers == "all":
        return list(convs), f"all {len(convs)} Conv nodes"
    if isinstance(layers, int):
        if layers > len(convs):
            raise InputError(f"--layers {layers}: the model has only {len(convs)} Conv nodes")
        return convs[-layers:], f"last {layers} of {len(convs)} Conv nodes in graph order"
    by_name = {node.name: node for node in convs}
    unknown = [name for name in layers if name not in by_name]
    if unknown:
        sample = ", ".join(node.name for node in convs[-5:])
        raise InputError(f"--layers: no Conv node named {', '.join(unknown)} (last convs: {sample})")
    chosen = set(layers)
    return [node for node in convs if node.name in chosen], f"named Conv nodes: {', '.join(layers)}"


def _node_parameters(node: ir.Node) -> list[ir.Value]:
    """Constant float operands of a parametric node (see the module docstring)."""
    positions = PARAMETRIC_OPS.get(node.op_type)
    if positions is None:
        if node.op_type == "Add":
            producers = [v.producer() for v in node.inputs if v is not None]
            if any(p is not None and p.op_type == "MatMul" for p in producers):
                return [v for v in node.inputs if _is_float_initializer(v)]
        return []
    return [node.inputs[i] for i in positions if i < len(node.inputs) and _is_float_initializer(node.inputs[i])]


def _is_float_initializer(value: ir.Value | None) -> bool:
    return (
        value is not None
        and value.is_initializer()
        and value.dtype == ir.DataType.FLOAT
        and value.shape is not None
        and len(value.shape) >= 1
    )


def select_layers(graph: ir.Graph, layers: int | list[str] | str | None) -> Selection:
    """Apply the selection rule of the module docstring."""
    convs = conv_nodes(graph)
    trained, rule = _choose_convs(convs, layers)
    dag = dataflow_graph(graph)
    region: set[ir.Node] = set(trained)
    for conv in trained:
        region |= nx.descendants(dag, conv)
    params: list[str] = []
    for node in graph:  # graph order keeps the parameter list deterministic
        if node in region:
            for value in _node_parameters(node):
                if value.name not in params:
                    params.append(value.name)
    for conv in trained:
        if not _is_float_initializer(conv.inputs[1]):
            raise UnsupportedModelError(f"Conv {conv.name!r}: its weight is computed, not a stored parameter, so it cannot be trained")
    return Selection(convs=convs, trained_convs=trained, trainable_params=params, trained_region=region, rule=rule)


def untie_frozen_uses(graph: ir.Graph, selection: Selection) -> int:
    """Give trained nodes their own copy of parameters that frozen nodes also read.

    Exporters deduplicate equal initializers (the legacy PyTorch exporter shares one
    zero bias among many convs), which would tie a trained layer to frozen ones:
    training would change the frozen layers and onnxruntime would build a backward
    through them. Returns the number of parameters copied.
    """
    copied = 0
    for name in selection.trainable_params:
        value = graph.initializers[name]
        outside = [node for node in value.consumers() if node not in selection.trained_region]
        if not outside:
            continue
        inside = [node for node in value.consumers() if node in selection.trained_region]
        for node in inside:
            copy = add_initializer(graph, f"{node.name}.{name}", value.const_value.numpy().copy())
            for index, operand in enumerate(node.inputs):
                if operand is value:
                    node.replace_input_with(index, copy)
            copied += 1
    return copied

