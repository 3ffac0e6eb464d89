"""The gradient-filter pass: rewrite the exact conv backward of trained layers.

In onnxruntime-training's ``training_model.onnx`` each Conv's backward is one
``com.microsoft::ConvGrad(dY, X, W) -> (dX, dW, dB)`` node. For every ConvGrad whose
forward Conv is in ``geometries`` this pass

1. builds the forward summaries ``X_sum``, ``W_sum`` right before the forward Conv;
2. makes the forward Conv depend on ``X_sum`` (its bias becomes
   ``b + 0·ΣX_sum``) so that onnxruntime runs the pooling in the forward pass and the
   full-resolution X is released after the forward (measured: ORT schedules a node
   whose only consumers are backward nodes lazily, which would keep X alive);
3. builds the filtered backward from (dY, X_sum, W_sum) before the ConvGrad, moves
   every use of the ConvGrad's outputs onto the new values, and removes the ConvGrad.

Forward and ConvGrad are matched through use-def links (the ConvGrad reads the same
X and W values as its Conv), never through names. Layers not in ``geometries`` keep
their exact backward. Invariants kept: topological order (new nodes are inserted
before their first consumer), unique names (node and value names are prefixed with
the layer's name). Every emitted node records its conv and phase in its metadata
(`gfcompiler.emit`), which is how inspect, bench and the driver find it again.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from gfcompiler.emit import Emitter, graph_names, insert_before
from gfcompiler.geometry import FilterGeometry
from gfcompiler.passes import filter_ops

CONV_GRAD = ("com.microsoft", "ConvGrad")
FORWARD, BACKWARD = "forward", "backward"  # the phases this pass records in its nodes' metadata


def is_conv_grad(node: ir.Node) -> bool:
    return (node.domain, node.op_type) == CONV_GRAD


def forward_conv_of(conv_grad: ir.Node) -> ir.Node | None:
    """The forward Conv a ConvGrad differentiates: the Conv reading the same X and W."""
    _, x, w = conv_grad.inputs[:3]
    for consumer in w.consumers():
        if consumer.op_type == "Conv" and consumer.inputs[0] is x and consumer.inputs[1] is w:
            return consumer
    return None


def _used(value: ir.Value | None) -> bool:
    return value is not None and (bool(value.uses()) or value.is_graph_output())


@dataclasses.dataclass
class GradientFilterResult(ir.passes.PassResult):
    """``rewritten``: the convs whose ConvGrad was replaced, in graph order.

    Their emitted nodes carry the conv's name as ``gfc.layer`` and ``forward`` or
    ``backward`` as ``gfc.phase``: `gfcompiler.emit.nodes_of_layer` lists them.
    """

    rewritten: list[str] = dataclasses.field(default_factory=list)


class GradientFilterPass(ir.passes.InPlacePass):
    """Replace the ConvGrad of each conv named in ``geometries`` by the filtered backward.

    ``force_forward_pooling=False`` skips step 2; it exists only so tests and the
    memory analysis can show what the dependency buys.
    """

    def __init__(self, geometries: dict[str, FilterGeometry], force_forward_pooling: bool = True) -> None:
        super().__init__()
        self.geometries = geometries
        self.force_forward_pooling = force_forward_pooling

    def call(self, model: ir.Model) -> GradientFilterResult:
        graph = model.graph
        result = GradientFilterResult(model, False)
        names = graph_names(graph)
        for conv_grad in [node for node in graph if is_conv_grad(node)]:
            forward = forward_conv_of(conv_grad)
            if forward is None or forward.name not in self.geometries:
                continue
            self._rewrite(graph, forward, conv_grad, self.geometries[forward.name], names)
            result.rewritten.append(forward.name)
            result.modified = True
        return result

    def _rewrite(self, graph: ir.Graph, forward: ir.Node, conv_grad: ir.Node, geom: FilterGeometry,
                 names: set[str]) -> None:
        prefix = f"{forward.name}/gf"
        dy, x, w = conv_grad.inputs[:3]
        dx_out, dw_out, db_out = (list(conv_grad.outputs) + [None, None, None])[:3]

        summaries = Emitter(ir.tape.Tape(), prefix, names, layer=forward.name, phase=FORWARD)
        x_sum, w_sum = filter_ops.build_forward_summaries(summaries, x, w, geom)
        _annotate(x_sum, [x.shape[0] if x.shape is not None else None, geom.conv.in_channels, *geom.patches])
        if self.force_forward_pooling:
            add_forward_dependency(summaries, forward, x_sum, geom)
        insert_before(graph, summaries.tape, forward)

        backward = Emitter(ir.tape.Tape(), prefix, names, layer=forward.name, phase=BACKWARD)
        grads = filter_ops.build_filtered_backward(
            backward, dy, x_sum, w_sum, geom, needs_input_grad=_used(dx_out), needs_bias_grad=_used(db_out), weight=w,
        )
        insert_before(graph, backward.tape, conv_grad)
        for old, new in ((dx_out, grads.input_grad), (dw_out, grads.weight_grad), (db_out, grads.bias_grad)):
            if _used(old):
                old.replace_all_uses_with(new, replace_graph_outputs=True)
        graph.remove(conv_grad, safe=True)


def add_forward_dependency(e: Emitter, forward: ir.Node, x_sum: ir.Value, geom: FilterGeometry) -> None:
    """bias ← bias + 0·ΣX_sum: a data dependency that schedules the pooling in the forward.

    The nodes go onto ``e``'s tape; the caller inserts them before ``forward``.
    """
    total = e.op("ReduceSum", [x_sum], "X_sum_total", keepdims=0)
    anchor = e.op("Mul", [total, e.const("bias_zeros", np.zeros(geom.conv.out_channels, np.float32))], "schedule_anchor")
    bias = forward.inputs[2] if len(forward.inputs) > 2 else None
    if bias is not None:
        anchor = e.op("Add", [bias, anchor], "anchored_bias")
    else:
        forward.resize_inputs(3)
    forward.replace_input_with(2, anchor)


def _annotate(value: ir.Value, dims: list) -> None:
    value.dtype = ir.DataType.FLOAT
    value.shape = ir.Shape([d if d is not None else "N" for d in dims])
