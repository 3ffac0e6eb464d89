"""The ``--backend onnx`` runtime: one plain ONNX step model on stock onnxruntime.

The artifacts are hand-made (tests/onnx_step_fixtures.py): a frozen conv and a trained
linear head whose backward and AdamW / SGD update are written in ONNX ops, with a numpy
re-implementation of the same step. Needs numpy, onnx and onnxruntime (any build >= 1.20,
or onnxruntime-training's, which also has InferenceSession); no torch, no
onnxruntime-training API, no scikit-learn.
"""

from __future__ import annotations

import json
import signal
import zipfile

import numpy as np
import pytest
from onnx_step_fixtures import (
    CLASSES,
    NumpyStep,
    build_step_artifacts,
    fake_ort_training_dir,
    fresh_step_copy,
    ort_training_available,
    state_entries,
    step_artifacts,
    synthetic_data,
    synthetic_npz,
)

from gfcompiler.errors import ArtifactError, InputError, OutputError, TrainingError
from gfcompiler.runtime import RunDir, Trainer, load_dataset, open_artifacts, train
from gfcompiler.runtime.cli import main as runtime_main
from gfcompiler.runtime.onnx_engine import STEP_KEY, OnnxStepEngine
from gfcompiler.runtime.progress import Progress, read_metrics
from gfcompiler.runtime.protowire import tensor_proto, with_initializers
from gfcompiler.runtime.trainer import NonFiniteLoss

quiet = Progress(enabled=False)
CONFIG = dict(epochs=3, lr=0.02, batch_size=32, schedule="cosine", seed=7, device="cpu", threads=2)
STEPS_PER_EPOCH = 8  # 256 samples in batches of 32


def _close(actual: dict, expected: dict, rtol: float = 1e-4) -> None:
    for name, value in expected.items():
        scale = np.abs(value).max() + 1e-6
        assert np.abs(actual[name] - value).max() <= rtol * scale, name


# ---------------------------------------------------------------------------- steps


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_steps_follow_the_numpy_step(optimizer):
    """Losses fall and the parameters move exactly as the numpy re-implementation of the step says."""
    trainer = Trainer(step_artifacts(optimizer=optimizer), device="cpu", threads=1)
    assert trainer.backend == "onnx" and trainer.lr_multiplier == 1.0 and trainer.prefix is None
    assert isinstance(trainer.engine, OnnxStepEngine)
    reference = NumpyStep(optimizer)
    x, y = synthetic_data(64)
    losses = []
    for step, lr in enumerate([0.05, 0.05, 0.02, 0.03, 0.01, 0.05]):
        result = trainer.train_step(x, y, lr=lr)
        assert result.loss == pytest.approx(reference.step(x, y, lr), rel=1e-5)
        np.testing.assert_allclose(result.outputs.shape, (64, CLASSES))
        losses.append(result.loss)
        assert trainer.engine.steps_taken == step + 1
    assert losses[-1] < 0.9 * losses[0]
    _close(trainer.parameters(), {k: reference.state[k] for k in ("fc.weight", "fc.bias")})
    state = trainer.engine.state_arrays()
    assert set(state) == {e["name"] for e in state_entries(optimizer)}
    _close(state, reference.state)
    np.testing.assert_allclose(trainer.predict(x), reference.logits(x), rtol=1e-4, atol=1e-4)


def test_parameters_are_copies_and_state_stays_as_ortvalues():
    trainer = Trainer(step_artifacts(), device="cpu")
    x, y = synthetic_data(32)
    trainer.step(x, y)
    before = trainer.parameters()
    before["fc.weight"][:] = 0  # a copy: the trainer's state is untouched
    assert np.abs(trainer.parameters()["fc.weight"]).max() > 0
    values = trainer.engine.values
    assert set(values) == {e["name"] for e in state_entries()}
    assert all(type(v).__name__ == "OrtValue" and v.device_name().lower() == "cpu" for v in values.values())
    with pytest.raises(AttributeError):
        trainer.optimizer  # noqa: B018 - an ort-training object; the onnx backend has none


