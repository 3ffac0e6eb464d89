"""The corpus: real architectures from both PyTorch exporters, compiled and stepped once.

For each model, ``gfc compile --layers 2 --patch 2`` and ``--layers 4 --patch 4`` either
produce artifacts that load and run one training step with a finite loss, or refuse
with a one-line reason (asserted against the known refusals below, so a new refusal
fails the test instead of hiding). Run as a script for the corpus table:

    python tests/test_corpus.py      # model, source, result, compile seconds
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import models  # noqa: E402
from stages import module_inputs  # noqa: E402

from gfcompiler import ort_training  # noqa: E402
from gfcompiler.driver import CompileOptions, compile_model  # noqa: E402
from gfcompiler.errors import GfcError  # noqa: E402

CONFIGS = ((2, 2), (4, 4))
EXPORTERS = ("legacy", "dynamo")
# (arch, exporter) -> expected refusal fragment. Empty: everything compiles.
KNOWN_REFUSALS: dict[tuple[str, str], str] = {}


def corpus() -> list[tuple[str, str]]:
    return [(arch, exporter) for arch in models.TORCHVISION_ARCHS for exporter in EXPORTERS]


def one_step(directory: Path, manifest: dict) -> float:
    api = ort_training.api()
    state = api.CheckpointState.load_checkpoint(str(directory / "checkpoint"))
    module = api.Module(str(directory / "training_model.onnx"), state, str(directory / "eval_model.onnx"), device="cpu")
    optimizer = api.Optimizer(str(directory / "optimizer_model.onnx"), module)
    shape = [2 if d is None else d for d in manifest["inputs"][0]["shape"]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    y = np.zeros(shape[0], np.int64)
    module.train()
    loss = float(module(*module_inputs(directory, module, x, y))[0])  # outputs: (loss, logits)
    optimizer.step()
    return loss


def one_trainer_step(directory: Path, manifest: dict) -> float:
    from gfcompiler.runtime import Trainer

    shape = [2 if d is None else d for d in manifest["inputs"][0]["shape"]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return Trainer(directory).step(x, np.zeros(shape[0], np.int64))


def compile_and_step(model_path: Path, layers: int, patch: int, workdir: Path,
                     backend: str = "ort-training") -> tuple[str, float]:
    start = time.perf_counter()
    out = workdir / f"out_{backend}_{layers}_{patch}"
    try:
        manifest = compile_model(model_path, out, CompileOptions(layers=layers, patch=patch, backend=backend))
    except GfcError as error:
        return f"refused: {error}", time.perf_counter() - start
    seconds = time.perf_counter() - start
    loss = one_step(out, manifest) if backend == "ort-training" else one_trainer_step(out, manifest)
    assert np.isfinite(loss), loss
    t = manifest["totals"]
    return f"ok: {t['filtered_layers']}/{t['trained_layers']} filtered, loss {loss:.3f}", seconds


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnx", "ort-training"])
@pytest.mark.parametrize("arch, exporter", corpus())
def test_corpus_model(tmp_path, arch, exporter, backend):
    try:
        path = models.torchvision_onnx(arch, exporter=exporter, batch=None, num_classes=10)
    except models.ModelUnavailable as reason:
        pytest.skip(str(reason))
    for layers, patch in CONFIGS:
        result, _ = compile_and_step(path, layers, patch, tmp_path, backend)
        expected = KNOWN_REFUSALS.get((arch, exporter))
        if expected:
            assert result.startswith("refused") and expected in result, result
        else:
            assert result.startswith("ok"), result


def main() -> None:
    backend = sys.argv[1] if len(sys.argv) > 1 else "ort-training"
    print(f"{'model':22} {'exporter':8} {'config':10} {'seconds':>7}  result  (backend {backend})")
    for arch, exporter in corpus():
        try:
            path = models.torchvision_onnx(arch, exporter=exporter, batch=None, num_classes=10)
        except models.ModelUnavailable as reason:
            print(f"{arch:22} {exporter:8} unavailable: {reason}")
            continue
        for layers, patch in CONFIGS:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    result, seconds = compile_and_step(path, layers, patch, Path(tmp), backend)
                except Exception as error:  # report, don't stop the table
                    result, seconds = f"ERROR {type(error).__name__}: {str(error)[:200]}", float("nan")
            print(f"{arch:22} {exporter:8} L{layers} r{patch:<6} {seconds:7.1f}  {result}", flush=True)


if __name__ == "__main__":
    main()
