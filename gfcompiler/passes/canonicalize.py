"""Canonicalization: bring a real-world inference graph into the form training needs.

Each pass is a small `onnx_ir` in-place pass with one job; `canonicalization_passes()`
lists them in the order the driver runs them. Invariants kept after every pass: the
graph is topologically sorted, value names are unique, and the model computes the
same function as before (up to float rounding for the BatchNorm folds).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from gfcompiler.constants import add_initializer
from gfcompiler.emit import Emitter, graph_names, insert_before
from gfcompiler.loading import tensor_array


def _is_default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


class FoldConstantOfShapePass(ir.passes.InPlacePass):
    """Turn ``ConstantOfShape`` nodes whose shape is a constant into initializers.

    Old model-zoo graphs (IR 3, opset 9) store every weight as
    ``ConstantOfShape(Constant shape)``; after this pass (and the Constant lifting
    that follows it) weights are plain initializers that can be trained or frozen.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph):
            if node.op_type != "ConstantOfShape" or not _is_default_domain(node):
                continue
            shape = tensor_array(node.inputs[0])
            if shape is None:
                shape = _constant_node_array(node.inputs[0])
            if shape is None or node.outputs[0].is_graph_output():
                continue
            attr = node.attributes.get("value")
            fill = attr.as_tensor().numpy().reshape(-1) if attr is not None else np.zeros(1, np.float32)
            array = np.full(tuple(int(d) for d in shape), fill[0], dtype=fill.dtype)
            output = node.outputs[0]
            model.graph.remove(node, safe=False)  # its output keeps its uses until replaced below
            output.replace_all_uses_with(add_initializer(model.graph, output.name, array))
            modified = True
        return ir.passes.PassResult(model, modified)


def _constant_node_array(value: ir.Value) -> np.ndarray | None:
    producer = value.producer()
    if producer is None or producer.op_type != "Constant" or "value" not in producer.attributes:
        return None
    return producer.attributes["value"].as_tensor().numpy()


class RemoveDropoutPass(ir.passes.InPlacePass):
    """Replace inference-mode ``Dropout`` by its input (its mask output must be unused)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph):
            if node.op_type != "Dropout" or not _is_default_domain(node):
                continue
            if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
                continue
            output = node.outputs[0]
            if output.is_graph_output():
                continue
            output.replace_all_uses_with(node.inputs[0])
            model.graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)


def _batchnorm_scale_shift(node: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel (scale, shift) of an inference BatchNormalization with constant parameters."""
    if node.attributes.get_int("training_mode", 0):
        return None
    if len(node.outputs) > 1 and any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return None
    gamma, beta, mean, var = (tensor_array(v) for v in node.inputs[1:5])
    if any(a is None for a in (gamma, beta, mean, var)):
        return None
    epsilon = node.attributes.get_float("epsilon", 1e-5)
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + epsilon)
    shift = beta.astype(np.float64) - mean.astype(np.float64) * scale
    return scale, shift


class FoldBatchNormIntoConvPass(ir.passes.InPlacePass):
    """Fold inference-mode ``BatchNormalization`` into the ``Conv`` that feeds it.

    ``BN(Conv(x, W, b)) = Conv(x, W·s, b·s + t)`` with ``s = γ/√(σ²+ε)`` and
    ``t = β − μ·s`` per output channel. Applies when the conv output feeds only the BN
    and W (and b) are constants. Why: onnxruntime-training silently switches every
    BatchNormalization to batch statistics in the training graph (measured on onnxruntime-training 1.19.2).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for bn in list(model.graph):
            if bn.op_type != "BatchNormalization" or not _is_default_domain(bn):
                continue
            conv = bn.inputs[0].producer()
            if conv is None or conv.op_type != "Conv" or len(bn.inputs[0].uses()) != 1 or bn.inputs[0].is_graph_output():
                continue
            affine = _batchnorm_scale_shift(bn)
            weight = tensor_array(conv.inputs[1])
            bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
            bias = tensor_array(bias_value) if bias_value is not None else np.zeros(weight.shape[0] if weight is not None else 0)
            if affine is None or weight is None or bias is None or bn.outputs[0].is_graph_output():
                continue
            scale, shift = affine
            name = conv.name or bn.name
            folded_w = add_initializer(model.graph, f"{name}.weight", (weight * scale.reshape(-1, 1, 1, 1)).astype(np.float32))
            folded_b = add_initializer(model.graph, f"{name}.bias", (bias * scale + shift).astype(np.float32))
            conv.replace_input_with(1, folded_w)
            if len(conv.inputs) > 2:
                conv.replace_input_with(2, folded_b)
            else:
                conv.resize_inputs(3)
                conv.replace_input_with(2, folded_b)
            bn.outputs[0].replace_all_uses_with(conv.outputs[0])
            model.graph.remove(bn, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)


class BatchNormToAffinePass(ir.passes.InPlacePass):
    """Turn every remaining inference ``BatchNormalization`` into a frozen ``Mul`` + ``Add``.

    Covers BNs that do not follow a conv (or whose conv output has other users). The
    constants are per-channel scale/shift reshaped to broadcast over spatial axes, so
    training can never switch them to batch statistics.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        names = graph_names(model.graph)
        for bn in list(model.graph):
            if bn.op_type != "BatchNormalization" or not _is_default_domain(bn):
                continue
            affine = _batchnorm_scale_shift(bn)
            x = bn.inputs[0]
            if affine is None or x.shape is None:
                continue
            scale, shift = affine
            broadcast = (-1,) + (1,) * (len(x.shape) - 2)
            name = bn.name or bn.outputs[0].name
            scale_value = add_initializer(model.graph, f"{name}.frozen_scale", scale.astype(np.float32).reshape(broadcast))
            shift_value = add_initializer(model.graph, f"{name}.frozen_shift", shift.astype(np.float32).reshape(broadcast))
            e = Emitter(ir.tape.Tape(), name, names)
            frozen = e.op("Add", [e.op("Mul", [x, scale_value], "frozen_scale"), shift_value], "frozen_shift")
            insert_before(model.graph, e.tape, bn)
            frozen.name = bn.outputs[0].name
            bn.outputs[0].replace_all_uses_with(frozen, replace_graph_outputs=True)
            model.graph.remove(bn, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)


class IdentityEliminationPass(common_passes.IdentityEliminationPass):
    """onnx_ir's Identity elimination, except where a graph's output would become another graph's value.

    An If/Loop branch often returns an outer-scope value through an Identity (Silero VAD's
    decoder does); onnx_ir would make that outer value the branch's output, which its
    graph containers refuse. Such Identities are kept: they cost nothing at run time.
    """

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        if node.op_type == "Identity" and len(node.inputs) == 1 and node.inputs[0] is not None:
            source, result = node.inputs[0], node.outputs[0]
            producer = source.producer()
            if result.is_graph_output() and (source.is_graph_output() or producer is None or producer.graph is not node.graph):
                return False
        return super()._try_eliminate_identity_node(node)


def canonicalization_passes() -> tuple[ir.passes.PassBase, ...]:
    """The canonicalization pipeline, in order (read top to bottom)."""
    return (
        FoldConstantOfShapePass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0),
        IdentityEliminationPass(),
        RemoveDropoutPass(),
        FoldBatchNormIntoConvPass(),
        BatchNormToAffinePass(),
        common_passes.RemoveInitializersFromInputsPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.NameFixPass(),
        common_passes.TopologicalSortPass(),
    )