def test_eval_predict_and_evaluate():
    trainer = Trainer(step_artifacts(), device="cpu")
    reference = NumpyStep()
    x, y = synthetic_data(100, seed=3)
    loss, logits = trainer.eval_batch(x, y)
    np.testing.assert_allclose(logits, reference.logits(x), rtol=1e-4, atol=1e-5)
    evaluation = trainer.evaluate((x, y), batch_size=32)
    assert evaluation["samples"] == 100 and set(evaluation) == {"loss", "accuracy", "samples"}
    assert evaluation["accuracy"] == pytest.approx(float((logits.argmax(1) == y).mean()))
    from gfcompiler.runtime.losses import numpy_loss

    assert evaluation["loss"] == pytest.approx(numpy_loss("cross_entropy", logits, y), rel=1e-4)
    assert loss == pytest.approx(numpy_loss("cross_entropy", logits, y), rel=1e-5)
    np.testing.assert_array_equal(trainer.predict(x, batch_size=7), trainer.predict(x))
    with pytest.raises(InputError, match="does not fit the model input"):
        trainer.step(x[:, :, :8], y)
    with pytest.raises(InputError, match="labels"):
        trainer.step(x, y.astype(np.float32))


def test_fixed_batch_pads_eval_and_drops_last_partial_batch(tmp_path):
    artifacts = fresh_step_copy(tmp_path, batch=16)
    data = synthetic_npz(tmp_path / "d.npz", n=100)  # 6 × 16 + 4
    result = train(artifacts, data, epochs=1, lr=0.01, device="cpu", progress=quiet)
    assert result.position.global_step == 6
    trainer = Trainer(artifacts, checkpoint=result.checkpoint.path)
    dataset = load_dataset(data, trainer.artifacts)
    assert trainer.evaluate(dataset)["samples"] == 100
    assert trainer.predict(dataset.x).shape == (100, CLASSES)
    trainer.export(tmp_path / "fixed.onnx")


def test_non_finite_loss_keeps_the_previous_state():
    trainer = Trainer(step_artifacts(), device="cpu")
    # The hand-written step model does not claim in-place safety (no metadata mark): it runs functionally and
    # a NaN/Inf step's new state is dropped (compiled models update in place: tests/test_onnx_inplace.py).
    assert not trainer.engine.in_place_allowed and not trainer.engine.in_place
    reference = NumpyStep()
    x, y = synthetic_data(32)
    trainer.step(x, y, lr=0.05), reference.step(x, y, 0.05)
    before = trainer.engine.state_arrays()
    with pytest.raises(NonFiniteLoss, match="loss became"):
        trainer.step(np.full_like(x, 3e38), y, lr=0.05)
    after = trainer.engine.state_arrays()
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)
    assert trainer.engine.steps_taken == 1 and trainer.steps_taken == 1
    # The next step is step 2 of the uninterrupted sequence (AdamW's bias correction included).
    assert trainer.step(x, y, lr=0.05) == pytest.approx(reference.step(x, y, 0.05), rel=1e-5)
    _close(trainer.engine.state_arrays(), reference.state)


# ---------------------------------------------------------------------------- checkpoints


def test_checkpoint_file_holds_every_state_tensor_and_the_step_count(tmp_path):
    trainer = Trainer(step_artifacts(), device="cpu")
    x, y = synthetic_data(32)
    for _ in range(3):
        trainer.step(x, y, lr=0.02)
    path = tmp_path / "state.npz"
    trainer.save_checkpoint(path)
    with np.load(path, allow_pickle=False) as archive:
        assert set(archive.files) == {e["name"] for e in state_entries()} | {STEP_KEY}
        assert int(archive[STEP_KEY]) == 3
        for name, value in trainer.engine.state_arrays().items():
            np.testing.assert_array_equal(archive[name], value)
    resumed = Trainer(step_artifacts(), device="cpu", checkpoint=path)
    assert resumed.engine.steps_taken == 3 and resumed.checkpoint_path == path
    for _ in range(2):
        assert resumed.step(x, y, lr=0.02) == trainer.step(x, y, lr=0.02)  # bitwise
    for name, value in trainer.engine.state_arrays().items():
        np.testing.assert_array_equal(resumed.engine.state_arrays()[name], value)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    artifacts = fresh_step_copy(tmp)
    data = synthetic_npz(tmp / "d.npz")
    result = train(artifacts, data, progress=quiet, **CONFIG)
    record = RunDir(artifacts / "run", open_artifacts(artifacts)).latest()
    return result, Trainer(artifacts, checkpoint=record.path).engine.state_arrays()


