"""Named initializers that stand for a model's own values: folded weights, frozen constants, untied copies.

Nodes a pass emits, and their helper constants, go through `gfcompiler.emit.Emitter` instead.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as an initializer named ``name`` (suffixed ``_1``, ``_2``… if taken)."""
    unique, index = name, 1
    while unique in graph.initializers:
        unique, index = f"{name}_{index}", index + 1
    tensor = ir.tensor(np.ascontiguousarray(array), name=unique)
    value = ir.Value(name=unique, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value
