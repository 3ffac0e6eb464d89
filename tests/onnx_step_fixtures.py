"""Hand-made ``--backend onnx`` artifacts for the runtime tests, and a numpy reference.

`build_step_artifacts` writes, with onnx.helper alone (no compiler, no torch), the
artifact directory of a small classifier exactly as gfcompiler.manifest specifies for
``--backend onnx`` (format 3, form "step_model")::

    input N×1×16×16 -> Conv(frozen 4×1×3×3, stride 2, pad 1) -> Relu -> Flatten -> f (N×256)
    logits = f @ fc.weight + fc.bias       (fc.weight 256×10 and fc.bias 10 trained)
    loss = mean cross-entropy(logits, labels)

Its step model holds the hand-written backward of the linear head
(dlogits = (softmax − onehot)/N, dW = fᵀ·dlogits, db = Σ dlogits) and torch.optim's
AdamW or SGD(momentum) update in ONNX ops. `NumpyStep` re-implements that step in numpy
(float64) to check what the runtime does to the parameters. `synthetic_npz` writes a
learnable data set (class-dependent patterns plus noise) without scikit-learn.

Only numpy and onnx are needed, so these tests also run in a venv with plain
onnxruntime and no torch / onnxruntime-training.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

SIZE = 16
CLASSES = 10
FEATURES = 4 * (SIZE // 2) ** 2
LABEL = "labels"
OUTPUT = "logits"
PARAMS = ("fc.weight", "fc.bias")
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8
OPSET = 17


def _slots(optimizer: str, momentum: float) -> tuple[str, ...]:
    if optimizer == "adamw":
        return ("exp_avg", "exp_avg_sq")
    return ("momentum_buffer",) if momentum > 0 else ()


def state_entries(optimizer: str = "adamw", momentum: float = 0.9) -> list[dict]:
    """The manifest's ``step.state``: the parameters, then their optimizer slots."""
    entries = [{"name": p, "updated": f"{p}.updated", "kind": "parameter", "param": p} for p in PARAMS]
    for slot in _slots(optimizer, momentum):
        entries += [{"name": f"{p}.{slot}", "updated": f"{p}.{slot}.updated", "kind": "optimizer", "param": p}
                    for p in PARAMS]
    return entries


def initial_state(optimizer: str = "adamw", momentum: float = 0.9, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    state = {
        "fc.weight": (rng.standard_normal((FEATURES, CLASSES)) * 0.05).astype(np.float32),
        "fc.bias": np.zeros(CLASSES, np.float32),
    }
    for slot in _slots(optimizer, momentum):
        for p in PARAMS:
            state[f"{p}.{slot}"] = np.zeros_like(state[p])
    return state


def conv_weight(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((4, 1, 3, 3)) * 0.5).astype(np.float32)


# ---------------------------------------------------------------------------- ONNX graphs


class _Graph:
    """A tiny node emitter: ``g.op("Add", a, b)`` returns a fresh output name."""

    def __init__(self):
        from onnx import helper

        self.helper = helper
        self.nodes, self.initializers, self._count = [], [], 0

    def op(self, op_type: str, *inputs: str, **attributes) -> str:
        self._count += 1
        out = f"{op_type.lower()}_{self._count}"
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], **attributes))
        return out

    def named(self, op_type: str, out: str, *inputs: str, **attributes) -> str:
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], **attributes))
        return out

    def const(self, value, name: str | None = None) -> str:
        from onnx import numpy_helper

        self._count += 1
        name = name or f"const_{self._count}"
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name


