"""examples/segmentation.py runs as a user would run it, with small arguments.

A torchvision LRASPP exported to ONNX, `gfc compile/train/eval/export` on a mask folder
the example writes from the built-in scenes, and the exported model's class map in a
plain InferenceSession.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "segmentation.py"

pytestmark = pytest.mark.slow


def test_segmentation_example(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    Image = pytest.importorskip("PIL.Image")
    result = subprocess.run([sys.executable, str(EXAMPLE), "--size", "64", "--train", "32", "--test", "8",
                             "--epochs", "1", "--layers", "4", "--work", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"segmentation.py exited {result.returncode}:\n{output[-4000:]}"
    for command in ("$ gfc compile", "$ gfc train", "$ gfc eval", "$ gfc export"):
        assert command in output
    assert "per-pixel cross-entropy over 11 classes" in output  # gfc compile says which loss it chose
    assert "mean IoU" in output  # gfc eval's segmentation metrics
    assert (tmp_path / "finetuned.onnx").is_file()
    # The mask folder it wrote: one class-index PNG per image, same stems, values 0..10 or 255.
    images = sorted(p.name for p in (tmp_path / "scenes-train" / "images").iterdir())
    assert images == sorted(p.name for p in (tmp_path / "scenes-train" / "masks").iterdir())
    assert len(images) == 32
    mask = np.asarray(Image.open(tmp_path / "scenes-train" / "masks" / images[0]))
    assert mask.shape == (64, 64)
    assert set(np.unique(mask)) <= set(range(11)) | {255}
    assert output.count("class map 64x64") == 3  # the exported model's "classes" output, three test images
