"""``--backend onnx`` artifacts train, evaluate and export with plain onnxruntime and numpy alone.

Each check runs in a fresh interpreter that blocks onnx, onnx_ir, networkx, torch and
``onnxruntime.training`` (as on a device with only ``pip install onnxruntime numpy``:
no onnxruntime-training wheel exists for aarch64 or Python 3.13), then trains,
evaluates and exports through the API and the CLI, and checks that ort-training
artifacts are refused with one line that says what to do. With the blocks lifted, the
runtime must still not load those packages.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from onnx_step_fixtures import fake_ort_training_dir, fresh_step_copy, synthetic_npz

BLOCKED = ("onnx", "onnx_ir", "networkx", "torch")

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {blocked!r}
    HEAVY = BLOCKED + ("sklearn", "PIL")
    TRAINING = "onnxruntime.training"

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED or name == TRAINING or name.startswith(TRAINING + "."):
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
            return None

    if {block}:
        sys.meta_path.insert(0, Blocker())
        sys.modules[TRAINING] = None  # "absent" even where the training build is installed
        try:
            import onnx
        except ModuleNotFoundError:
            pass
        else:
            raise AssertionError("the blocker does not work")

    import gfcompiler.runtime.cli
    assert "onnxruntime" not in sys.modules, "registering the CLI commands must not import onnxruntime"

    import numpy as np
    from gfcompiler.errors import ArtifactError
    from gfcompiler.runtime import Trainer, load_dataset, train
    from gfcompiler.runtime.progress import Progress

    artifacts_dir, data, out, ort_training_dir = sys.argv[1:5]
    trainer = Trainer(artifacts_dir, device="auto", threads=1)
    dataset = load_dataset(data, trainer.artifacts)
    losses = [trainer.step(dataset.x[:32], dataset.y[:32], lr=2e-2) for _ in range(5)]
    assert losses[-1] < losses[0], losses
    assert set(trainer.evaluate(dataset)) == {{"loss", "accuracy", "samples"}}
    trainer.export(out + "/api.onnx")

    result = train(artifacts_dir, data, epochs=2, run_dir=out + "/run", device="cpu", progress=Progress(enabled=False))
    assert result.checkpoint is not None and result.checkpoint.path.suffix == ".npz"
    main = gfcompiler.runtime.cli.main
    assert main(["train", artifacts_dir, "--data", data, "--run-dir", out + "/run", "--resume", "--epochs", "3",
                 "--quiet"]) == 0
    assert main(["eval", artifacts_dir, "--data", data, "--run-dir", out + "/run", "--json"]) == 0
    assert main(["export", artifacts_dir, "--run-dir", out + "/run", "-o", out + "/cli.onnx"]) == 0

    if {block}:
        try:
            Trainer(ort_training_dir, device="cpu")
        except ArtifactError as error:
            assert "onnxruntime-training" in str(error) and "--backend onnx" in str(error), error
            print("refused:", error)
        else:
            raise AssertionError("ort-training artifacts opened without onnxruntime-training")

    loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
    assert not loaded, loaded
    training = sorted(m for m in sys.modules if m.startswith(TRAINING + ".") and sys.modules[m] is not None)
    assert not training, training
    print("runtime ok")
    """
)


def _run(tmp_path, block: bool) -> subprocess.CompletedProcess:
    script = SCRIPT.format(blocked=BLOCKED, block=block)
    artifacts = fresh_step_copy(tmp_path)
    data = synthetic_npz(tmp_path / "data.npz", n=128)
    return subprocess.run(
        [sys.executable, "-c", script, str(artifacts), str(data), str(tmp_path), str(fake_ort_training_dir(tmp_path))],
        capture_output=True, text=True, timeout=180,
    )


def test_onnx_backend_needs_only_onnxruntime_and_numpy(tmp_path):
    completed = _run(tmp_path, block=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "runtime ok" in completed.stdout
    refusal = [line for line in completed.stdout.splitlines() if line.startswith("refused:")]
    assert len(refusal) == 1, completed.stdout
    assert (tmp_path / "api.onnx").exists() and (tmp_path / "cli.onnx").exists()


def test_onnx_backend_does_not_load_them_even_when_installed(tmp_path):
    completed = _run(tmp_path, block=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
