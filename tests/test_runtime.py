"""The runtime end to end on real data: train, evaluate, export, through the API and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from runtime_fixtures import compiled, digits_npz, fresh_copy

from gfcompiler.errors import InputError, OutputError
from gfcompiler.runtime import Trainer, load_dataset, open_artifacts, train
from gfcompiler.runtime.cli import main as runtime_main
from gfcompiler.runtime.progress import Progress, read_metrics

quiet = Progress(enabled=False)


def test_training_on_digits_learns(tmp_path):
    """Three epochs on scikit-learn digits: loss falls, held-out accuracy far above chance (10%)."""
    artifacts = fresh_copy(tmp_path)
    result = train(artifacts, "builtin:digits/train", val="builtin:digits/test", epochs=3, lr=2e-2,
                   batch_size=32, schedule="cosine", device="cpu", threads=2, progress=quiet)
    losses = [record["loss"] for record in result.history]
    assert losses[-1] < 0.6 * losses[0]
    assert result.last["val_accuracy"] > 0.6
    # Training accuracy comes from the training model's logits, when the compiler makes them an output.
    assert result.last["accuracy"] is None or result.last["accuracy"] > 0.6
    assert result.position.global_step == 3 * 45  # 1438 samples, batch 32, last partial batch kept

    records = read_metrics(artifacts / "run" / "metrics.jsonl")
    assert [r["event"] for r in records] == ["start", "epoch", "epoch", "epoch", "end"]
    assert len({r["run"] for r in records}) == 1
    assert records[1]["lr"] > records[3]["lr"]  # cosine decay

    trainer = Trainer(artifacts, checkpoint=result.checkpoint.path)
    test = load_dataset("builtin:digits/test", open_artifacts(artifacts))
    assert trainer.evaluate(test)["accuracy"] == pytest.approx(result.last["val_accuracy"])
    initial = Trainer(artifacts).evaluate(test)
    assert initial["accuracy"] < 0.3 and initial["loss"] > result.last["val_loss"]


def test_step_api_and_lr_multiplier(tmp_path):
    """Trainer.step on raw arrays; SGD with momentum gets lr * 1/(1-momentum) from the manifest."""
    artifacts = compiled(optimizer="sgd", backend="ort-training")
    trainer = Trainer(artifacts, device="cpu", lr=0.05)
    assert trainer.lr_multiplier == pytest.approx(10.0)
    x = load_dataset("builtin:digits", trainer.artifacts).x[:64]
    y = load_dataset("builtin:digits", trainer.artifacts).y[:64]
    losses = [trainer.step(x, y) for _ in range(15)]
    assert losses[-1] < losses[0]
    assert trainer.optimizer.get_learning_rate() == pytest.approx(0.5)
    with pytest.raises(InputError, match="does not fit the model input"):
        trainer.step(x[:, :, :8], y)
    with pytest.raises(InputError, match="labels"):
        trainer.step(x, y.astype(np.float32))


def test_gradient_filtered_artifacts_train_and_export(tmp_path):
    artifacts = fresh_copy(tmp_path, layers=2, patch=2)
    assert open_artifacts(artifacts).manifest["patch"] == 2
    result = train(artifacts, "builtin:digits/train", epochs=2, lr=2e-2, device="cpu", progress=quiet)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    trainer = Trainer(artifacts, checkpoint=result.checkpoint.path)
    path = trainer.export(tmp_path / "filtered.onnx")
    _assert_export_matches(trainer, path)


def _assert_export_matches(trainer: Trainer, path):
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}  # no training or contrib ops
    assert [o.name for o in model.graph.output] == ["logits"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    x = load_dataset("builtin:digits/test", trainer.artifacts).x[: trainer.fixed_batch or 50]
    (exported,) = session.run(None, {"input": x})
    np.testing.assert_allclose(exported, trainer.predict(x), rtol=1e-4, atol=1e-5)


def test_export_has_trained_weights_and_is_atomic(tmp_path):
    artifacts = fresh_copy(tmp_path)
    trainer = Trainer(artifacts)
    x = load_dataset("builtin:digits", trainer.artifacts)
    before = trainer.predict(x.x[:8])
    for _ in range(5):
        trainer.step(x.x[:32], x.y[:32], lr=1e-2)
    out = trainer.export(tmp_path / "model.onnx")
    _assert_export_matches(trainer, out)
    assert not np.allclose(trainer.predict(x.x[:8]), before)
    with pytest.raises(OutputError, match="already exists"):
        trainer.export(out)
    trainer.export(out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts", "model.onnx"]  # no temporary left
    with pytest.raises(OutputError, match="does not exist"):
        trainer.export(tmp_path / "missing" / "model.onnx")
    # training goes on after an export
    trainer.step(x.x[:32], x.y[:32])


def test_fixed_batch_model_drops_last_partial_batch_and_pads_eval(tmp_path):
    artifacts = fresh_copy(tmp_path, batch=16)
    data = digits_npz(tmp_path / "d.npz", n=100)  # 100 = 6 × 16 + 4
    messages = []
    progress = Progress(enabled=True)
    progress.message = messages.append  # type: ignore[method-assign]
    result = train(artifacts, data, epochs=1, lr=1e-2, device="cpu", progress=progress)
    assert result.position.global_step == 6
    assert any("last 4 samples" in m for m in messages)
    with pytest.raises(InputError, match="compiled for batch size 16"):
        train(artifacts, data, epochs=1, batch_size=32, overwrite=True, device="cpu", progress=quiet)
    trainer = Trainer(artifacts, checkpoint=result.checkpoint.path)
    dataset = load_dataset(data, trainer.artifacts)
    evaluation = trainer.evaluate(dataset)
    assert evaluation["samples"] == 100
    assert trainer.predict(dataset.x).shape == (100, 10)
    # The padded last batch is scored on its 4 real samples only.
    logits = trainer.predict(dataset.x)
    from gfcompiler.runtime.losses import numpy_loss

    assert evaluation["loss"] == pytest.approx(numpy_loss("cross_entropy", logits, dataset.y), rel=1e-4)
    assert evaluation["accuracy"] == pytest.approx(float((logits.argmax(1) == dataset.y).mean()))
    _assert_export_matches(trainer, trainer.export(tmp_path / "fixed.onnx"))


def test_cli_train_eval_export(tmp_path, capsys):
    artifacts = fresh_copy(tmp_path)
    data = digits_npz(tmp_path / "digits.npz")
    code = runtime_main(["train", str(artifacts), "--data", str(data), "--epochs", "2", "--lr", "0.02",
                         "--device", "cpu", "--threads", "2", "--schedule", "warmup", "--warmup-steps", "10"])
    assert code == 0
    err = capsys.readouterr().err
    assert "device: cpu" in err and "epoch 2/2: loss" in err and "samples/s" in err

    assert runtime_main(["train", str(artifacts), "--data", str(data)]) == OutputError.exit_code
    assert "--resume" in capsys.readouterr().err

    assert runtime_main(["eval", str(artifacts), "--data", "builtin:digits/test", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] > 0.5 and result["samples"] == 359 and "checkpoint" in result["weights"]
    assert runtime_main(["eval", str(artifacts), "--data", "builtin:digits/test", "--initial", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] < result["accuracy"]

    out = tmp_path / "finetuned.onnx"
    assert runtime_main(["export", str(artifacts), "-o", str(out)]) == 0
    assert "verified" in capsys.readouterr().out
    assert runtime_main(["export", str(artifacts), "-o", str(out)]) == OutputError.exit_code
    assert runtime_main(["export", str(artifacts), "-o", str(out), "--force"]) == 0


def test_cli_errors_are_one_line(tmp_path, capsys):
    artifacts = compiled()
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 3, 16, 16), np.float32), y=np.zeros(4, np.int64))
    code = runtime_main(["train", str(artifacts), "--data", str(bad), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == InputError.exit_code
    assert len(err.splitlines()) == 1 and "model expects N×1×16×16" in err
    assert not (tmp_path / "run").exists()  # refused before training started
    code = runtime_main(["train", str(tmp_path / "nowhere"), "--data", "builtin:digits"])
    assert code == 5 and "no compiled artifacts" in capsys.readouterr().err
