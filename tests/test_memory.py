"""The memory analysis, and the forward-pooling fix, checked against onnxruntime's real peak memory.

A conv whose input is a large frozen activation (no ReLU between, so nothing else
keeps that input alive) is trained alone. The analysis predicts what the exact
ConvGrad holds (X) and what the filtered backward holds (X_sum); without the forward
dependency the pooling runs lazily and X is held again. Each variant's peak RSS is
measured in its own subprocess with the memory arena disabled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from gfcompiler.driver import CompileOptions, compile_model
from gfcompiler.runtime.peak_memory import MEASURE_ENV

BATCH, CHANNELS, SIZE = 16, 8, 128
PROBE = Path(__file__).with_name("peak_memory_probe.py")


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("memory")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(CHANNELS, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()
    torch.onnx.export(model, torch.randn(1, CHANNELS, SIZE, SIZE), str(tmp / "m.onnx"), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}})
    manifests = {}
    for name, patch, pooling in (("exact", 0, True), ("filtered", 4, True), ("lazy_pooling", 4, False)):
        # One training graph: the probe measures what that graph keeps alive, with X made inside it
        # (two-stage artifacts would get X from the prefix; tests/test_two_stage.py covers their accounting).
        options = CompileOptions(layers=1, patch=patch, force_forward_pooling=pooling, single_graph=True,
                                 backend="ort-training")
        manifests[name] = (tmp / name, compile_model(tmp / "m.onnx", tmp / name, options))
    return manifests


def peak_kib(directory: Path) -> int:
    result = subprocess.run([sys.executable, str(PROBE), str(directory), str(BATCH), str(CHANNELS), str(SIZE)],
                            capture_output=True, text=True, check=True, env={**os.environ, **MEASURE_ENV})
    baseline, peak = (int(v) for v in result.stdout.split())
    return peak - baseline


def test_analysis_predicts_the_saving_and_the_lazy_pooling_trap(variants):
    exact, filtered, lazy = (variants[n][1]["totals"]["held_bytes"] for n in ("exact", "filtered", "lazy_pooling"))
    x_bytes = 32 * SIZE * SIZE * 4  # the trained conv's input, per sample
    x_sum_bytes = x_bytes // 16  # r = 4, stride 1
    assert exact - filtered == x_bytes - x_sum_bytes
    assert lazy == exact  # the pooling runs in the backward: X is held after all
    layer = variants["filtered"][1]["layers"][-1]
    assert layer["held_bytes_exact"] == x_bytes and layer["held_bytes"] == x_sum_bytes
    assert layer["held_tensors"] == [f"{layer['name']}/gf/X_sum"]


@pytest.mark.slow
def test_measured_peak_memory_follows_the_analysis(variants):
    predicted_saving_kib = (variants["exact"][1]["totals"]["held_bytes"] - variants["filtered"][1]["totals"]["held_bytes"]) * BATCH / 1024
    measured = {name: peak_kib(directory) for name, (directory, _) in variants.items()}
    # Filtering with the forward dependency saves at least ~the predicted held bytes...
    assert measured["exact"] - measured["filtered"] >= 0.8 * predicted_saving_kib, (measured, predicted_saving_kib)
    # ...and without it most of that saving is lost, as the analysis predicts.
    assert measured["lazy_pooling"] - measured["filtered"] >= 0.7 * predicted_saving_kib, (measured, predicted_saving_kib)
    print(json.dumps({"peak_kib": measured, "predicted_saving_kib": predicted_saving_kib}))