@pytest.mark.parametrize("stop_at", [STEPS_PER_EPOCH + 3, STEPS_PER_EPOCH])  # mid-epoch, at an epoch end
def test_ctrl_c_then_resume_equals_uninterrupted(tmp_path, uninterrupted, stop_at):
    expected_result, expected_state = uninterrupted
    artifacts = fresh_step_copy(tmp_path)
    data = synthetic_npz(tmp_path / "d.npz")

    def press_ctrl_c(position, loss):
        if position.global_step == stop_at:
            signal.raise_signal(signal.SIGINT)

    first = train(artifacts, data, progress=quiet, on_step=press_ctrl_c, **CONFIG)
    assert first.interrupted and first.position.global_step == stop_at
    assert first.checkpoint.path.name.endswith(".npz") and first.checkpoint.path.exists()
    resumed = train(artifacts, data, resume=True, progress=quiet, device="cpu", threads=2)
    assert resumed.position.global_step == expected_result.position.global_step
    assert resumed.last["loss"] == pytest.approx(expected_result.last["loss"], rel=1e-6)
    record = RunDir(artifacts / "run", open_artifacts(artifacts)).latest()
    state = Trainer(artifacts, checkpoint=record.path).engine.state_arrays()
    for name, value in expected_state.items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)  # bitwise, optimizer slots too
    assert len(list((artifacts / "run").glob("checkpoint-*"))) == 1
    assert not list((artifacts / "run").glob(".*tmp"))


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    artifacts = fresh_step_copy(tmp_path)
    dataset = load_dataset(synthetic_npz(tmp_path / "d.npz"), open_artifacts(artifacts))

    def poison(position, loss):
        if position.global_step == STEPS_PER_EPOCH + 2:
            dataset.x[:] = 3e38

    with pytest.raises(TrainingError) as caught:
        train(artifacts, dataset, epochs=3, lr=1e-2, device="cpu", progress=quiet, on_step=poison)
    message = str(caught.value)
    assert "loss became" in message and "last good checkpoint" in message and "\n" not in message
    record = RunDir(artifacts / "run", open_artifacts(artifacts)).latest()
    assert record.epochs_done == 1
    state = Trainer(artifacts, checkpoint=record.path).engine.state_arrays()
    assert all(np.isfinite(v).all() for v in state.values())
    assert read_metrics(artifacts / "run" / "metrics.jsonl")[-1]["event"] == "stopped"


def test_damaged_and_foreign_checkpoints(tmp_path, capsys):
    artifacts = fresh_step_copy(tmp_path)
    data = synthetic_npz(tmp_path / "d.npz", n=64)
    result = train(artifacts, data, epochs=1, device="cpu", progress=quiet)
    checkpoint = result.checkpoint.path
    blob = bytearray(checkpoint.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    checkpoint.write_bytes(bytes(blob))
    assert runtime_main(["eval", str(artifacts), "--data", str(data)]) == ArtifactError.exit_code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sha256" in err
    # Loaded directly, the zip's CRC finds the damage too.
    with pytest.raises(ArtifactError, match="cannot load checkpoint"):
        Trainer(artifacts, checkpoint=checkpoint)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ArtifactError, match="not a gfcompiler state file"):
        Trainer(artifacts, checkpoint=text)
    partial = tmp_path / "partial.npz"
    np.savez(partial, **{"fc.weight": np.zeros((256, CLASSES), np.float32)})
    with pytest.raises(ArtifactError, match="lacks state tensor.*another model"):
        Trainer(artifacts, checkpoint=partial)
    state = dict(np.load(artifacts / "initial_state.npz"))
    state["fc.bias"] = np.zeros(CLASSES + 1, np.float32)
    np.savez(partial, **state)
    with pytest.raises(ArtifactError, match="holds fc.bias as float32 \\[11\\].*another model"):
        Trainer(artifacts, checkpoint=partial)
    other = fresh_step_copy(tmp_path / "other", optimizer="sgd")
    with pytest.raises(ArtifactError, match="other artifacts"):
        RunDir(artifacts / "run", open_artifacts(other)).latest()


