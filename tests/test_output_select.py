"""``--train-output``: a model with several outputs trains the one named, and only that one is kept.

The model is built by hand (onnx.helper): a shared trunk, a classifier head ``logits``
(N×4), a dense head whose conv of its own is split (as detectors split scores and boxes)
into ``heatmap`` (N×1×8×8) and ``offsets`` (N×2×8×8), and ``features`` (the pooled
trunk, N×6). Training the chosen output must be exactly training a model that had only
that output (same weights): same loss, same parameters after a step, on both backends.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from gfcompiler.cli import main
from gfcompiler.driver import CompileOptions, compile_model
from gfcompiler.errors import InputError, UnsupportedModelError

RNG = np.random.default_rng(0)
WEIGHTS = {
    "w1": RNG.standard_normal((6, 3, 3, 3)).astype(np.float32) * 0.3,
    "w2": RNG.standard_normal((6, 6, 3, 3)).astype(np.float32) * 0.3,
    "wh": RNG.standard_normal((3, 6, 3, 3)).astype(np.float32) * 0.3,
    "head_split": np.array([1, 2], np.int64),
    "wfc": RNG.standard_normal((4, 6)).astype(np.float32) * 0.3,
    "bfc": np.zeros(4, np.float32),
}
OUTPUTS = {"heatmap": [None, 1, 8, 8], "offsets": [None, 2, 8, 8], "logits": [None, 4], "features": [None, 6]}


def _model_file(path, outputs=tuple(OUTPUTS)) -> str:
    """The three-headed model (or the same graph with only ``outputs``), saved at ``path``."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["t1"], pads=[1, 1, 1, 1], name="trunk1"),
        helper.make_node("Relu", ["t1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["t2"], pads=[1, 1, 1, 1], name="trunk2"),
        helper.make_node("Relu", ["t2"], ["r2"]),
        helper.make_node("Conv", ["r2", "wh"], ["dense"], pads=[1, 1, 1, 1], name="heat"),
        helper.make_node("Split", ["dense", "head_split"], ["heatmap", "offsets"], axis=1, name="split_head"),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"]),
        helper.make_node("Gemm", ["features", "wfc", "bfc"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "three_heads",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *OUTPUTS[name][1:]]) for name in outputs],
        [numpy_helper.from_array(array, name) for name, array in WEIGHTS.items()],
    )
    model = onnx.utils.Extractor(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)).extract_model(
        ["x"], list(outputs))  # the single-output twin: exactly the nodes that output needs
    onnx.save(model, path)
    return str(path)


def _cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_several_outputs_without_a_choice_are_refused_listing_them(tmp_path, capsys):
    model = _model_file(tmp_path / "m.onnx")
    code, err = _cli(capsys, "compile", model, "-o", str(tmp_path / "out"))
    errors = [line for line in err.splitlines() if line.startswith("gfc: error")]
    assert code == UnsupportedModelError.exit_code and len(errors) == 1, err
    assert ("4 outputs: 'heatmap' (?×1×8×8), 'offsets' (?×2×8×8), 'logits' (?×4), 'features' (?×6)" in errors[0]
            and "--train-output NAME" in errors[0]), err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_unknown_output_name_is_refused_listing_the_outputs(tmp_path, capsys):
    model = _model_file(tmp_path / "m.onnx")
    code, err = _cli(capsys, "compile", model, "-o", str(tmp_path / "out"), "--train-output", "boxes")
    errors = [line for line in err.splitlines() if line.startswith("gfc: error")]
    assert code == InputError.exit_code and len(errors) == 1, err
    assert "--train-output 'boxes' is not an output" in errors[0] and "'logits' (?×4)" in errors[0], err
    with pytest.raises(InputError, match="'boxes' is not an output"):  # also when the model has one output
        compile_model(_model_file(tmp_path / "one.onnx", ("logits",)), tmp_path / "o", CompileOptions(train_output="boxes"))


def _compile(model: str, out, output: str | None, backend: str) -> dict:
    return compile_model(model, out, CompileOptions(layers=2, patch=2, backend=backend, train_output=output,
                                                   input_shapes=[], loss="cross_entropy"))


@pytest.mark.parametrize("backend", ["onnx", "ort-training"])
def test_chosen_output_trains_like_a_model_with_only_that_output(tmp_path, backend):
    from gfcompiler.runtime import Trainer

    chosen = _compile(_model_file(tmp_path / "m.onnx"), tmp_path / "chosen", "logits", backend)
    alone = _compile(_model_file(tmp_path / "alone.onnx", ("logits",)), tmp_path / "alone", None, backend)
    assert [o["name"] for o in chosen["outputs"]] == ["logits"]
    assert chosen["trainable_params"] == alone["trainable_params"] and "heat" not in str(chosen["layers"])
    assert any("'logits' is trained and exported" in note and "'heatmap', 'offsets', 'features'" in note
               for note in chosen["notes"]), chosen["notes"]
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    y = np.array([1, 3], np.int64)
    trainers = Trainer(tmp_path / "chosen"), Trainer(tmp_path / "alone")
    losses = [trainer.step(x, y) for trainer in trainers]
    assert np.isfinite(losses[0]) and losses[0] == pytest.approx(losses[1], rel=1e-6)
    after = [trainer.parameters() for trainer in trainers]
    for name in alone["trainable_params"]:
        assert not np.allclose(after[0][name], WEIGHTS[name]), f"{name} did not move"
        np.testing.assert_allclose(after[0][name], after[1][name], rtol=1e-5, atol=1e-7)


