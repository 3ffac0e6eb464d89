"""One writer per run directory: a second `gfc train` is refused at once with the holder's pid, the
lock dies with its holder (SIGKILL included), and eval / export read the committed checkpoint safely
while training runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from runtime_fixtures import digits_npz, fresh_copy

from gfcompiler.errors import OutputError
from gfcompiler.runtime import RunDir, Trainer, checkpoints, open_artifacts, train
from gfcompiler.runtime.checkpoints import LOCK_NAME, RunLock
from gfcompiler.runtime.cli import main as runtime_main
from gfcompiler.runtime.progress import Progress

quiet = Progress(enabled=False)


def _start_trainer(artifacts, data, *extra) -> subprocess.Popen:
    """`gfc train` in a subprocess, long enough to outlive the test; returns once it holds the lock
    and has committed a first checkpoint."""
    command = [sys.executable, "-m", "gfcompiler.runtime.cli", "train", str(artifacts), "--data", str(data),
               "--epochs", "1000", "--batch-size", "8", "--device", "cpu", "--threads", "1", "--quiet", *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    record = artifacts / "run" / "state.json"
    deadline = time.monotonic() + 90
    while not record.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    return process


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("gfc: error: "), err
    return err


def test_second_writer_refused_and_readers_see_committed_checkpoints(tmp_path, capsys):
    artifacts = fresh_copy(tmp_path)
    data = digits_npz(tmp_path / "d.npz", n=64)
    process = _start_trainer(artifacts, data)
    try:
        for extra in ([], ["--overwrite"], ["--resume"]):
            started = time.monotonic()
            code = runtime_main(["train", str(artifacts), "--data", str(data), "--device", "cpu", "--quiet", *extra])
            assert code == OutputError.exit_code
            assert time.monotonic() - started < 10  # refused at once, not after loading and training
            err = _one_error_line(capsys)
            assert f"pid {process.pid}" in err and "being written by another process" in err
        assert (artifacts / "run" / "state.json").exists()  # --overwrite cleared nothing

        steps, exported = set(), tmp_path / "model.onnx"
        for _ in range(4):  # the trainer saves a checkpoint every 8 steps meanwhile
            assert runtime_main(["eval", str(artifacts), "--data", str(data), "--json", "--device", "cpu"]) == 0
            out = capsys.readouterr().out
            steps.add(json.loads(out)["weights"])
            assert runtime_main(["export", str(artifacts), "-o", str(exported), "--force"]) == 0, capsys.readouterr().err
            assert "verified" in capsys.readouterr().out
        assert len(steps) > 1, steps  # the readers really ran beside a writer that kept saving
        assert process.poll() is None
    finally:
        process.kill()
        process.communicate()


def test_sigkilled_holder_releases_the_lock(tmp_path, capsys):
    artifacts = fresh_copy(tmp_path)
    data = digits_npz(tmp_path / "d.npz", n=64)
    process = _start_trainer(artifacts, data)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    lock = artifacts / "run" / LOCK_NAME
    assert json.loads(lock.read_text())["pid"] == process.pid  # the stale file stays; its lock is gone
    result = train(artifacts, data, resume=True, epochs=_epochs_done(artifacts) + 1, device="cpu", progress=quiet)
    assert not result.interrupted and result.checkpoint is not None
    assert not lock.exists()  # a clean end removes the lock file


def _epochs_done(artifacts) -> int:
    return RunDir(artifacts / "run", open_artifacts(artifacts)).latest().epochs_done


def test_lock_in_one_process_names_its_pid_and_cleans_up(tmp_path):
    artifacts = open_artifacts(fresh_copy(tmp_path))
    run = tmp_path / "new-run"
    first, second = RunDir(run, artifacts), RunDir(run, artifacts)
    with first.writing():
        with first.writing():  # re-entrant for its holder
            pass
        assert first.lock.held and (run / LOCK_NAME).exists()
        with pytest.raises(OutputError, match=f"pid {os.getpid()}"):
            with second.writing():
                pass
        with pytest.raises(OutputError, match="being written"):
            second.clear()
    assert not run.exists()  # the lock created the directory, nothing was saved in it: both gone
    with second.writing():
        pass


def test_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path):
    artifacts = open_artifacts(fresh_copy(tmp_path))
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text('{"pid": 999999999, "started": "2000-01-01T00:00:00Z"}\n')
    with RunDir(run, artifacts).writing():
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert run.is_dir()  # it existed before: kept


def test_without_fcntl_training_runs_unlocked_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoints, "fcntl", None)
    artifacts = fresh_copy(tmp_path)
    train(artifacts, digits_npz(tmp_path / "d.npz", n=16), epochs=1, batch_size=8, device="cpu",
          progress=Progress(enabled=True))
    assert RunLock.UNENFORCED_NOTE in capsys.readouterr().err
    assert not (artifacts / "run" / LOCK_NAME).exists()


def test_reader_follows_a_checkpoint_replaced_while_it_copies(tmp_path, monkeypatch):
    """The writer deletes the checkpoint a reader was about to copy and commits a new one: the reader
    retries on the new record instead of failing."""
    artifacts = fresh_copy(tmp_path)
    data = digits_npz(tmp_path / "d.npz", n=16)
    result = train(artifacts, data, epochs=1, batch_size=8, device="cpu", progress=quiet)
    runs = RunDir(artifacts / "run", open_artifacts(artifacts))
    first = result.checkpoint.path
    replacement = first.with_name("checkpoint-99999999-000000" + first.suffix)
    original_copy = checkpoints._copy_hashed
    calls = []

    def writer_saves_meanwhile(source, target):
        if not calls:  # as a writer would: new checkpoint, new record, old checkpoint deleted
            replacement.write_bytes(first.read_bytes())
            record = json.loads(runs.record_path.read_text())
            record["checkpoint"] = replacement.name
            checkpoints.write_text_atomic(runs.record_path, json.dumps(record))
            first.unlink()
        calls.append(source.name)
        return original_copy(source, target)

    monkeypatch.setattr(checkpoints, "_copy_hashed", writer_saves_meanwhile)
    with runs.reading() as record:
        assert calls == [first.name, replacement.name]
        assert record.path == replacement and record.load_path.read_bytes() == replacement.read_bytes()
        loaded = Trainer(artifacts, checkpoint=record.load_path).parameters()
    expected = Trainer(artifacts, checkpoint=replacement).parameters()
    assert all(np.array_equal(loaded[name], value) for name, value in expected.items())
    assert not record.load_path.exists()  # the private copy is gone after the block