# ---------------------------------------------------------------------------- export


def test_export_is_verified_and_equals_eval(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    trainer = Trainer(step_artifacts(), device="cpu")
    x, y = synthetic_data(48)
    for _ in range(4):
        trainer.step(x, y, lr=0.05)
    out = trainer.export(tmp_path / "model.onnx")
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert set(initializers) == {"conv.weight", "fc.weight", "fc.bias"}
    for name, value in trainer.parameters().items():
        np.testing.assert_array_equal(initializers[name], value)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    (exported,) = session.run(None, {"input": x})
    np.testing.assert_allclose(exported, trainer.eval_batch(x, y)[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(OutputError, match="already exists"):
        trainer.export(out)
    trainer.export(out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary left
    trainer.step(x, y)  # training goes on after an export


def test_an_export_that_differs_from_eval_is_refused(tmp_path, monkeypatch):
    trainer = Trainer(step_artifacts(), device="cpu")
    real = trainer.engine.parameters

    monkeypatch.setattr(trainer.engine, "parameters", lambda: {k: v + 1 for k, v in real().items()})
    with pytest.raises(ArtifactError, match="differ from the runtime's eval outputs"):
        trainer.export(tmp_path / "bad.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array(2.5, np.float32),
    np.zeros((0, 3), np.float32),
    np.arange(300, dtype=np.int64) - 150,
    np.arange(6, dtype=np.float64).reshape(2, 3)[:, ::2],  # not contiguous
    np.arange(4, dtype=">f4"),  # big-endian: stored little-endian
    np.array([True, False]),
    np.arange(5, dtype=np.float16),
])
def test_tensor_proto_encoding(array):
    from onnx import TensorProto, numpy_helper

    proto = TensorProto.FromString(tensor_proto("t.w", array))
    assert proto.name == "t.w"
    decoded = numpy_helper.to_array(proto)
    assert decoded.shape == array.shape and decoded.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(decoded, array)


def test_with_initializers_splices_into_a_model(tmp_path):
    """Appending to a model's bytes adds initializers; onnx.load and onnxruntime both see them."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(np.ones(2, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    w = np.arange(6, dtype=np.float32).reshape(3, 2) / 7
    blob = with_initializers(model.SerializeToString(), {"w": w, "extra": np.array([1, 2], np.int64)})
    loaded = onnx.load_from_string(blob)
    assert [t.name for t in loaded.graph.initializer] == ["b", "w", "extra"]
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[1]), w)
    assert [n.op_type for n in loaded.graph.node] == ["Gemm"] and loaded.graph.name == "g"
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((4, 3)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ w + 1, rtol=1e-6)


# ---------------------------------------------------------------------------- CLI and artifacts


def test_train_learns_with_validation(tmp_path):
    artifacts = fresh_step_copy(tmp_path)
    result = train(artifacts, synthetic_npz(tmp_path / "train.npz", n=256),
                   val=synthetic_npz(tmp_path / "val.npz", n=100, seed=1), epochs=3, lr=0.02,
                   device="cpu", progress=quiet)
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < 0.5 * losses[0] and result.last["val_accuracy"] > 0.8
    assert result.last["accuracy"] > 0.8  # from the step model's logits
    events = [r["event"] for r in read_metrics(artifacts / "run" / "metrics.jsonl")]
    assert events == ["start", "epoch", "epoch", "epoch", "end"]


def test_cli_train_eval_export(tmp_path, capsys):
    artifacts = fresh_step_copy(tmp_path)
    data = synthetic_npz(tmp_path / "d.npz")
    code = runtime_main(["train", str(artifacts), "--data", str(data), "--epochs", "2", "--lr", "0.02",
                         "--device", "cpu", "--threads", "1"])
    assert code == 0
    err = capsys.readouterr().err
    assert "device: cpu" in err and "epoch 2/2: loss" in err
    assert runtime_main(["train", str(artifacts), "--data", str(data), "--epochs", "3", "--resume",
                         "--device", "cpu", "--quiet"]) == 0
    assert runtime_main(["train", str(artifacts), "--data", str(data)]) == OutputError.exit_code
    assert "--resume" in capsys.readouterr().err

    assert runtime_main(["eval", str(artifacts), "--data", str(data), "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] > 0.8 and result["samples"] == 256 and "checkpoint" in result["weights"]
    assert runtime_main(["eval", str(artifacts), "--data", str(data), "--initial", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] < result["accuracy"]

    out = tmp_path / "finetuned.onnx"
    assert runtime_main(["export", str(artifacts), "-o", str(out)]) == 0
    assert "verified" in capsys.readouterr().out
    assert runtime_main(["export", str(artifacts), "-o", str(out)]) == OutputError.exit_code
    assert runtime_main(["export", str(artifacts), "-o", str(out), "--force", "--initial"]) == 0


def test_manifest_problems_are_one_line_artifact_errors(tmp_path):
    artifacts = fresh_step_copy(tmp_path)
    manifest = json.loads((artifacts / "manifest.json").read_text())
    a = open_artifacts(artifacts)
    assert a.backend == "onnx" and a.step.output == "logits" and [s.name for s in a.step.parameters] == [
        "fc.weight", "fc.bias"]

    def rewrite(**changes):
        (artifacts / "manifest.json").write_text(json.dumps({**manifest, **changes}))

    rewrite(step=None)
    with pytest.raises(ArtifactError, match="corrupted or incomplete"):
        open_artifacts(artifacts)
    rewrite(backend="tensorflow")
    with pytest.raises(ArtifactError, match="backend 'tensorflow'"):
        open_artifacts(artifacts)
    rewrite(form="two_stage")
    with pytest.raises(ArtifactError, match="form 'two_stage'"):
        open_artifacts(artifacts)
    rewrite(step={**manifest["step"], "state": manifest["step"]["state"] * 2})
    with pytest.raises(ArtifactError, match="listed twice"):
        open_artifacts(artifacts)
    rewrite(step={**manifest["step"], "learning_rate": "lr"})
    with pytest.raises(ArtifactError, match="inputs do not match manifest.json"):
        Trainer(artifacts, device="cpu")
    rewrite(step={**manifest["step"], "loss": "total_loss"})
    with pytest.raises(ArtifactError, match="does not output 'total_loss'"):
        Trainer(artifacts, device="cpu")
    rewrite()
    with open(artifacts / "step_model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="step_model.onnx does not match the sha256"):
        open_artifacts(artifacts)
    (artifacts / "initial_state.npz").unlink()
    with pytest.raises(ArtifactError, match="initial_state.npz is missing"):
        open_artifacts(artifacts)


def test_ort_training_artifacts_without_onnxruntime_training(tmp_path, monkeypatch):
    """Where onnxruntime-training is missing, its artifacts are one line that says what to do."""
    from gfcompiler import ort_training
    from gfcompiler.runtime import ort_engine

    directory = fake_ort_training_dir(tmp_path)
    if ort_training_available():  # pretend it is missing, as on aarch64 or Python 3.13

        def missing():
            raise ort_training.TrainingBuildMissing("onnxruntime-training is not installed")

        monkeypatch.setattr(ort_engine, "training_api", missing)
    with pytest.raises(ArtifactError) as caught:
        Trainer(directory, device="cpu")
    message = str(caught.value)
    assert "need onnxruntime-training" in message and "--backend onnx" in message and "\n" not in message


def test_backend_recorded_per_artifact(tmp_path):
    build_step_artifacts(tmp_path / "sgd", optimizer="sgd", momentum=0.0)
    trainer = Trainer(tmp_path / "sgd", device="cpu")
    assert [e["name"] for e in trainer.artifacts.manifest["step"]["state"]] == ["fc.weight", "fc.bias"]
    x, y = synthetic_data(32)
    reference = NumpyStep("sgd", momentum=0.0)
    assert trainer.step(x, y, lr=0.1) == pytest.approx(reference.step(x, y, 0.1), rel=1e-5)
    _close(trainer.parameters(), {k: reference.state[k] for k in ("fc.weight", "fc.bias")})
    with zipfile.ZipFile(trainer.artifacts.path("state")) as archive:
        assert sorted(archive.namelist()) == ["fc.bias.npy", "fc.weight.npy"]
