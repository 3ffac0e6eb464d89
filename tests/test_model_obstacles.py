"""Model shapes found in third-party graphs: each compiles, or is refused naming the obstacle.

Hand-built with onnx.helper, so every case is small and exact:

* an If whose branches return an outer value through an Identity (Silero VAD's decoder):
  canonicalization keeps those Identities instead of crashing;
* a second data input (a recurrent state): refused, both inputs listed;
* an op without a gradient rule: the message says whether fewer layers can avoid it;
* cross_entropy on a one-channel output (always 0): refused, pointing to --loss bce.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gfcompiler.cli import main


def _conv(name: str, x: str, y: str, cin: int, cout: int, seed: int) -> tuple[onnx.NodeProto, onnx.TensorProto]:
    weight = np.random.default_rng(seed).normal(0, 0.3, (cout, cin, 3, 3)).astype(np.float32)
    init = numpy_helper.from_array(weight, f"{name}.weight")
    return helper.make_node("Conv", [x, init.name], [y], name=name, pads=[1, 1, 1, 1]), init


def _save(tmp_path, nodes, inits, inputs, outputs) -> str:
    graph = helper.make_graph(nodes, "obstacle", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return str(path)


def _image(name: str = "x", channels: int = 3):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, channels, 8, 8])


def _compile(capsys, model: str, out, *args: str) -> tuple[int, str]:
    code = main(["compile", model, "-o", str(out), "-q", *args])
    return code, capsys.readouterr().err


def _head(x: str, channels: int) -> tuple[list, list, list]:
    """GlobalAveragePool → Flatten: N×channels logits."""
    nodes = [helper.make_node("GlobalAveragePool", [x], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["logits"])]
    return nodes, [], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, channels])]


def test_if_branches_returning_an_outer_value_compile(tmp_path, capsys):
    """x → If(both branches: Identity(x)) → Conv → Conv → head: the If stays frozen and the model compiles."""
    branch_output = [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, [2, 3, 8, 8])]
    then_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["branch_out"])], "then", [], branch_output)
    else_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["branch_out"])], "else", [], branch_output)
    flag = numpy_helper.from_array(np.array(True), "flag")
    conv1, w1 = _conv("conv1", "chosen", "c1", 3, 4, 0)
    conv2, w2 = _conv("conv2", "c1", "c2", 4, 5, 1)
    head, _, outputs = _head("c2", 5)
    nodes = [helper.make_node("If", ["flag"], ["chosen"], then_branch=then_branch, else_branch=else_branch), conv1, conv2, *head]
    model = _save(tmp_path, nodes, [flag, w1, w2], [_image()], outputs)
    code, err = _compile(capsys, model, tmp_path / "out", "--layers", "2", "--patch", "2")
    assert (code, err) == (0, "")


def test_a_second_data_input_is_refused_naming_both(tmp_path, capsys):
    conv, w = _conv("conv", "x", "c", 3, 4, 0)
    nodes = [conv, helper.make_node("Add", ["c", "state"], ["mixed"])]
    head, _, outputs = _head("mixed", 4)
    state = helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 4, 8, 8])
    model = _save(tmp_path, nodes + head, [w], [_image(), state], outputs)
    code, err = _compile(capsys, model, tmp_path / "out")
    assert code == 3
    assert err.strip() == (
        "gfc: error: the model has 2 data inputs: 'x' (2×3×8×8), 'state' (2×4×8×8); gfcompiler trains models with one "
        "data input (make the others constants or initializers before compiling)"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("conv_after", [False, True], ids=["after-every-conv", "conv-follows"])
def test_an_op_without_gradient_says_whether_fewer_layers_help(tmp_path, capsys, conv_after):
    """LpNormalization has no gradient rule: fewer layers help only when a conv follows it."""
    conv1, w1 = _conv("conv1", "x", "c1", 3, 4, 0)
    nodes, inits = [conv1, helper.make_node("LpNormalization", ["c1"], ["normed"], name="norm", axis=1)], [w1]
    last = "normed"
    if conv_after:
        conv2, w2 = _conv("conv2", "normed", "c2", 4, 4, 1)
        nodes, inits, last = nodes + [conv2], inits + [w2], "c2"
    head, _, outputs = _head(last, 4)
    model = _save(tmp_path, nodes + head, inits, [_image()], outputs)
    code, err = _compile(capsys, model, tmp_path / "out", "--layers", "all")
    assert code == 3
    assert err.startswith("gfc: error: no gradient rule for op LpNormalization (node norm) in the trained region; ")
    if conv_after:
        assert err.strip().endswith("train fewer layers (--layers) so it stays frozen")
    else:
        assert "no --layers choice avoids it" in err
    assert err.count("\n") == 1


def test_cross_entropy_on_one_channel_points_to_bce(tmp_path, capsys):
    conv, w = _conv("conv", "x", "mask", 3, 1, 0)
    output = [helper.make_tensor_value_info("mask", TensorProto.FLOAT, [2, 1, 8, 8])]
    model = _save(tmp_path, [conv], [w], [_image()], output)
    code, err = _compile(capsys, model, tmp_path / "out")
    assert code == 3
    assert "cross_entropy over one class is always 0" in err and "--loss bce" in err
    assert _compile(capsys, model, tmp_path / "bce", "--loss", "bce") == (0, "")
