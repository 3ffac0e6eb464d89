"""Two-stage artifacts: frozen prefix model + trained suffix, against the single training graph.

The cut must not change the mathematics: one step computes the same loss and the same
gradients in both forms (exact and filtered), training moves the same parameters the
same way, and the exported inference model of a two-stage run equals the single-graph
one. The models are chosen so that several tensors cross the boundary, and so that the
data input itself crosses.
"""

from __future__ import annotations

import json

import models
import numpy as np
import pytest
import torch
import torch.nn as nn
import torchref

from gfcompiler.cli import main as gfc
from gfcompiler.driver import CompileOptions, compile_model
from gfcompiler.runtime import Trainer

BATCH, SIZE = 4, 28


@pytest.fixture(scope="module")
def residual_model(tmp_path_factory):
    """ResNet basic blocks; training the last 2 convs cuts across a projection shortcut."""
    return models.small_cnn_onnx("residual", batch=None, in_channels=1, size=SIZE)


def _batch(seed: int = 0, channels: int = 1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((BATCH, channels, SIZE, SIZE)).astype(np.float32), rng.integers(0, 10, BATCH)


def _compile_both(model, tmp_path, **options):
    options = {"backend": "ort-training", **options}  # two-stage and single-graph are forms of ort-training artifacts
    two = compile_model(model, tmp_path / "two", CompileOptions(**options))
    one = compile_model(model, tmp_path / "one", CompileOptions(single_graph=True, **options))
    return two, one


def test_several_tensors_cross_and_the_manifest_records_them(residual_model, tmp_path):
    two, one = _compile_both(residual_model, tmp_path, layers=2, patch=2)
    assert two["form"] == "two_stage" and one["form"] == "single_graph"
    assert one["single_graph_reason"] == "--single-graph"
    assert len(two["boundary"]) == 2 and not any(b["from_input"] for b in two["boundary"])
    assert all(b["shape"][1:] and None not in b["shape"][1:] for b in two["boundary"])
    assert {"prefix_model", "export_model"} <= set(two["files"]) and "prefix_model" not in one["files"]
    # The trained part, its accounting and its backward are the same in both forms.
    assert two["trainable_params"] == one["trainable_params"]
    assert two["totals"] == one["totals"]


@pytest.mark.parametrize("patch", [0, 2])
def test_same_loss_and_gradients_as_the_single_graph(residual_model, tmp_path, patch):
    _compile_both(residual_model, tmp_path, layers=2, patch=patch)
    x, y = _batch()
    loss_two, grads_two, values_two = torchref.ort_gradients(tmp_path / "two", x, y)
    loss_one, grads_one, values_one = torchref.ort_gradients(tmp_path / "one", x, y)
    assert loss_two == pytest.approx(loss_one, rel=1e-6, abs=1e-6)
    assert set(grads_two) == set(grads_one)
    for name in grads_one:
        np.testing.assert_array_equal(values_two[name], values_one[name])
        scale = np.abs(grads_one[name]).max() + 1e-12
        assert np.abs(grads_two[name] - grads_one[name]).max() / scale < 1e-5, name


def test_training_and_export_equal_the_single_graph(residual_model, tmp_path):
    _compile_both(residual_model, tmp_path, layers=2, patch=2, optimizer=_sgd())
    trainers = {form: Trainer(tmp_path / form, "cpu", lr=0.05) for form in ("two", "one")}
    assert trainers["two"].prefix is not None and trainers["one"].prefix is None
    for step in range(3):
        x, y = _batch(step)
        losses = {form: trainer.step(x, y) for form, trainer in trainers.items()}
        assert losses["two"] == pytest.approx(losses["one"], rel=1e-5)
    params = {form: trainer.parameters() for form, trainer in trainers.items()}
    for name, value in params["one"].items():
        np.testing.assert_allclose(params["two"][name], value, rtol=1e-5, atol=1e-6)
    x, y = _batch(9)
    evaluations = {form: trainer.evaluate((x, y)) for form, trainer in trainers.items()}
    assert evaluations["two"]["loss"] == pytest.approx(evaluations["one"]["loss"], rel=1e-5)
    exported = {form: trainer.export(tmp_path / f"{form}.onnx") for form, trainer in trainers.items()}
    from gfcompiler.ort_training import onnxruntime

    ort = onnxruntime()
    outputs = {form: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
               for form, path in exported.items()}
    np.testing.assert_allclose(outputs["two"], outputs["one"], rtol=1e-5, atol=1e-5)
    # The exported model is the whole network: the frozen prefix's weights are inside it.
    assert np.abs(outputs["two"] - trainers["two"].predict(x)).max() < 1e-4


def test_training_after_an_export_continues_unchanged(residual_model, tmp_path):
    """Export builds a second onnxruntime Module on a copy of the parameters; the training one is untouched."""
    _compile_both(residual_model, tmp_path, layers=2, patch=2)
    a, b = (Trainer(tmp_path / "two", "cpu", lr=0.01) for _ in range(2))
    x, y = _batch()
    a.step(x, y), b.step(x, y)
    a.export(tmp_path / "mid.onnx")
    assert a.step(x, y) == b.step(x, y)
    for name, value in a.parameters().items():
        np.testing.assert_array_equal(value, b.parameters()[name])


class InputSkip(nn.Module):
    """The data input feeds the trained conv's output directly: it crosses the boundary itself."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.trained = nn.Conv2d(8, 3, 3, padding=1)
        self.head = nn.Linear(3, 10)

    def forward(self, x):
        y = self.trained(torch.relu(self.stem(x))) + x
        return self.head(y.mean(dim=(2, 3)))


def test_the_data_input_can_cross(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "skip.onnx"
    torch.onnx.export(InputSkip().eval(), torch.randn(2, 3, SIZE, SIZE), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}})
    two, _ = _compile_both(path, tmp_path, layers=1, patch=2)
    assert [b["from_input"] for b in two["boundary"]].count(True) == 1
    x, y = _batch(channels=3)
    loss_two, grads_two, _ = torchref.ort_gradients(tmp_path / "two", x, y)
    loss_one, grads_one, _ = torchref.ort_gradients(tmp_path / "one", x, y)
    assert loss_two == pytest.approx(loss_one, rel=1e-6)
    for name in grads_one:
        np.testing.assert_allclose(grads_two[name], grads_one[name], rtol=1e-5, atol=1e-7)
    trainer = Trainer(tmp_path / "two", "cpu")
    trainer.step(x, y)
    trainer.export(tmp_path / "skip-trained.onnx")  # verified against the runtime's eval outputs


def test_nothing_frozen_before_the_trained_layers_stays_single_graph(residual_model, tmp_path):
    manifest = compile_model(residual_model, tmp_path / "all", CompileOptions(layers="all", patch=2, backend="ort-training"))
    assert manifest["form"] == "single_graph" and "no frozen prefix" in manifest["single_graph_reason"]
    assert "boundary" not in manifest and "prefix_model" not in manifest["files"]


def test_cli_single_graph_flag_and_inspect(residual_model, tmp_path, capsys):
    common = ["--layers", "2", "--backend", "ort-training", "-q"]
    assert gfc(["compile", str(residual_model), "-o", str(tmp_path / "two"), *common]) == 0
    assert gfc(["compile", str(residual_model), "-o", str(tmp_path / "one"), "--single-graph", *common]) == 0
    assert json.loads((tmp_path / "one" / "manifest.json").read_text())["form"] == "single_graph"
    capsys.readouterr()
    assert gfc(["inspect", str(tmp_path / "two")]) == 0
    out = capsys.readouterr().out
    assert "form: two-stage" in out and "crossing:" in out


def _sgd():
    from gfcompiler.artifacts import OptimizerSpec

    return OptimizerSpec(name="sgd", momentum=0.9)
