"""Reverse-mode differentiation of an onnx_ir graph into standard ONNX ops.

`differentiate` walks the forward nodes that lie on a path from a trained parameter
to a seeded value (the model output, seeded with dL/d(output) by `losses`) in reverse
graph order. For each it asks a gradient rule (`grad_rules.RULES` by op type, or a
per-node override such as the gradient filter of a trained conv) for the gradients
of the inputs that need one, given the gradients of its outputs, and sums the
contributions of a value's several consumers. Nodes off those paths (the frozen
prefix, shape computations, the forward summaries of the filter) get no backward.

The emitted nodes are collected on a tape in emission order, which is a valid
topological order after the forward nodes; the caller appends them to the graph.
Values and nodes are linked by use-def edges throughout; names only label them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from gfcompiler.emit import Emitter, tag
from gfcompiler.errors import UnsupportedModelError
from gfcompiler.onnx_step.rules_api import GradContext, GradRule

_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}


@dataclasses.dataclass
class Gradients:
    """The result: each parameter's gradient and the backward nodes emitted per forward node."""

    of: dict[ir.Value, ir.Value]
    backward_nodes: dict[ir.Node, list[ir.Node]]
    needs: dict[ir.Node, list[bool]]  # per differentiated node: which inputs got a gradient


def _is_float(value: ir.Value) -> bool:
    return value.dtype is None or value.dtype in _FLOAT_TYPES


def values_requiring_grad(graph: ir.Graph, wrt: list[ir.Value]) -> set[ir.Value]:
    """Float values that depend on a parameter in ``wrt`` (the parameters included)."""
    requiring = set(wrt)
    for node in graph:
        if any(value in requiring for value in node.inputs if value is not None):
            requiring.update(output for output in node.outputs if _is_float(output))
    return requiring


def values_needed(graph: ir.Graph, seeds: set[ir.Value], requiring: set[ir.Value]) -> set[ir.Value]:
    """Values whose gradient the seeds need: those ``requiring`` a gradient that a seed depends on."""
    needed = set(seeds)
    for node in reversed(list(graph)):
        if any(output in needed for output in node.outputs):
            needed.update(value for value in node.inputs if value is not None and value in requiring)
    return needed


class _Accumulator:
    """Gradient contributions per value, summed once when the value's producer is differentiated."""

    def __init__(self, emitter: Emitter) -> None:
        self.emitter = emitter
        self.parts: dict[ir.Value, list[ir.Value]] = {}

    def add(self, value: ir.Value, grad: ir.Value) -> None:
        self.parts.setdefault(value, []).append(grad)

    def total(self, value: ir.Value) -> ir.Value | None:
        parts = self.parts.get(value)
        if not parts:
            return None
        if len(parts) > 1:
            name = f"d({(value.name or 'value').rsplit('/', 1)[-1]})"
            parts[:] = [self.emitter.op("Sum", list(parts), name)]
        return parts[0]


def differentiate(
    graph: ir.Graph,
    seeds: Mapping[ir.Value, ir.Value],
    wrt: list[ir.Value],
    emitter: Emitter,
    rules: Mapping[str, GradRule],
    overrides: Mapping[ir.Node, GradRule] | None = None,
) -> Gradients:
    """Emit the gradient of the seeded values with respect to ``wrt`` onto ``emitter``'s tape.

    ``seeds`` maps forward values to their incoming gradients (dL/d(value)).
    ``overrides`` replaces the rule of individual nodes. A node on the gradient path
    with no rule is refused with its op and name.
    """
    overrides = overrides or {}
    requiring = values_requiring_grad(graph, wrt)
    needed = values_needed(graph, set(seeds), requiring)
    grads = _Accumulator(emitter.child("", phase="backward"))
    for value, grad in seeds.items():
        grads.add(value, grad)
    emitted: dict[ir.Node, list[ir.Node]] = {}
    needs_of: dict[ir.Node, list[bool]] = {}
    for node in reversed(list(graph)):
        if not any(output in needed for output in node.outputs):
            continue
        needs = [value is not None and value in needed for value in node.inputs]
        if not any(needs):
            continue
        dys = [grads.total(output) for output in node.outputs]
        if all(dy is None for dy in dys):
            continue
        rule = overrides.get(node) or (rules.get(node.op_type) if node.domain in ("", "ai.onnx") else None)
        if rule is None:
            raise UnsupportedModelError(_no_rule_message(graph, node))
        start = len(emitter.tape.nodes)
        layer = node.name or node.op_type
        context = GradContext(node, emitter.child(f"{layer}/grad", layer=layer, phase="backward"), needs)
        results = list(rule(context, dys))
        if len(results) < len(node.inputs):
            results += [None] * (len(node.inputs) - len(results))
        for value, need, grad in zip(node.inputs, needs, results):
            if need and grad is not None:
                grads.add(value, grad)
        emitted[node] = list(emitter.tape.nodes[start:])
        tag(emitted[node], layer=layer, phase="backward")
        needs_of[node] = needs
    gradients = {}
    for param in wrt:
        grad = grads.total(param)
        if grad is None:  # the parameter does not reach the loss: its gradient is zero
            grad = emitter.const(f"{param.name}/zero_grad", np.zeros(tuple(param.shape), np.float32))
        gradients[param] = grad
    return Gradients(gradients, emitted, needs_of)


def _no_rule_message(graph: ir.Graph, node: ir.Node) -> str:
    """Why ``node`` stops the backward, and whether training fewer layers can avoid it."""
    where = f"no gradient rule for op {node.op_type} (node {node.name or '?'}) in the trained region"
    nodes = list(graph)
    if any(later.op_type == "Conv" for later in nodes[nodes.index(node) + 1:]):
        return f"{where}; train fewer layers (--layers) so it stays frozen"
    return (f"{where}; it lies between the last conv and the output, so every trained layer's gradient "
            "would pass through it and no --layers choice avoids it")
