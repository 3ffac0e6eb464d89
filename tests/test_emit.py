"""The one emitter (`gfcompiler.emit`): unique names, layer/phase metadata that survives saving, and
`nodes_of_layer` finding a layer's nodes for the driver, inspect and bench without reading names."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from gfcompiler.driver import CompileOptions, compile_model
from gfcompiler.emit import LAYER_KEY, PHASE_KEY, Emitter, insert_before, nodes_of_layer
from gfcompiler.geometry import ConvShape, FilterGeometry
from gfcompiler.passes.gradient_filter import GradientFilterPass, GradientFilterResult, is_conv_grad

F32 = ir.TensorType(ir.DataType.FLOAT)


def test_emitter_names_are_unique_and_nodes_carry_layer_and_phase():
    x = ir.Value(name="x", type=F32, shape=ir.Shape([2]))
    e = Emitter(ir.tape.Tape(), "conv/gf", {"conv/gf/y"}, layer="conv", phase="backward")
    first = e.op("Relu", [x], "y")
    second = e.op("Neg", [first], "y")
    child = e.child("other", phase="forward")
    third = child.op("Abs", [e.scalar("y", 1.0)], "z")
    assert [first.name, second.name, third.name] == ["conv/gf/y_2", "conv/gf/y_3", "other/z"]
    assert [v.producer().name for v in (first, second)] == ["conv/gf/y_2", "conv/gf/y_3"]
    assert [dict(n.metadata_props) for n in e.tape.nodes] == [{LAYER_KEY: "conv", PHASE_KEY: "backward"}] * 2 + [
        {LAYER_KEY: "conv", PHASE_KEY: "forward"}]
    assert [i.name for i in e.tape.initializers] == ["conv/gf/y_4"]


def _conv_and_conv_grad_graph() -> tuple[ir.Model, FilterGeometry]:
    """Conv(X, W, B) and the ``com.microsoft::ConvGrad`` onnxruntime-training would give it."""
    shape = ConvShape(batch=1, in_channels=2, out_channels=3, height=8, width=8, kernel=(3, 3), pads=(1, 1, 1, 1))
    x = ir.Value(name="X", type=F32, shape=ir.Shape([1, 2, 8, 8]))
    dy = ir.Value(name="dY", type=F32, shape=ir.Shape([1, 3, 8, 8]))
    w = ir.Value(name="W", type=F32, shape=ir.Shape([3, 2, 3, 3]), const_value=ir.tensor(np.ones((3, 2, 3, 3), np.float32), name="W"))
    b = ir.Value(name="B", type=F32, shape=ir.Shape([3]), const_value=ir.tensor(np.zeros(3, np.float32), name="B"))
    conv = ir.node("Conv", [x, w, b], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, name="conv")
    grad = ir.node("ConvGrad", [dy, x, w], domain="com.microsoft", num_outputs=3, name="conv_grad")
    for value, name in zip([*conv.outputs, *grad.outputs], ["Y", "dX", "dW", "dB"]):
        value.name = name
    graph = ir.Graph([x, dy], [*conv.outputs, *grad.outputs], nodes=[conv, grad], initializers=[w, b],
                     opset_imports={"": 17, "com.microsoft": 1})
    return ir.Model(graph, ir_version=10), FilterGeometry(shape, 2)


def test_gradient_filter_pass_returns_its_layers_and_its_nodes_are_found_by_metadata(tmp_path):
    model, geometry = _conv_and_conv_grad_graph()
    result = GradientFilterPass({"conv": geometry})(model)
    assert isinstance(result, GradientFilterResult) and result.modified and result.rewritten == ["conv"]
    assert not [node for node in model.graph if is_conv_grad(node)]
    emitted = [node for node in model.graph if node.name.startswith("conv/gf/")]  # the pass's naming convention
    assert nodes_of_layer(model.graph, "conv") == emitted
    phases = {node.metadata_props[PHASE_KEY] for node in emitted}
    assert phases == {"forward", "backward"}
    forward = {node.name for node in nodes_of_layer(model.graph, "conv", "forward")}
    assert {"conv/gf/X_sum", "conv/gf/W_sum", "conv/gf/schedule_anchor"} <= forward
    # The metadata survives saving, and finding the nodes does not depend on their names.
    for index, node in enumerate(model.graph):
        node.name = f"n{index}"
    ir.save(model, str(tmp_path / "m.onnx"))
    loaded = ir.load(str(tmp_path / "m.onnx"))
    assert [n.name for n in nodes_of_layer(loaded.graph, "conv")] == [n.name for n in emitted]


def test_insert_before_registers_initializers_and_keeps_order():
    model, _ = _conv_and_conv_grad_graph()
    conv = next(node for node in model.graph if node.op_type == "Conv")
    e = Emitter(ir.tape.Tape(), "pre")
    doubled = e.op("Mul", [conv.inputs[0], e.scalar("two", 2.0)], "doubled")
    inserted = insert_before(model.graph, e.tape, conv)
    conv.replace_input_with(0, doubled)
    assert list(model.graph)[: len(inserted) + 1] == [*inserted, conv]
    assert "pre/two" in model.graph.initializers


def test_ort_training_filtered_nodes_carry_layer_metadata(small_cnn, tmp_path, capsys):
    """inspect, bench and the driver find ort-training's filtered nodes by metadata (names scrambled here)."""
    from gfcompiler.bench.profile import NodeCategories
    from gfcompiler.cli import main

    directory = tmp_path / "out"
    manifest = compile_model(small_cnn("plain", batch=None), directory,
                             CompileOptions(layers=2, patch=2, backend="ort-training", single_graph=True))
    trained = manifest["selection"]["trained_convs"]
    path = directory / "training_model.onnx"
    graph = ir.load(str(path)).graph
    for conv in trained:
        phases = {node.metadata_props[PHASE_KEY] for node in nodes_of_layer(graph, conv)}
        assert phases == {"forward", "backward"}, conv
        assert main(["inspect", str(directory), "--layer", conv]) == 0
        listed = capsys.readouterr().out
        assert f"{conv}: forward conv and backward subgraph ({len(nodes_of_layer(graph, conv)) + 1} nodes)" in listed
        assert all(f"  {node.outputs[0].name} = {node.op_type}(" in listed for node in nodes_of_layer(graph, conv))
    categories = NodeCategories(path, trained)
    model = ir.load(str(path))
    renamed = {}
    for index, node in enumerate(model.graph):
        if node.name:
            renamed[node.name] = node.name = f"n{index}"
    ir.save(model, str(tmp_path / "scrambled.onnx"))
    scrambled = NodeCategories(tmp_path / "scrambled.onnx", trained)
    assert {renamed[name]: category for name, category in categories.category.items()} == scrambled.category
    assert {renamed[name]: layer for name, layer in categories.layer_of.items()} == scrambled.layer_of
    assert set(categories.layer_of.values()) == set(trained)
    assert {"gf_fwd", "trained_bwd"} <= set(categories.category.values())
