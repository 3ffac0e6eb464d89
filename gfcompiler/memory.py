"""Static liveness analysis: which tensors a training graph keeps from forward to backward.

onnxruntime runs a training graph's nodes lazily: a node runs in the forward pass only
if the loss depends on it; every other node (the gradient graph, and any node whose
only consumers are gradient nodes) runs in the backward. A tensor produced by the
forward and read by a backward node therefore stays alive from the moment it is made
until the backward reads it. Those tensors are what a training step must hold on top
of inference, and what gradient filtering shrinks: the exact ``ConvGrad`` holds the
conv input X; the filtered backward holds only ``X_sum`` (N·Ci·ph·pw).

`held_for_backward` returns, per conv layer, the bytes of held tensors its backward
nodes read, plus the total over unique tensors. tests/test_memory.py checks the
analysis against onnxruntime's measured peak memory.
"""

from __future__ import annotations

import dataclasses

import networkx as nx
import onnx_ir as ir

from gfcompiler.selection import dataflow_graph

_DTYPE_BYTES = {ir.DataType.FLOAT: 4, ir.DataType.FLOAT16: 2, ir.DataType.DOUBLE: 8, ir.DataType.INT64: 8,
                ir.DataType.INT32: 4, ir.DataType.BOOL: 1, ir.DataType.UINT8: 1, ir.DataType.INT8: 1}


@dataclasses.dataclass
class HeldTensors:
    """Result of the analysis for one training graph and one batch size."""

    per_layer: dict[str, int]  # conv name -> bytes its backward keeps alive
    per_layer_tensors: dict[str, list[str]]
    total_bytes: int  # all tensors held from forward to backward (each counted once)
    unknown: list[str]  # held tensors whose size is unknown (not counted)


def tensor_bytes(value: ir.Value, batch: int, known_shapes: dict[str, tuple] | None = None) -> int | None:
    """Bytes of ``value`` with symbolic dims read as the batch size; None when unknown."""
    dims = None if value.shape is None else [d if isinstance(d, int) else None for d in value.shape]
    if (dims is None or None in dims[1:]) and known_shapes and value.name in known_shapes:
        dims = list(known_shapes[value.name])
    if dims is None or None in dims[1:]:
        return None
    size = 1
    for d in dims:
        size *= batch if d is None else d
    dtype = value.dtype if value.dtype is not None else ir.DataType.FLOAT
    return size * _DTYPE_BYTES.get(dtype, 4)


def forward_nodes(graph: ir.Graph, dag: nx.DiGraph | None = None) -> set[ir.Node]:
    """Nodes the loss (the training graph's first output) depends on: they run in the forward."""
    dag = dag if dag is not None else dataflow_graph(graph)
    loss_producer = graph.outputs[0].producer()
    return {loss_producer} | nx.ancestors(dag, loss_producer)


def held_for_backward(
    graph: ir.Graph,
    layer_backward_nodes: dict[str, set[ir.Node]],
    batch: int,
    known_shapes: dict[str, tuple] | None = None,
    activation_inputs: frozenset[str] = frozenset(),
) -> HeldTensors:
    """Bytes kept from forward to backward, attributed to each layer whose backward reads them.

    ``activation_inputs``: graph inputs that are activations, counted like forward tensors
    (the boundary tensors a two-stage training graph gets from its frozen prefix, which a
    single training graph would have computed itself).
    """
    dag = dataflow_graph(graph)
    forward = forward_nodes(graph, dag)
    held: dict[ir.Value, int | None] = {}
    for node in graph:
        if node not in forward:
            for value in node.inputs:
                if value is None or value.is_initializer():
                    continue
                # Other graph inputs (data, parameters) are held by the caller anyway.
                if value.producer() in forward or value.name in activation_inputs:
                    held.setdefault(value, tensor_bytes(value, batch, known_shapes))
    per_layer, per_layer_tensors = {}, {}
    for layer, nodes in layer_backward_nodes.items():
        reads = {value for node in nodes if node not in forward for value in node.inputs if value in held}
        per_layer[layer] = sum(held[v] or 0 for v in reads)
        per_layer_tensors[layer] = sorted(v.name for v in reads)
    return HeldTensors(
        per_layer=per_layer,
        per_layer_tensors=per_layer_tensors,
        total_bytes=sum(b or 0 for b in held.values()),
        unknown=sorted(v.name for v, b in held.items() if b is None),
    )
