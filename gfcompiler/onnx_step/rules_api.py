"""What a gradient rule sees: `GradContext`, and the `GradRule` signature.

A rule differentiates one forward node. It is called with the node's context and
the gradients flowing into the node's outputs (``dys``, one per output, ``None``
where nothing flows: a zero gradient), and returns one entry per node input: the
gradient of the loss with respect to that input, or ``None`` where
``ctx.needs[i]`` is False (the input is frozen, an integer, or a constant) or the
input is not differentiable (shapes, indices, axes).

Rules emit standard ONNX ops through ``ctx.e`` (an `Emitter` whose prefix is
``<node>/grad``); they never mutate the forward graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from gfcompiler.emit import Emitter


@dataclasses.dataclass
class GradContext:
    """One forward node being differentiated."""

    node: ir.Node
    e: Emitter
    needs: list[bool]  # per node input: does the loss need its gradient?

    @property
    def inputs(self) -> list[ir.Value | None]:
        return list(self.node.inputs)

    @property
    def outputs(self) -> list[ir.Value]:
        return list(self.node.outputs)

    def attr(self, name: str, default=None):
        """The node's attribute value (ints/floats/strings/lists as Python values), or ``default``."""
        attribute = self.node.attributes.get(name)
        return default if attribute is None else attribute.value

    def static_shape(self, value: ir.Value) -> tuple[int, ...] | None:
        """The value's shape when every dimension is a known integer, else None."""
        shape = value.shape
        if shape is None or not all(isinstance(d, int) for d in shape):
            return None
        return tuple(shape)

    def shape_of(self, value: ir.Value) -> ir.Value:
        """A 1-D int64 value holding ``value``'s shape: a constant when static, else a ``Shape`` node."""
        static = self.static_shape(value)
        if static is not None:
            return self.e.ints(f"{_short(value)}_shape", static)
        return self.e.op("Shape", [value], f"{_short(value)}_shape")

    def constant_array(self, value: ir.Value | None) -> np.ndarray | None:
        """The value's contents when it is an initializer or a Constant's output, else None."""
        if value is None:
            return None
        if value.const_value is not None:
            return value.const_value.numpy()
        producer = value.producer()
        if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
            return producer.attributes["value"].value.numpy()
        return None


SPATIALLY_CONSTANT = "gfc.spatially_constant"


def mark_spatially_constant(full: ir.Value, small: ir.Value) -> ir.Value:
    """Record that ``full`` (N×C×H×W) is ``small`` (N×C×1×1) broadcast over H×W.

    A rule that can use the small tensor directly (the gradient filter: the patch
    average of a constant is the constant) reads it with `spatially_constant_source`
    and never touches ``full``, whose producer then has no use and is dropped.
    """
    full.meta[SPATIALLY_CONSTANT] = small
    return full


def spatially_constant_source(value: ir.Value | None) -> ir.Value | None:
    """The N×C×1×1 tensor ``value`` broadcasts, when a rule marked it (`mark_spatially_constant`)."""
    return None if value is None else value.meta.get(SPATIALLY_CONSTANT)


GradRule = Callable[[GradContext, list["ir.Value | None"]], list["ir.Value | None"]]


def _short(value: ir.Value) -> str:
    return (value.name or "value").rsplit("/", 1)[-1]