def _forward(g: _Graph, seed: int) -> str:
    """input -> features f (N×FEATURES) -> logits; returns f's name."""
    weight = g.const(conv_weight(seed), "conv.weight")
    conv = g.op("Conv", "input", weight, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    features = g.op("Flatten", g.op("Relu", conv), axis=1)
    g.named("Gemm", OUTPUT, features, "fc.weight", "fc.bias")
    return features


def _loss(g: _Graph) -> tuple[str, str]:
    """Mean cross-entropy of logits against labels; returns (loss, dlogits)."""
    log_p = g.op("LogSoftmax", OUTPUT, axis=1)
    onehot = g.op("OneHot", LABEL, g.const(np.array(CLASSES, np.int64)), g.const(np.array([0.0, 1.0], np.float32)),
                  axis=-1)
    picked = g.op("ReduceSum", g.op("Mul", onehot, log_p), g.const(np.array([1], np.int64)), keepdims=0)
    g.named("Neg", "loss", g.op("ReduceMean", picked, keepdims=0))
    count = g.op("Cast", g.op("Shape", LABEL), to=1)
    dlogits = g.op("Div", g.op("Sub", g.op("Exp", log_p), onehot), count)
    return "loss", dlogits


def _update(g: _Graph, optimizer: str, weight_decay: float, momentum: float, grads: dict) -> None:
    """torch.optim.AdamW or SGD on every parameter, writing ``<name>.updated`` outputs."""
    lr = "learning_rate"
    for p in PARAMS:
        grad = grads[p]
        if optimizer == "adamw":
            decayed = g.op("Sub", p, g.op("Mul", g.op("Mul", lr, g.const(np.float32(weight_decay))), p))
            m = g.named("Add", f"{p}.exp_avg.updated", g.op("Mul", f"{p}.exp_avg", g.const(np.float32(BETA1))),
                        g.op("Mul", grad, g.const(np.float32(1 - BETA1))))
            v = g.named("Add", f"{p}.exp_avg_sq.updated", g.op("Mul", f"{p}.exp_avg_sq", g.const(np.float32(BETA2))),
                        g.op("Mul", g.op("Mul", grad, grad), g.const(np.float32(1 - BETA2))))
            one = g.const(np.float32(1.0))
            bc1 = g.op("Sub", one, g.op("Pow", g.const(np.float32(BETA1)), "step"))
            bc2 = g.op("Sub", one, g.op("Pow", g.const(np.float32(BETA2)), "step"))
            denom = g.op("Add", g.op("Div", g.op("Sqrt", v), g.op("Sqrt", bc2)), g.const(np.float32(EPS)))
            g.named("Sub", f"{p}.updated", decayed, g.op("Mul", g.op("Div", lr, bc1), g.op("Div", m, denom)))
        else:
            if weight_decay:
                grad = g.op("Add", grad, g.op("Mul", p, g.const(np.float32(weight_decay))))
            if momentum > 0:
                grad = g.named("Add", f"{p}.momentum_buffer.updated",
                               g.op("Mul", f"{p}.momentum_buffer", g.const(np.float32(momentum))), grad)
            g.named("Sub", f"{p}.updated", p, g.op("Mul", lr, grad))


def _value(name: str, elem: int, shape) -> object:
    from onnx import helper

    return helper.make_tensor_value_info(name, elem, shape)


def _model(g: _Graph, inputs: list, outputs: list, name: str):
    from onnx import helper

    graph = helper.make_graph(g.nodes, name, inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="gfc-tests")
    model.ir_version = 8
    return model


def _io(batch):
    from onnx import TensorProto

    data = [_value("input", TensorProto.FLOAT, [batch, 1, SIZE, SIZE]), _value(LABEL, TensorProto.INT64, [batch])]
    params = [_value("fc.weight", TensorProto.FLOAT, [FEATURES, CLASSES]), _value("fc.bias", TensorProto.FLOAT, [CLASSES])]
    outputs = [_value("loss", TensorProto.FLOAT, []), _value(OUTPUT, TensorProto.FLOAT, [batch, CLASSES])]
    return data, params, outputs


def step_model(optimizer: str, weight_decay: float, momentum: float, batch, seed: int):
    from onnx import TensorProto

    g = _Graph()
    features = _forward(g, seed)
    _, dlogits = _loss(g)
    grads = {"fc.weight": g.op("Gemm", features, dlogits, transA=1),
             "fc.bias": g.op("ReduceSum", dlogits, g.const(np.array([0], np.int64)), keepdims=0)}
    _update(g, optimizer, weight_decay, momentum, grads)
    data, _, outputs = _io(batch)
    state = initial_state(optimizer, momentum)
    scalars = [_value("learning_rate", TensorProto.FLOAT, []), _value("step", TensorProto.FLOAT, [])]
    state_inputs = [_value(e["name"], TensorProto.FLOAT, list(state[e["name"]].shape)) for e in state_entries(optimizer, momentum)]
    state_outputs = [_value(e["updated"], TensorProto.FLOAT, list(state[e["name"]].shape))
                     for e in state_entries(optimizer, momentum)]
    return _model(g, data + scalars + state_inputs, outputs + state_outputs, "step")


def eval_model(batch, seed: int):
    g = _Graph()
    _forward(g, seed)
    _loss(g)
    data, params, outputs = _io(batch)
    return _model(g, data + params, outputs, "eval")


def export_model(batch, seed: int):
    """The forward with fc.weight / fc.bias referenced but not defined (the runtime adds them)."""
    g = _Graph()
    _forward(g, seed)
    data, _, outputs = _io(batch)
    return _model(g, data[:1], outputs[1:], "export")


# ---------------------------------------------------------------------------- the directory


def build_step_artifacts(directory: Path, *, optimizer: str = "adamw", weight_decay: float | None = None,
                         momentum: float = 0.9, batch: int | str = "N", seed: int = 0) -> Path:
    """An ``--backend onnx`` artifact directory of the test classifier at ``directory``."""
    import onnx

    import gfcompiler

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    decay = weight_decay if weight_decay is not None else (0.01 if optimizer == "adamw" else 0.0)
    files = {"step_model": "step_model.onnx", "eval_model": "eval_model.onnx",
             "export_model": "export_model.onnx", "state": "initial_state.npz"}
    onnx.save(step_model(optimizer, decay, momentum, batch, seed), str(directory / files["step_model"]))
    onnx.save(eval_model(batch, seed), str(directory / files["eval_model"]))
    onnx.save(export_model(batch, seed), str(directory / files["export_model"]))
    np.savez(directory / files["state"], **initial_state(optimizer, momentum, seed))
    dim = batch if isinstance(batch, int) else None
    optimizer_record = {"name": optimizer, "weight_decay": decay, "lr_multiplier": 1.0}
    if optimizer == "sgd":
        optimizer_record["momentum"] = momentum
    manifest = {
        "format": 3,
        "backend": "onnx",
        "gfcompiler_version": gfcompiler.__version__,
        "form": "step_model",
        "files": files,
        "inputs": [{"name": "input", "shape": [dim, 1, SIZE, SIZE], "dtype": "float32"}],
        "outputs": [{"name": OUTPUT, "shape": [dim, CLASSES], "dtype": "float32"}],
        "label": {"name": LABEL, "shape": [dim], "dtype": "int64"},
        "loss": "cross_entropy",
        "optimizer": optimizer_record,
        "patch": 0,
        "trainable_params": list(PARAMS),
        "preprocess": None,
        "step": {"learning_rate": "learning_rate", "step": "step", "loss": "loss", "output": OUTPUT,
                 "state": state_entries(optimizer, momentum)},
        "file_digests": {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in files.values()},
        "layers": [],
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


# ---------------------------------------------------------------------------- numpy reference


class NumpyStep:
    """The test classifier's training step in float64 numpy, for checking the runtime."""

    def __init__(self, optimizer: str = "adamw", weight_decay: float | None = None, momentum: float = 0.9,
                 seed: int = 0):
        self.optimizer, self.momentum = optimizer, momentum
        self.weight_decay = weight_decay if weight_decay is not None else (0.01 if optimizer == "adamw" else 0.0)
        self.conv = conv_weight(seed).astype(np.float64)
        self.state = {k: v.astype(np.float64) for k, v in initial_state(optimizer, momentum, seed).items()}
        self.steps = 0

    def features(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
        out = np.zeros((n, 4, SIZE // 2, SIZE // 2))
        for i in range(3):
            for j in range(3):
                patch = padded[:, 0, i:i + SIZE:2, j:j + SIZE:2]
                out += self.conv[None, :, 0, i, j, None, None] * patch[:, None]
        return np.maximum(out, 0).reshape(n, -1)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.features(x) @ self.state["fc.weight"] + self.state["fc.bias"]

    def step(self, x: np.ndarray, y: np.ndarray, lr: float) -> float:
        f = self.features(x)
        z = f @ self.state["fc.weight"] + self.state["fc.bias"]
        z = z - z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        onehot = np.eye(CLASSES)[y]
        loss = float(-(onehot * log_p).sum(axis=1).mean())
        dlogits = (np.exp(log_p) - onehot) / len(x)
        grads = {"fc.weight": f.T @ dlogits, "fc.bias": dlogits.sum(axis=0)}
        self.steps += 1
        for p, grad in grads.items():
            self._update(p, grad, lr)
        return loss

    def _update(self, p: str, grad: np.ndarray, lr: float) -> None:
        s, t = self.state, self.steps
        if self.optimizer == "adamw":
            s[p] = s[p] - lr * self.weight_decay * s[p]
            s[f"{p}.exp_avg"] = BETA1 * s[f"{p}.exp_avg"] + (1 - BETA1) * grad
            s[f"{p}.exp_avg_sq"] = BETA2 * s[f"{p}.exp_avg_sq"] + (1 - BETA2) * grad * grad
            denom = np.sqrt(s[f"{p}.exp_avg_sq"]) / np.sqrt(1 - BETA2 ** t) + EPS
            s[p] = s[p] - lr / (1 - BETA1 ** t) * s[f"{p}.exp_avg"] / denom
            return
        grad = grad + self.weight_decay * s[p]
        if self.momentum > 0:
            s[f"{p}.momentum_buffer"] = self.momentum * s[f"{p}.momentum_buffer"] + grad
            grad = s[f"{p}.momentum_buffer"]
        s[p] = s[p] - lr * grad


def synthetic_data(n: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A learnable N×1×16×16 data set: one fixed random pattern per class plus noise."""
    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(1234).random((CLASSES, 1, SIZE, SIZE)).astype(np.float32)
    y = rng.integers(0, CLASSES, n).astype(np.int64)
    x = patterns[y] + 0.3 * rng.standard_normal((n, 1, SIZE, SIZE)).astype(np.float32)
    return x.astype(np.float32), y


def synthetic_npz(path: Path, n: int = 256, seed: int = 0) -> Path:
    x, y = synthetic_data(n, seed)
    np.savez(path, x=x, y=y)
    return path


# ---------------------------------------------------------------------------- per-session copies

_SESSION_DIR: Path | None = None


def _session_dir() -> Path:
    global _SESSION_DIR
    if _SESSION_DIR is None:
        import atexit
        import shutil
        import tempfile

        _SESSION_DIR = Path(tempfile.mkdtemp(prefix="gfc-onnx-step-tests-"))
        atexit.register(shutil.rmtree, _SESSION_DIR, ignore_errors=True)
    return _SESSION_DIR


_BUILT: dict = {}


def step_artifacts(**variant) -> Path:
    """``build_step_artifacts(**variant)`` once per test session (treat as read-only)."""
    key = tuple(sorted(variant.items()))
    if key not in _BUILT:
        name = "step-" + "-".join(f"{k}={v}" for k, v in key)
        _BUILT[key] = build_step_artifacts(_session_dir() / name, **variant)
    return _BUILT[key]


def fresh_step_copy(tmp_path: Path, **variant) -> Path:
    """A private copy of ``step_artifacts(**variant)`` under ``tmp_path`` (training writes run/ into it)."""
    import shutil

    target = Path(tmp_path) / "artifacts"
    shutil.copytree(step_artifacts(**variant), target)
    return target


def ort_training_available() -> bool:
    """Whether onnxruntime-training's API imports here (without importing torch)."""
    from gfcompiler.ort_training import TrainingBuildMissing, api

    try:
        api()
    except TrainingBuildMissing:
        return False
    return True


def fake_ort_training_dir(tmp_path: Path) -> Path:
    """A format 2 (ort-training) artifact directory whose files are empty: enough to be refused
    where onnxruntime-training is missing (the manifest is the step fixture's, stripped back)."""
    from gfcompiler.manifest import FILES

    directory = tmp_path / "ort-training"
    directory.mkdir()
    for name in FILES.values():
        (directory / name).write_bytes(b"")
    manifest = json.loads((step_artifacts() / "manifest.json").read_text())
    for key in ("step", "form", "backend", "file_digests"):
        manifest.pop(key)
    (directory / "manifest.json").write_text(json.dumps({**manifest, "format": 2, "files": FILES}))
    return directory