def test_a_split_head_trains_only_the_chosen_part_on_both_backends(tmp_path):
    """Training ``heatmap`` (channel 0 of the split head conv) leaves the ``offsets`` channels' weights alone.

    onnxruntime-training's Split gradient concatenates the gradients of the used outputs only,
    so a Split left with an unused output gave a dY with the wrong channel count and garbage
    weight updates; the compiler slices the used parts instead.
    """
    from gfcompiler.artifacts import OptimizerSpec
    from gfcompiler.runtime import Trainer

    model = _model_file(tmp_path / "m.onnx")
    sgd = OptimizerSpec(name="sgd", momentum=0.0, weight_decay=0.0)
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    target = RNG.random((2, 1, 8, 8)).astype(np.float32)
    updates = {}
    for backend in ("onnx", "ort-training"):
        compile_model(model, tmp_path / backend, CompileOptions(layers=2, patch=0, backend=backend, loss="mse",
                                                                 optimizer=sgd, train_output="heatmap"))
        trainer = Trainer(tmp_path / backend)
        trainer.step(x, target)
        updates[backend] = {name: value - WEIGHTS[name] for name, value in trainer.parameters().items()}
    for backend, update in updates.items():
        assert np.abs(update["wh"][0]).max() > 0 and np.abs(update["wh"][1:]).max() == 0, backend
    for name in updates["onnx"]:
        np.testing.assert_allclose(updates["ort-training"][name], updates["onnx"][name], rtol=1e-4, atol=1e-7)


def test_export_gives_the_chosen_output_only(tmp_path):
    from gfcompiler.runtime import Trainer

    source = _model_file(tmp_path / "m.onnx")
    _compile(source, tmp_path / "out", "features", "onnx")
    exported = Trainer(tmp_path / "out").export(tmp_path / "model.onnx")  # untrained: the source's weights
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["features"]
    expected = ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(["features"], {"x": x})[0]
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-6)


def test_inputs_only_dropped_outputs_need_are_dropped(tmp_path):
    """A second input feeding only a dropped output (Paddle detectors' ``scale_factor``) goes with it."""
    import onnx_ir as ir

    from gfcompiler.passes.output_select import SelectOutputPass

    model = onnx.load(_model_file(tmp_path / "m.onnx"))
    model.graph.input.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1]))
    model.graph.node.append(helper.make_node("Mul", ["heatmap", "scale"], ["scaled"]))
    model.graph.output.append(helper.make_tensor_value_info("scaled", TensorProto.FLOAT, None))
    ir_model = ir.serde.deserialize_model(model)
    selected = SelectOutputPass("logits")(ir_model).selected
    assert selected.dropped_outputs == ("heatmap", "offsets", "features", "scaled")
    assert selected.dropped_inputs == ("scale",) and selected.removed_nodes == 3 and "wh" not in ir_model.graph.initializers
    assert [v.name for v in ir_model.graph.inputs] == ["x"] and [v.name for v in ir_model.graph.outputs] == ["logits"]


def test_a_time_major_output_is_refused_naming_the_batch_axis(tmp_path):
    """A T×N×C output (CTC recognizers) puts the samples on axis 1: the loss and runtime need them on axis 0."""
    model = onnx.load(_model_file(tmp_path / "m.onnx", ("heatmap",)))
    model.graph.node.extend([
        helper.make_node("Squeeze", ["heatmap", "one"], ["sequence"]),  # N×8×8: 8 steps of 8 features
        helper.make_node("Transpose", ["sequence"], ["steps"], perm=[1, 0, 2]),
    ])
    model.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "one"))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("steps", TensorProto.FLOAT, [8, "N", 8]))
    onnx.save(model, tmp_path / "steps.onnx")
    with pytest.raises(UnsupportedModelError, match=r"output 'steps' \(8×\?×8\) has the batch 'N' of input 'x' "
                                                    r"on axis 1, not axis 0"):
        compile_model(tmp_path / "steps.onnx", tmp_path / "out", CompileOptions(loss="mse"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("opset, split", [(11, {"split": [2, 3]}), (13, "input"), (18, {"num_outputs": 2}), (17, {})])
def test_a_split_with_an_unused_part_becomes_a_slice_of_the_same_values(opset, split):
    """Every spelling of the part sizes: an attribute (opset < 13), an input, num_outputs (uneven), equal parts."""
    import onnx_ir as ir

    from gfcompiler.passes.output_select import SliceSplitsWithUnusedOutputsPass

    parts = 3 if split == {} else 2
    names = [f"part{i}" for i in range(parts)]
    inputs = ["x", "sizes"] if split == "input" else ["x"]
    node = helper.make_node("Split", inputs, names, axis=1, **(split if isinstance(split, dict) else {}))
    width = 6 if split == {} else 5
    graph = helper.make_graph(
        [node, helper.make_node("Relu", [names[1]], ["y"])], "split",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([2, 3], np.int64), "sizes")] if split == "input" else [])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    x = RNG.standard_normal((2, width)).astype(np.float32)
    expected = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    model = ir.serde.deserialize_model(proto)
    assert SliceSplitsWithUnusedOutputsPass()(model).modified
    assert [n.op_type for n in model.graph] == ["Slice", "Relu"]
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], expected[0])
