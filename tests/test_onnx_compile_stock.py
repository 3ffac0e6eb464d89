"""The whole device path on plain onnxruntime: compile with ``--backend onnx``, train, evaluate, export.

Needs neither torch nor onnxruntime-training (CI runs it in the plain-onnxruntime venv
too): the model is a small CNN written with ``onnx.helper``, the data a fixed random batch.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from gfcompiler.driver import CompileOptions, compile_model
from gfcompiler.runtime import Trainer


def tiny_cnn(path, batch=None) -> None:
    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1], group=8, name="conv3"),
        helper.make_node("Clip", ["c3", "lo", "hi"], ["r3"], name="relu6"),
        helper.make_node("GlobalAveragePool", ["r3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1, name="fc"),
    ]
    inits = [weight("w1", 8, 3, 3, 3), weight("b1", 8), weight("w2", 8, 8, 3, 3), weight("b2", 8),
             weight("w3", 8, 1, 3, 3), weight("b3", 8), weight("fc_w", 4, 8), weight("fc_b", 4),
             numpy_helper.from_array(np.array(0, np.float32), "lo"), numpy_helper.from_array(np.array(6, np.float32), "hi")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch or "N", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch or "N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def train_a_little(artifacts):
    """25 steps on one fixed batch must bring the loss below 0.7 of its start; returns (trainer, x, y, losses)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 3, 16, 16)).astype(np.float32)
    y = rng.integers(0, 4, 8).astype(np.int64)
    trainer = Trainer(artifacts)
    losses = [trainer.step(x, y, lr=1e-2) for _ in range(25)]
    assert losses[-1] < 0.7 * losses[0], losses
    return trainer, x, y, losses


@pytest.mark.parametrize("patch", [0, 2])
def test_compile_train_eval_export_on_plain_onnxruntime(tmp_path, patch):
    tiny_cnn(tmp_path / "tiny.onnx")
    manifest = compile_model(tmp_path / "tiny.onnx", tmp_path / "out",
                             CompileOptions(layers=2, patch=patch, backend="onnx"))
    assert manifest["backend"] == "onnx"
    assert manifest["totals"]["filtered_layers"] == (2 if patch else 0)
    trainer, x, y, losses = train_a_little(tmp_path / "out")
    result = trainer.evaluate((x, y))
    assert result["samples"] == 8 and result["loss"] < losses[0]
    exported = trainer.export(tmp_path / "tuned.onnx")
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    assert np.allclose(session.run(None, {"x": x})[0], trainer.predict(x), rtol=1e-4, atol=1e-5)


def test_cli_compile_train_export_on_plain_onnxruntime(tmp_path):
    tiny_cnn(tmp_path / "tiny.onnx")
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((32, 3, 16, 16)).astype(np.float32),
             y=rng.integers(0, 4, 32).astype(np.int64))
    gfc = [sys.executable, "-m", "gfcompiler.cli"]
    for command in (["compile", str(tmp_path / "tiny.onnx"), "--backend", "onnx", "--layers", "2", "-o", str(tmp_path / "out"), "-q"],
                    ["train", str(tmp_path / "out"), "--data", str(tmp_path / "data.npz"), "--epochs", "2", "--batch-size", "8"],
                    ["eval", str(tmp_path / "out"), "--data", str(tmp_path / "data.npz")],
                    ["export", str(tmp_path / "out"), "-o", str(tmp_path / "tuned.onnx")]):
        done = subprocess.run(gfc + command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (command[0], done.stderr[-2000:])
    assert (tmp_path / "tuned.onnx").is_file()


def test_conv_head_logits_train_per_class(tmp_path):
    """A model whose logits are N×C×1×1 (a 1×1 conv head, as SqueezeNet) trains with cross-entropy over C."""
    import onnx as onnx_module

    tiny_cnn(tmp_path / "tiny.onnx")
    model = onnx_module.load(str(tmp_path / "tiny.onnx"))
    graph = model.graph
    fc = next(n for n in graph.node if n.name == "fc")
    flatten = next(n for n in graph.node if n.name == "flatten")
    graph.node.remove(fc)
    graph.node.remove(flatten)
    graph.node.append(helper.make_node("Conv", ["gap", "head_w", "fc_b"], ["logits"], name="head"))
    w = next(t for t in graph.initializer if t.name == "fc_w")
    graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(w).reshape(4, 8, 1, 1), "head_w"))
    graph.initializer.remove(w)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4, 1, 1]))
    onnx_module.save(model, str(tmp_path / "convhead.onnx"))
    compile_model(tmp_path / "convhead.onnx", tmp_path / "out", CompileOptions(layers=2, patch=2, backend="onnx"))
    trainer, x, y, losses = train_a_little(tmp_path / "out")
    assert 0 <= trainer.evaluate((x, y))["accuracy"] <= 1
    trainer.export(tmp_path / "tuned.onnx")
