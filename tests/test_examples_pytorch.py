"""The examples users copy from run: examples/pytorch_to_finetuned.py and examples/python_api.py.

Each runs as a user would run it (a subprocess, in the repository root) with small
arguments, and must exit 0 and leave its exported model behind.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _run(script: str, *args, timeout: int = 120) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{script} exited {result.returncode}:\n{output[-4000:]}"
    return output


def test_pytorch_to_finetuned(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("skimage")
    pytest.importorskip("PIL")
    output = _run("pytorch_to_finetuned.py", "--size", 64, "--per-class", 4, "--epochs", 1, "--layers", 2,
                  "--work", tmp_path)
    for command in ("$ gfc compile", "$ gfc train", "$ gfc eval", "$ gfc export"):
        assert command in output
    assert (tmp_path / "mobilenet_v2.onnx").is_file()
    assert (tmp_path / "artifacts" / "manifest.json").is_file()
    assert (tmp_path / "finetuned.onnx").is_file()
    assert output.count(": predicted ") == 4  # one prediction per photo class


def test_python_api(tmp_path):
    pytest.importorskip("sklearn")
    output = _run("python_api.py", "--epochs", 1, "--train-samples", 200, "--work", tmp_path)
    assert (tmp_path / "artifacts" / "manifest.json").is_file()
    assert (tmp_path / "state.npz").is_file()
    assert (tmp_path / "finetuned.onnx").is_file()
    assert "InferenceSession predictions:" in output
