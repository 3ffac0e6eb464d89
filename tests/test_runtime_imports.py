"""gfcompiler.runtime runs ort-training artifacts with only onnxruntime-training, numpy and the standard library.

Each check runs in a fresh interpreter. The first blocks onnx, onnx_ir, networkx and
torch with a meta-path finder (as if they were not installed) and trains, evaluates and
exports through both the API and the CLI. The second leaves them importable and checks
that the runtime still does not load them (onnxruntime's own import would pull in torch
and onnx; gfcompiler.ort_training avoids that).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from onnx_step_fixtures import ort_training_available
from runtime_fixtures import compiled, digits_npz

if not ort_training_available():  # plain onnxruntime: tests/test_onnx_runtime_imports.py covers it
    pytest.skip("ort-training artifacts need onnxruntime-training", allow_module_level=True)

BLOCKED = ("onnx", "onnx_ir", "networkx", "torch")

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {blocked!r}
    HEAVY = BLOCKED + ("sklearn", "PIL")

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
            return None

    if {block}:
        sys.meta_path.insert(0, Blocker())
        try:
            import onnx
        except ModuleNotFoundError:
            pass
        else:
            raise AssertionError("the blocker does not work")

    import gfcompiler.runtime.cli
    assert "onnxruntime" not in sys.modules, "registering the CLI commands must not import onnxruntime"

    from gfcompiler.runtime import Trainer, load_dataset, open_artifacts, train
    from gfcompiler.runtime.progress import Progress

    artifacts_dir, data, out = sys.argv[1], sys.argv[2], sys.argv[3]
    trainer = Trainer(artifacts_dir, device="auto", threads=1)
    dataset = load_dataset(data, trainer.artifacts)
    losses = [trainer.step(dataset.x[:32], dataset.y[:32], lr=1e-2) for _ in range(5)]
    assert losses[-1] < losses[0], losses
    assert set(trainer.evaluate(dataset)) == {{"loss", "accuracy", "samples"}}
    trainer.export(out + "/api.onnx")

    result = train(artifacts_dir, data, epochs=1, run_dir=out + "/run", device="cpu", progress=Progress(enabled=False))
    assert result.checkpoint is not None
    code = gfcompiler.runtime.cli.main(["export", artifacts_dir, "--run-dir", out + "/run", "-o", out + "/cli.onnx"])
    assert code == 0, code

    loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
    assert not loaded, loaded
    print("runtime ok")
    """
)


def _run(tmp_path, block: bool) -> subprocess.CompletedProcess:
    script = SCRIPT.format(blocked=BLOCKED, block=block)
    data = digits_npz(tmp_path / "digits.npz", n=200)
    return subprocess.run(
        [sys.executable, "-c", script, str(compiled(backend="ort-training")), str(data), str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )


def test_runtime_works_without_onnx_onnx_ir_networkx_torch(tmp_path):
    completed = _run(tmp_path, block=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "runtime ok" in completed.stdout
    assert (tmp_path / "api.onnx").exists() and (tmp_path / "cli.onnx").exists()


def test_runtime_does_not_load_them_even_when_installed(tmp_path):
    completed = _run(tmp_path, block=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
