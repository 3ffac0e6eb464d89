"""Cleanups of the generated training graph that onnxruntime-training leaves undone."""

from __future__ import annotations

import onnx_ir as ir


class DropUnusedMaxPoolIndicesPass(ir.passes.InPlacePass):
    """Remove the ``Indices`` output of MaxPool nodes where nothing reads it.

    The training-graph builder gives every MaxPool an indices output, frozen ones too;
    onnxruntime then picks a kernel that computes them, which was ~20× slower for
    resnet18's stem pool (21 ms vs 1 ms at batch 8, ~10% of a training step). A MaxPool
    whose gradient is needed keeps its indices (MaxPoolGrad reads them).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in model.graph:
            if node.op_type != "MaxPool" or node.domain not in ("", "ai.onnx") or len(node.outputs) < 2:
                continue
            indices = node.outputs[1]
            if indices.uses() or indices.is_graph_output():
                continue
            node.resize_outputs(1)
            modified = True
        return ir.passes.PassResult(model, modified)
