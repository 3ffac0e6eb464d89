"""`Emitter`: the one way every pass and builder emits nodes, onto an `onnx_ir.tape.Tape`.

Every node and value an emitter makes is called ``<prefix>/<name>`` (made unique
within one graph by a shared name set), so a reader of the emitted graph in Netron
sees ``/layer4/conv2/Conv/gf/dY_avg`` rather than ``n123``. Nodes can carry their
layer and phase (``forward``/``backward``/``optimizer``) in ``metadata_props``, which
survive saving: `nodes_of_layer` finds a layer's nodes again by that metadata, never
by parsing names (inspect, bench and the driver use it).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

LAYER_KEY = "gfc.layer"  # node metadata: the forward node (a conv's name) an emitted node belongs to
PHASE_KEY = "gfc.phase"  # node metadata: forward, backward or optimizer


class Emitter:
    """Emits ops onto ``tape``; ``names`` is shared by every emitter of one graph."""

    def __init__(self, tape: ir.tape.Tape, prefix: str, names: set[str] | None = None, *,
                 layer: str | None = None, phase: str | None = None) -> None:
        self.tape = tape
        self.prefix = prefix
        self.names = names if names is not None else set()
        self.metadata = {key: value for key, value in ((LAYER_KEY, layer), (PHASE_KEY, phase)) if value}

    def child(self, prefix: str, *, layer: str | None = None, phase: str | None = None) -> Emitter:
        """An emitter on the same tape and name set with another prefix."""
        return Emitter(self.tape, prefix, self.names, layer=layer or self.metadata.get(LAYER_KEY),
                       phase=phase or self.metadata.get(PHASE_KEY))

    def unique(self, name: str) -> str:
        full = f"{self.prefix}/{name}" if self.prefix else name
        candidate, counter = full, 1
        while candidate in self.names:
            counter += 1
            candidate = f"{full}_{counter}"
        self.names.add(candidate)
        return candidate

    def op(self, op_type: str, inputs: list[ir.Value | None], name: str, **attributes) -> ir.Value:
        """One node with one output; the node and its output share the (unique) name."""
        full = self.unique(name)
        return self.tape.op(op_type, inputs, attributes=attributes or None, name=full,
                            output=ir.Value(name=full), metadata_props=dict(self.metadata) or None)

    def ops(self, op_type: str, inputs: list[ir.Value | None], name: str, outputs: int, **attributes) -> list[ir.Value]:
        """One node with ``outputs`` outputs named ``<name>:<i>``."""
        full = self.unique(name)
        values = [ir.Value(name=self.unique(f"{name}:{i}")) for i in range(outputs)]
        return list(self.tape.op_multi_out(op_type, inputs, attributes=attributes or None, outputs=values,
                                           name=full, metadata_props=dict(self.metadata) or None))

    def const(self, name: str, array) -> ir.Value:
        """An initializer holding ``array`` (its dtype kept)."""
        full = self.unique(name)
        return self.tape.initializer(ir.tensor(np.asarray(array), name=full))

    def ints(self, name: str, values) -> ir.Value:
        return self.const(name, np.asarray(values, dtype=np.int64))

    def scalar(self, name: str, value: float, dtype=np.float32) -> ir.Value:
        return self.const(name, np.asarray(value, dtype=dtype))


def graph_names(graph: ir.Graph) -> set[str]:
    """Every node, value and initializer name in ``graph``: the name set for emitters that add to it."""
    names = {node.name for node in graph if node.name}
    names |= {value.name for node in graph for value in node.outputs if value.name}
    names |= {value.name for value in graph.inputs if value.name} | set(graph.initializers)
    return names


def insert_before(graph: ir.Graph, tape: ir.tape.Tape, node: ir.Node) -> list[ir.Node]:
    """Put what ``tape`` recorded into ``graph``: its initializers, and its nodes right before ``node``."""
    for initializer in tape.initializers:
        graph.register_initializer(initializer)
    nodes = list(tape.nodes)
    graph.insert_before(node, nodes)
    return nodes


def append(graph: ir.Graph, tape: ir.tape.Tape) -> None:
    """Put what ``tape`` recorded into ``graph``: its initializers, and its nodes at the end."""
    for initializer in tape.initializers:
        graph.register_initializer(initializer)
    graph.extend(tape.nodes)


def tag(nodes, *, layer: str | None = None, phase: str | None = None) -> None:
    """Record ``layer``/``phase`` in the metadata of ``nodes`` that carry none yet."""
    for node in nodes:
        if layer and LAYER_KEY not in node.metadata_props:
            node.metadata_props[LAYER_KEY] = layer
        if phase and PHASE_KEY not in node.metadata_props:
            node.metadata_props[PHASE_KEY] = phase


def nodes_of_layer(graph, layer: str, phase: str | None = None) -> list:
    """The nodes of ``graph`` whose metadata names ``layer`` (and ``phase``, if given), in graph order."""
    return [node for node in graph if node.metadata_props.get(LAYER_KEY) == layer
            and (phase is None or node.metadata_props.get(PHASE_KEY) == phase)]
