"""Small compiled models for the runtime tests.

`build_cnn` writes a conv-relu CNN with a global-pool linear head (onnx.helper, He
initialisation, no torch); `compiled` compiles it with gfcompiler's own
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
    """conv3×3-relu × len(channels) (strides 1, 2, 2, ...) -> global average pool -> Gemm."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    initializers, nodes = [], []
    previous, c_in = "input", in_channels
    for i, c_out in enumerate(channels):
        stride = 1 if i == 0 else 2
        weight = rng.standard_normal((c_out, c_in, 3, 3)) * np.sqrt(2.0 / (c_in * 9))
        initializers += [
            numpy_helper.from_array(weight.astype(np.float32), f"conv{i}.weight"),
            numpy_helper.from_array(np.zeros(c_out, np.float32), f"conv{i}.bias"),
        ]
        nodes += [
            helper.make_node("Conv", [previous, f"conv{i}.weight", f"conv{i}.bias"], [f"conv{i}_out"], name=f"conv{i}",
                             kernel_shape=[3, 3], strides=[stride, stride], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"conv{i}_out"], [f"relu{i}"], name=f"relu{i}"),
        ]
        previous, c_in = f"relu{i}", c_out
    head = rng.standard_normal((classes, c_in)) * np.sqrt(1.0 / c_in)
    initializers += [
        numpy_helper.from_array(head.astype(np.float32), "fc.weight"),
        numpy_helper.from_array(np.zeros(classes, np.float32), "fc.bias"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [previous], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, in_channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@functools.lru_cache(maxsize=None)
def compiled(layers: int | str = 2, patch: int = 0, batch: int | str = "N", loss: str = "cross_entropy",
             optimizer: str = "adamw") -> Path:
    """Artifacts of the test CNN, compiled once per session (treat as read-only)."""
    from gfcompiler.artifacts import OptimizerSpec
    from gfcompiler.driver import CompileOptions, compile_model

    name = f"cnn-{layers}-{patch}-{batch}-{loss}-{optimizer}"
    source = build_cnn(_SESSION_DIR / f"{name}.onnx", batch=batch)
    out = _SESSION_DIR / name
    compile_model(source, out, CompileOptions(layers=layers, patch=patch, loss=loss,
                                              optimizer=OptimizerSpec(name=optimizer)))
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
