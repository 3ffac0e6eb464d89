"""Build the gradient-filter operator as a standalone ONNX model and run it through onnxruntime.

The model's batch axis is ``geom.conv.batch``: an int gives a static batch, None a
dynamic one (the symbolic dimension ``N``), so both of the builder's batch paths run.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from gfcompiler.emit import Emitter
from gfcompiler.geometry import FilterGeometry
from gfcompiler.passes import filter_ops

OUTPUT_NAMES = ("X_sum", "W_sum", "dW", "dB", "dX")


def operator_model(geom: FilterGeometry, batch: int | None = None, needs_input_grad: bool = True) -> ir.Model:
    """A model with inputs (dY, X, W) and outputs (X_sum, W_sum, dW, dB[, dX]).

    ``batch`` overrides ``geom.conv.batch`` for the inputs' batch axis only (the builder
    still reads ``geom.conv.batch``); leave it None to use the geometry's.
    """
    conv = geom.conv
    n = batch if batch is not None else (conv.batch if conv.batch is not None else "N")
    f32 = ir.TensorType(ir.DataType.FLOAT)
    x = ir.Value(name="X", type=f32, shape=ir.Shape([n, conv.in_channels, conv.height, conv.width]))
    w = ir.Value(name="W", type=f32, shape=ir.Shape(list(conv.weight_shape)))
    dy = ir.Value(name="dY", type=f32, shape=ir.Shape([n, conv.out_channels, conv.out_height, conv.out_width]))
    e = Emitter(ir.tape.Tape(), "layer")
    x_sum, w_sum = filter_ops.build_forward_summaries(e, x, w, geom)
    grads = filter_ops.build_filtered_backward(e, dy, x_sum, w_sum, geom, needs_input_grad=needs_input_grad, weight=w)
    outputs = [x_sum, w_sum, grads.weight_grad, grads.bias_grad]
    if needs_input_grad:
        outputs.append(grads.input_grad)
    graph = ir.Graph(
        inputs=[dy, x, w], outputs=outputs, nodes=e.tape.nodes, initializers=e.tape.initializers,
        opset_imports={"": 17}, name="gradient_filter",
    )
    return ir.Model(graph, ir_version=8)


def run_operator(
    geom: FilterGeometry, dy: np.ndarray, x: np.ndarray, w: np.ndarray, needs_input_grad: bool = True
) -> dict[str, np.ndarray]:
    """Run the operator model in onnxruntime (CPU, all graph optimizations on); outputs by name."""
    model = operator_model(geom, None, needs_input_grad)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return dict(zip(OUTPUT_NAMES, session.run(None, {"dY": dy, "X": x, "W": w})))
