"""Small compiled models for the runtime tests.

`build_cnn` writes the demo's conv-relu CNN (global-pool linear head, onnx.helper, no
torch) at test sizes; `compiled` compiles it with gfcompiler's own
`compile_model` once per test session and variant, and `fresh_copy` gives a test its
own copy of the artifact directory (training writes its run directory into it).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="gfc-runtime-tests-"))
atexit.register(shutil.rmtree, _SESSION_DIR, ignore_errors=True)

SIZE = 16
CLASSES = 10


def build_cnn(path: Path, *, size: int = SIZE, channels=(8, 16, 16), classes: int = CLASSES,
              batch: int | str = "N", in_channels: int = 1, seed: int = 0) -> Path:
    """The demo's CNN builder at test sizes: strides 1, 2, 2, ..."""
    from gfcompiler.demo import build_cnn as build

    strides = [1] + [2] * (len(channels) - 1)
    return build(path, channels=channels, strides=strides, input_shape=(in_channels, size, size),
                 classes=classes, batch=batch, seed=seed)


@functools.cache
def compiled(layers: int | str = 2, patch: int = 0, batch: int | str = "N", loss: str = "cross_entropy",
             optimizer: str = "adamw", backend: str | None = None) -> Path:
    """Artifacts of the test CNN, compiled once per session (treat as read-only).

    ``backend`` None: the compiler's default backend; "ort-training" for tests that need those artifacts.
    """
    from gfcompiler.artifacts import OptimizerSpec
    from gfcompiler.driver import CompileOptions, compile_model

    backend_options = {} if backend is None else {"backend": backend}
    name = f"cnn-{layers}-{patch}-{batch}-{loss}-{optimizer}-{backend or 'default'}"
    source = build_cnn(_SESSION_DIR / f"{name}.onnx", batch=batch)
    out = _SESSION_DIR / name
    compile_model(source, out, CompileOptions(layers=layers, patch=patch, loss=loss,
                                              optimizer=OptimizerSpec(name=optimizer), **backend_options))
    return out


def fresh_copy(tmp_path: Path, **variant) -> Path:
    """A private copy of ``compiled(**variant)`` under ``tmp_path``."""
    target = tmp_path / "artifacts"
    shutil.copytree(compiled(**variant), target)
    return target


def digits_npz(path: Path, n: int | None = None, size: int = SIZE) -> Path:
    """scikit-learn digits as model-ready float32 N×1×size×size in [0, 1], saved as .npz."""
    from sklearn.datasets import load_digits

    from gfcompiler.runtime.data import resize_bilinear

    digits = load_digits()
    x = resize_bilinear(digits.images[:, None].astype(np.float32) / 16.0, (size, size))
    y = digits.target.astype(np.int64)
    if n is not None:
        x, y = x[:n], y[:n]
    np.savez(path, x=x.astype(np.float32), y=y)
    return path
