"""The device-side examples run as users run them: prepare, train, power cut, resume, export.

Runs in the plain-onnxruntime venv too (no torch; without scikit-learn the prepare script
falls back to synthetic data). Each script runs as a subprocess with CI-sized arguments.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")  # prepare_on_workstation.py needs the compiler
ort = pytest.importorskip("onnxruntime")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ON_DEVICE = EXAMPLES / "on_device"


def run(*args, timeout=300) -> str:
    done = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=EXAMPLES.parent)
    assert done.returncode == 0, f"{args[0]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("examples") / "bundle"
    run(ON_DEVICE / "prepare_on_workstation.py", "--out", out, "--pretrain-epochs", "1", "--samples", "160")
    assert {p.name for p in (out / "artifacts").iterdir()} >= {"manifest.json", "step_model.onnx", "initial_state.npz"}
    assert not (out / "work").exists()
    return out


def device_args(bundle: Path, artifacts: Path, *extra) -> list:
    return [ON_DEVICE / "train_on_device.py", artifacts, "--data", bundle / "train.npz", "--test", bundle / "test.npz",
            "--batch-size", "8", "--threads", "1", "--device", "cpu", *extra]


def predictions(model: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_train_on_device_one_epoch(bundle, tmp_path):
    exported = tmp_path / "finetuned.onnx"
    output = run(*device_args(bundle, bundle / "artifacts", "--epochs", "1", "--run-dir", tmp_path / "run",
                              "--export", exported))
    assert "test accuracy after fine-tuning" in output
    assert (tmp_path / "run" / "state.json").exists()
    x = np.load(bundle / "test.npz")["x"]
    assert predictions(exported, x).shape == (len(x), 10)


def test_power_cut_and_resume(bundle, tmp_path):
    artifacts = bundle / "artifacts"
    epochs = ["--epochs", "3"]
    # Uninterrupted reference run.
    reference = tmp_path / "reference.onnx"
    run(*device_args(bundle, artifacts, *epochs, "--run-dir", tmp_path / "ref-run", "--export", reference))

    # The power cut: SIGKILL right after the first epoch's checkpoint is committed (state.json).
    run_dir, resumed = tmp_path / "run", tmp_path / "resumed.onnx"
    args = device_args(bundle, artifacts, *epochs, "--run-dir", run_dir, "--export", resumed, "--step-delay", "0.1")
    process = subprocess.Popen([sys.executable, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "state.json").exists():
            assert process.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    record = json.loads((run_dir / "state.json").read_text())
    assert record["training"]["position"]["epoch"] == 1
    assert not resumed.exists()

    output = run(*device_args(bundle, artifacts, *epochs, "--run-dir", run_dir, "--export", resumed, "--resume"))
    assert "resuming from" in output
    assert "epoch 3/3" in output and "epoch 1/3:" not in output
    # Resumed training equals the uninterrupted run bit for bit.
    x = np.load(bundle / "test.npz")["x"]
    np.testing.assert_array_equal(predictions(resumed, x), predictions(reference, x))


def test_choosing_layers_and_patch(tmp_path):
    output = run(EXAMPLES / "choosing_layers_and_patch.py", "--out", tmp_path, "--layers", "1,2", "--patches", "0,2",
                 "--bench-patches", "2", "--batch", "4", "--repeats", "2", "--memory-runs", "0")
    assert "$ gfc inspect" in output and "$ gfc bench" in output and "How to read this" in output
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plot" in output
    else:
        assert (tmp_path / "bench.png").stat().st_size > 0
