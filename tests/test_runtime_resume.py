"""Checkpoints: Ctrl-C and resume equal an uninterrupted run; NaN stops cleanly; damage is detected."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
from runtime_fixtures import compiled, digits_npz, fresh_copy

from gfcompiler.errors import ArtifactError, InputError, TrainingError
from gfcompiler.runtime import RunDir, Trainer, load_dataset, open_artifacts, train
from gfcompiler.runtime.cli import main as runtime_main
from gfcompiler.runtime.progress import Progress, read_metrics

quiet = Progress(enabled=False)
CONFIG = dict(epochs=3, lr=2e-2, batch_size=32, schedule="cosine", seed=7, device="cpu", threads=2)
STEPS_PER_EPOCH = 45  # 1438 training digits in batches of 32


def _final_parameters(artifacts, run_dir):
    record = RunDir(run_dir, open_artifacts(artifacts)).latest()
    return Trainer(artifacts, checkpoint=record.path).parameters()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    artifacts = fresh_copy(tmp)
    result = train(artifacts, "builtin:digits/train", progress=quiet, **CONFIG)
    return result, _final_parameters(artifacts, artifacts / "run")


@pytest.mark.parametrize("stop_at", [STEPS_PER_EPOCH + 5, STEPS_PER_EPOCH])  # mid-epoch, at an epoch end
def test_ctrl_c_then_resume_equals_uninterrupted(tmp_path, uninterrupted, stop_at):
    expected_result, expected_parameters = uninterrupted
    artifacts = fresh_copy(tmp_path)

    def press_ctrl_c(position, loss):
        if position.global_step == stop_at:
            signal.raise_signal(signal.SIGINT)

    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in the background (nohup, &)
    first = train(artifacts, "builtin:digits/train", progress=quiet, on_step=press_ctrl_c, **CONFIG)
    assert first.interrupted and first.position.global_step == stop_at
    assert first.checkpoint is not None and first.checkpoint.path.exists()
    assert signal.getsignal(signal.SIGINT) is handler_before  # handler restored

    resumed = train(artifacts, "builtin:digits/train", resume=True, progress=quiet, device="cpu", threads=2)
    assert not resumed.interrupted
    assert resumed.position.global_step == expected_result.position.global_step
    assert resumed.last["loss"] == pytest.approx(expected_result.last["loss"], rel=1e-6)
    parameters = _final_parameters(artifacts, artifacts / "run")
    for name, value in expected_parameters.items():
        np.testing.assert_array_equal(parameters[name], value, err_msg=name)  # bitwise
    events = [r["event"] for r in read_metrics(artifacts / "run" / "metrics.jsonl")]
    assert "interrupted" in events and events[-1] == "end"
    assert len(list((artifacts / "run").glob("checkpoint-*"))) == 1  # old checkpoints removed


def test_resume_rules(tmp_path, capsys):
    artifacts = fresh_copy(tmp_path)
    with pytest.raises(InputError, match="holds no checkpoint"):
        train(artifacts, "builtin:digits/train", resume=True, progress=quiet)
    data = digits_npz(tmp_path / "d.npz", n=200)
    train(artifacts, data, epochs=1, device="cpu", progress=quiet)
    with pytest.raises(InputError, match="completed 1 of 1 epochs"):
        train(artifacts, data, resume=True, device="cpu", progress=quiet)
    longer = train(artifacts, data, resume=True, epochs=2, device="cpu", progress=quiet)
    assert [r["epoch"] for r in longer.history] == [2]
    # --overwrite starts over, but only once the new run is known to be valid
    with pytest.raises(InputError):
        train(artifacts, data, overwrite=True, batch_size=0, progress=quiet)
    assert RunDir(artifacts / "run", open_artifacts(artifacts)).latest().epochs_done == 2
    fresh = train(artifacts, data, overwrite=True, epochs=1, device="cpu", progress=quiet)
    assert fresh.position.global_step == 7


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    artifacts = fresh_copy(tmp_path)
    dataset = load_dataset("builtin:digits/train", open_artifacts(artifacts))

    def poison(position, loss):
        if position.global_step == STEPS_PER_EPOCH + 2:  # in epoch 2, after epoch 1 was saved
            dataset.x[:] = 3e38

    with pytest.raises(TrainingError) as caught:
        train(artifacts, dataset, epochs=3, lr=1e-2, device="cpu", progress=quiet, on_step=poison)
    message = str(caught.value)
    assert "loss became" in message and "epoch 2, step 48" in message
    assert "last good checkpoint" in message and "\n" not in message
    record = RunDir(artifacts / "run", open_artifacts(artifacts)).latest()
    assert record.epochs_done == 1
    parameters = Trainer(artifacts, checkpoint=record.path).parameters()
    assert all(np.isfinite(v).all() for v in parameters.values())
    assert read_metrics(artifacts / "run" / "metrics.jsonl")[-1]["event"] == "stopped"


def test_damaged_checkpoint_and_record(tmp_path, capsys):
    artifacts = fresh_copy(tmp_path, backend="ort-training")  # the last check: onnxruntime-training's checkpoint format
    data = digits_npz(tmp_path / "d.npz", n=64)
    result = train(artifacts, data, epochs=1, device="cpu", progress=quiet)
    checkpoint = result.checkpoint.path
    blob = bytearray(checkpoint.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # onnxruntime itself loads this without complaint
    checkpoint.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="corrupted"):
        RunDir(artifacts / "run", open_artifacts(artifacts)).latest()
    assert runtime_main(["eval", str(artifacts), "--data", str(data)]) == ArtifactError.exit_code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sha256" in err

    (artifacts / "run" / "state.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="state.json is corrupted"):
        RunDir(artifacts / "run", open_artifacts(artifacts)).latest()

    with pytest.raises(ArtifactError, match="not an onnxruntime checkpoint"):
        Trainer(artifacts, checkpoint=data)


def test_checkpoint_of_other_artifacts_is_refused(tmp_path):
    first = fresh_copy(tmp_path / "a")
    train(first, digits_npz(tmp_path / "d.npz", n=64), epochs=1, device="cpu", progress=quiet)
    other = compiled(layers=2, patch=2)
    with pytest.raises(ArtifactError, match="other artifacts"):
        RunDir(first / "run", open_artifacts(other)).latest()


def test_edited_missing_and_foreign_artifacts(tmp_path):
    artifacts = fresh_copy(tmp_path, backend="ort-training")
    manifest = json.loads((artifacts / "manifest.json").read_text())

    with open(artifacts / "eval_model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="eval_model.onnx does not match the sha256"):
        open_artifacts(artifacts)
    assert open_artifacts(artifacts, verify=False).loss == "cross_entropy"

    (artifacts / "checkpoint").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="cannot load checkpoint"):
        Trainer(open_artifacts(artifacts, verify=False))

    (artifacts / "optimizer_model.onnx").unlink()
    with pytest.raises(ArtifactError, match="optimizer_model.onnx is missing"):
        open_artifacts(artifacts)

    (artifacts / "manifest.json").write_text(json.dumps({**manifest, "format": 99}))
    with pytest.raises(ArtifactError, match="format 99"):
        open_artifacts(artifacts)
    (artifacts / "manifest.json").write_text("{")
    with pytest.raises(ArtifactError, match="corrupted"):
        open_artifacts(artifacts)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        open_artifacts(tmp_path)


def test_real_ctrl_c_on_the_cli_saves_and_exits_130(tmp_path):
    import subprocess
    import sys
    import time

    artifacts = fresh_copy(tmp_path)
    data = digits_npz(tmp_path / "d.npz", n=256)
    command = [sys.executable, "-m", "gfcompiler.runtime.cli", "train", str(artifacts), "--data", str(data),
               "--epochs", "200", "--batch-size", "8", "--device", "cpu", "--threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = artifacts / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.exists() and '"event": "epoch"' in metrics.read_text()):  # training has started
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "checkpoint saved" in err and "--resume" in err
    record = RunDir(artifacts / "run", open_artifacts(artifacts)).latest()
    assert 0 < record.training["position"]["global_step"] < 200 * 32
    events = [r["event"] for r in read_metrics(metrics)]
    assert events[-1] == "interrupted"
