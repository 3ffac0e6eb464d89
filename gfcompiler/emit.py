"""`Emitter`: appends named nodes and constants to an `onnx_ir.tape.Tape`.

Every node and value an emitter makes is called ``<prefix>/<name>`` (made unique
within one compile by a shared name set), so a reader of the emitted graph in
Netron sees ``/layer4/conv2/Conv/grad/dW`` rather than ``n123``. Nodes can carry
their layer and phase (``forward``/``backward``/``optimizer``) in
``metadata_props``, which survive saving.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


class Emitter:
    """Emits ops onto ``tape``; ``names`` is shared by every emitter of one graph."""

    def __init__(self, tape: ir.tape.Tape, prefix: str, names: set[str] | None = None, *,
                 layer: str | None = None, phase: str | None = None) -> None:
        self.tape = tape
        self.prefix = prefix
        self.names = names if names is not None else set()
        self.metadata = {key: value for key, value in (("gfc.layer", layer), ("gfc.phase", phase)) if value}

    def child(self, prefix: str, *, layer: str | None = None, phase: str | None = None) -> Emitter:
        """An emitter on the same tape and name set with another prefix."""
        return Emitter(self.tape, prefix, self.names, layer=layer or self.metadata.get("gfc.layer"),
                       phase=phase or self.metadata.get("gfc.phase"))

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


def tag(nodes, *, layer: str | None = None, phase: str | None = None) -> None:
    """Record ``layer``/``phase`` in the metadata of ``nodes`` that carry none yet."""
    for node in nodes:
        if layer and "gfc.layer" not in node.metadata_props:
            node.metadata_props["gfc.layer"] = layer
        if phase and "gfc.phase" not in node.metadata_props:
            node.metadata_props["gfc.phase"] = phase


def nodes_of_layer(graph, layer: str, phase: str | None = None) -> list:
    """The nodes of ``graph`` whose metadata names ``layer`` (and ``phase``, if given), in graph order."""
    return [node for node in graph if node.metadata_props.get("gfc.layer") == layer
            and (phase is None or node.metadata_props.get("gfc.phase") == phase)]
