"""Cleanups of the generated training graph that onnxruntime-training leaves undone."""

from __future__ import annotations

import onnx_ir as ir

from gfcompiler.emit import Emitter, append, graph_names, insert_before


class DropUnusedMaxPoolIndicesPass(ir.passes.InPlacePass):
    """Remove the ``Indices`` output of MaxPool nodes where nothing reads it.

    The training-graph builder gives every MaxPool an indices output, frozen ones too;
    onnxruntime then picks a much slower kernel that computes them (benchmarks/README.md,
    "Whole models"). A MaxPool whose gradient is needed keeps its indices (MaxPoolGrad
    reads them).
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


class CoupledWeightDecayPass(ir.passes.InPlacePass):
    """Add ``weight_decay · p`` to each trainable parameter's gradient before it is accumulated.

    torch.optim.SGD's weight decay is coupled: ``g ← g + λ·p`` before momentum. Neither
    onnxruntime's SGD kernel nor the AdamW kernel gfcompiler uses for momentum SGD has
    such a term, so it goes into the training graph: the gradient input of every
    ``InPlaceAccumulatorV2`` whose accumulation buffer belongs to a parameter becomes
    ``Add(grad, Mul(p, λ))``. The loss the graph reports is unchanged.
    """

    def __init__(self, params: list[str], weight_decay: float, buffer_name):
        super().__init__()
        self.params = list(params)
        self.weight_decay = float(weight_decay)
        self.buffer_name = buffer_name  # param name -> its accumulation buffer's input name

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        inputs = {value.name: value for value in graph.inputs}
        by_buffer = {self.buffer_name(name): inputs[name] for name in self.params if name in inputs}
        names = graph_names(graph)
        decay_tape = ir.tape.Tape()
        decay = Emitter(decay_tape, "", names).scalar("weight_decay", self.weight_decay)
        append(graph, decay_tape)  # the decay scalar: an initializer, no nodes
        decayed = 0
        for node in list(graph):
            if node.op_type != "InPlaceAccumulatorV2" or node.inputs[0] is None or node.inputs[0].name not in by_buffer:
                continue
            param, grad = by_buffer[node.inputs[0].name], node.inputs[1]
            e = Emitter(ir.tape.Tape(), f"{param.name}/weight_decay", names)
            total = e.op("Add", [grad, e.op("Mul", [param, decay], "scaled")], "add")
            insert_before(graph, e.tape, node)
            node.replace_input_with(1, total)
            decayed += 1
        if decayed != len(by_buffer):
            raise ValueError(f"weight decay reached {decayed} of {len(by_buffer)} trainable parameters' gradients")
        return ir.passes.PassResult(model, decayed > 0)
