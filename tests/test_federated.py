"""Federated fine-tuning on Flower (gfcompiler.federated): shards, one client round, aggregation, a simulation.

The small CNN of tests/models.py is compiled with ``gfc compile`` (onnx backend first,
ort-training where onnxruntime-training is installed) and trained on builtin:digits. One
test runs the whole federation through ``gfc federate`` (Flower's simulation engine, Ray)
in a subprocess; the others call the apps' parts directly.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the federated extra (flwr) is not installed")
pytest.importorskip("sklearn", reason="builtin:digits needs scikit-learn")

from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from gfcompiler.cli import main as gfc  # noqa: E402
from gfcompiler.errors import InputError, TrainingError  # noqa: E402
from gfcompiler.federated.client_app import reply_content, to_array_record, train_round  # noqa: E402
from gfcompiler.federated.local import client_seed, train_locally  # noqa: E402
from gfcompiler.federated.partition import client_data, dirichlet_partition, evaluation_data  # noqa: E402
from gfcompiler.federated.server_app import run_federation  # noqa: E402
from gfcompiler.federated.settings import FederationConfig  # noqa: E402
from gfcompiler.federated.strategies import GuardedFedAvg  # noqa: E402
from gfcompiler.runtime.checkpoints import RunDir  # noqa: E402
from gfcompiler.runtime.data import load_dataset  # noqa: E402
from gfcompiler.runtime.loop import TrainConfig, fit  # noqa: E402
from gfcompiler.runtime.progress import Progress  # noqa: E402
from gfcompiler.runtime.trainer import Trainer  # noqa: E402

BACKENDS = ["onnx", "ort-training"]


@pytest.fixture(scope="module")
def compiled(small_cnn, tmp_path_factory):
    """Factory: backend -> the small CNN's artifact directory (compiled once per module; read-only)."""
    model = small_cnn("plain", batch=None)
    cache = {}

    def make(backend: str):
        if backend not in cache:
            if backend == "ort-training":
                pytest.importorskip("onnxruntime.training", reason="onnxruntime-training is not installed")
            out = tmp_path_factory.mktemp("federated") / backend
            assert gfc(["compile", str(model), "-o", str(out), "--backend", backend, "-q"]) == 0
            cache[backend] = out
        return cache[backend]

    return make


# ----------------------------------------------------------------------------- partitions


def _label_distance(labels: np.ndarray, shards: list[np.ndarray]) -> float:
    """Mean total-variation distance between each shard's class distribution and the whole set's."""
    classes = np.unique(labels)
    overall = np.array([(labels == c).mean() for c in classes])
    distances = [0.5 * np.abs(np.array([(labels[s] == c).mean() for c in classes]) - overall).sum() for s in shards]
    return float(np.mean(distances))


def test_dirichlet_shards_are_a_seeded_disjoint_cover_skewed_by_alpha():
    labels = np.repeat(np.arange(10), 100)
    shards = dirichlet_partition(labels, 5, 0.1, seed=3)
    joined = np.concatenate(shards)
    assert sorted(joined.tolist()) == list(range(len(labels)))  # disjoint, every sample once
    assert all(len(s) >= 1 for s in shards)
    assert all(np.array_equal(a, b) for a, b in zip(shards, dirichlet_partition(labels, 5, 0.1, seed=3)))
    assert not all(np.array_equal(a, b) for a, b in zip(shards, dirichlet_partition(labels, 5, 0.1, seed=4)))
    # small alpha: each client holds few classes; large alpha: nearly the overall mix
    assert _label_distance(labels, shards) > 0.5
    assert _label_distance(labels, dirichlet_partition(labels, 5, 1000.0, seed=3)) < 0.05
    with pytest.raises(InputError, match="cannot give 11 clients"):
        dirichlet_partition(labels[:10], 11, 1.0, seed=0)


def test_clients_of_a_builtin_set_share_its_train_split_and_the_server_holds_its_test_split(compiled):
    config = FederationConfig(str(compiled("onnx")), ("builtin:digits",), clients=3, alpha=0.3, seed=1)
    shards = [client_data(config, p, 3) for p in range(3)]
    artifacts = Trainer(config.artifacts).artifacts
    train, test = (load_dataset(f"builtin:digits/{split}", artifacts) for split in ("train", "test"))
    assert sum(len(s) for s in shards) == len(train)
    assert np.array_equal(np.sort(np.concatenate([s.y for s in shards])), np.sort(train.y))
    held_out = evaluation_data(config)
    assert np.array_equal(held_out.x, test.x) and np.array_equal(held_out.y, test.y)
    assert min(len(np.unique(s.y)) for s in shards) < 10  # label skew: some client lacks a class


# ----------------------------------------------------------------------------- one client round


def _message(content: RecordDict, node: int = 1, message_type: str = MessageType.TRAIN) -> Message:
    """A message as the grid delivers it (Flower fills the metadata in a real run)."""
    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                        group_id="", created_at=0.0, ttl=60.0, message_type=message_type)
    return Message(content=content, metadata=metadata)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_client_round_equals_plain_training_for_the_same_epochs(compiled, backend):
    artifacts = compiled(backend)
    config = FederationConfig(str(artifacts), ("builtin:digits",), clients=2, local_epochs=2, lr=0.01,
                              batch_size=32, seed=5)
    start = Trainer(artifacts)
    rng = np.random.default_rng(0)
    global_tensors = {k: v + 0.01 * rng.standard_normal(v.shape).astype(v.dtype)
                      for k, v in start.trainable_parameters().items()}
    message = _message(RecordDict({"arrays": to_array_record(global_tensors),
                                   "config": ConfigRecord({"server-round": 1})}))
    update = train_round(config, message, partition=1, partitions=2)

    plain = Trainer(artifacts, lr=0.01)
    plain.load_parameters(global_tensors)
    data = client_data(config, 1, 2)
    result = fit(plain, data, TrainConfig(epochs=2, batch_size=32, lr=0.01, seed=client_seed(5, 1)))
    expected = plain.trainable_parameters()
    assert update.samples == len(data) and update.steps == 2 * -(-len(data) // 32)
    assert set(update.parameters) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(update.parameters[name], value, err_msg=name)  # bitwise: the same steps
    assert any(not np.array_equal(update.parameters[k], global_tensors[k]) for k in global_tensors)  # it trained
    mean_loss = sum(r["loss"] * len(data) for r in result.history) / (2 * len(data))
    assert update.loss == pytest.approx(mean_loss, rel=1e-9)


def test_fedprox_keeps_the_client_closer_to_the_global_model(compiled):
    artifacts = compiled("onnx")
    config = FederationConfig(str(artifacts), ("builtin:digits",), clients=2)
    data = client_data(config, 0, 2)
    start = Trainer(artifacts).trainable_parameters()

    def drift(mu: float) -> float:
        update = train_locally(Trainer(artifacts), data, start, epochs=1, batch_size=32, lr=0.01, seed=0,
                               proximal_mu=mu)
        return sum(float(np.sum((update.parameters[k] - start[k]) ** 2)) for k in start)

    assert drift(5.0) < 0.8 * drift(0.0)


def test_load_parameters_refuses_unknown_names_and_wrong_shapes(compiled):
    trainer = Trainer(compiled("onnx"))
    name, value = next(iter(trainer.trainable_parameters().items()))
    with pytest.raises(InputError, match="not a trained parameter"):
        trainer.load_parameters({"nope": value})
    with pytest.raises(InputError, match=f"parameter '{name}' is"):
        trainer.load_parameters({name: value[..., :1]})
    trainer.load_parameters({name: np.full(value.shape, 0.5, np.float64)})
    loaded = trainer.trainable_parameters()[name]
    assert loaded.dtype == value.dtype and np.all(loaded == 0.5)


# ----------------------------------------------------------------------------- aggregation


def _reply(tensors: dict, samples: int, node: int, loss: float = 0.5) -> Message:
    metrics = MetricRecord({"num-examples": samples, "train-loss": loss, "partition-id": node})
    return _message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in tensors.items()}), "metrics": metrics}),
                    node=node)


def _tensors(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"conv.weight": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
            "head.bias": rng.standard_normal(10).astype(np.float32)}


def test_fedavg_of_known_tensors_is_their_sample_weighted_mean():
    clients = [(_tensors(i), samples) for i, samples in enumerate((10, 30, 60))]
    strategy = GuardedFedAvg(warn=pytest.fail)
    replies = [_reply(t, n, node) for node, (t, n) in enumerate(clients)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    for name in clients[0][0]:
        expected = np.average(np.stack([t[name] for t, _ in clients]), axis=0, weights=[n for _, n in clients])
        np.testing.assert_allclose(arrays[name].numpy(), expected, rtol=0, atol=1e-6)
    traffic = strategy.traffic[1]
    assert traffic.bytes_received == sum(to_array_record(t).count_bytes() for t, _ in clients)
    assert (traffic.replies, traffic.dropped, traffic.train_loss) == (3, 0, pytest.approx(0.5))


def test_a_client_with_nan_or_inf_is_dropped_from_the_aggregate_with_a_warning():
    good = [(_tensors(0), 10), (_tensors(1), 30)]
    poisoned = _tensors(2)
    poisoned["head.bias"][3] = np.nan
    warnings = []
    strategy = GuardedFedAvg(warn=warnings.append)
    replies = [_reply(good[0][0], 10, 0), _reply(poisoned, 1000, 1), _reply(good[1][0], 30, 2),
               _reply(_tensors(3), 1000, 3, loss=float("inf"))]
    arrays, _ = strategy.aggregate_train(4, replies)
    for name in poisoned:
        expected = np.average(np.stack([t[name] for t, _ in good]), axis=0, weights=[10, 30])
        np.testing.assert_allclose(arrays[name].numpy(), expected, rtol=0, atol=1e-6)
    assert strategy.traffic[4].dropped == 2
    assert len(warnings) == 2 and "client 1" in warnings[0] and "'head.bias'" in warnings[0]
    assert "client 3" in warnings[1] and "loss" in warnings[1] and "round 4" in warnings[1]
    with pytest.raises(TrainingError, match="no client returned a usable update"):
        GuardedFedAvg(warn=warnings.append).aggregate_train(5, [_reply(poisoned, 10, 1)])


# ----------------------------------------------------------------------------- the server, without an engine


class InProcessGrid:
    """A Grid stand-in for the ServerApp: each pushed message is trained at once by an in-process client
    (``train_round``, what the ClientApp runs), as Flower's InMemoryGrid would deliver it to a SuperNode."""

    def __init__(self, config: FederationConfig, crashing: int | None = None):
        self.config, self.nodes, self.replies = config, list(range(101, 101 + config.clients)), {}
        self.crashing = crashing  # this partition's ClientApp fails (as a crashed or timed-out node's reply)

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message_id = f"m{len(self.replies)}-{message.metadata.dst_node_id}"
            partition = self.nodes.index(message.metadata.dst_node_id)
            if partition == self.crashing:
                self.replies[message_id] = Message(error=Error(code=1, reason="the ClientApp crashed"), reply_to=message)
            else:
                update = train_round(self.config, message, partition, len(self.nodes))
                self.replies[message_id] = Message(content=reply_content(update, partition), reply_to=message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


@pytest.fixture
def task_identity():
    """Flower's process-wide task identity, which instruction messages read (a real run sets it)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class StopAfter(Progress):
    """Progress that records its lines and sets ``stop`` once the line of round ``after`` is printed."""

    def __init__(self, stop: threading.Event, after: int):
        super().__init__(io.StringIO(), log_every=1e9)
        self.stop, self.after, self.lines = stop, after, []

    def message(self, text: str) -> None:
        self.lines.append(text)
        if text.startswith(f"round {self.after}/"):
            self.stop.set()


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam"])
def test_the_server_saves_each_round_and_a_stop_keeps_the_last_completed_one(compiled, tmp_path, task_identity,
                                                                             strategy):
    artifacts = compiled("onnx")
    config = FederationConfig(str(artifacts), ("builtin:digits",), clients=2, rounds=4, lr=0.01, batch_size=64, strategy=strategy,
                              run_dir=str(tmp_path / "run"), proximal_mu=0.1)
    stop = threading.Event()
    progress = StopAfter(stop, after=2)
    result = run_federation(InProcessGrid(config), config, progress, stop)
    assert result.interrupted and [r["round"] for r in result.history] == [0, 1, 2]
    assert progress.lines[-1] == f"interrupted in round 3/4; the global model of round 2 is {result.checkpoint.path}"
    tensor_bytes = to_array_record(Trainer(artifacts).trainable_parameters()).count_bytes()
    for record in result.history[1:]:  # FedAdam's float64 server step is sent back in the model's float32
        assert record["bytes_sent"] == record["bytes_received"] == 2 * tensor_bytes
    with RunDir(config.run_path, Trainer(artifacts).artifacts).reading() as saved:
        assert saved.training["federated"]["round"] == 2
        trainer = Trainer(artifacts, checkpoint=saved.load_path)
    scores = trainer.evaluate(evaluation_data(config))
    assert scores["accuracy"] == result.history[2]["accuracy"] and scores["loss"] == result.history[2]["loss"]
    events = [json.loads(line)["event"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert events == ["start", "round", "round", "round", "interrupted"]


def test_a_crashed_client_leaves_the_round_to_the_others_and_a_round_without_any_update_fails(compiled, tmp_path,
                                                                                            task_identity):
    config = FederationConfig(str(compiled("onnx")), ("builtin:digits",), clients=3, rounds=1, batch_size=64,
                              run_dir=str(tmp_path / "run"))
    progress = StopAfter(threading.Event(), after=99)
    result = run_federation(InProcessGrid(config, crashing=1), config, progress)
    last = result.history[-1]
    assert (last["round"], last["clients"], last["sampled"], last["failed"]) == (1, 2, 3, 1)
    assert "; 2/3 clients" in progress.lines[-1] and "0 dropped, 1 failed" in progress.lines[-1]
    assert last["bytes_received"] == 2 * last["bytes_sent"] // 3
    lonely = FederationConfig(str(compiled("onnx")), ("builtin:digits",), clients=1, rounds=1,
                              run_dir=str(tmp_path / "lonely"))
    with pytest.raises(TrainingError, match=r"round 1: no client returned a usable update \(1 failed: the ClientApp crashed\)"):
        run_federation(InProcessGrid(lonely, crashing=0), lonely, progress)


# ----------------------------------------------------------------------------- gfc federate


def _gfc(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gfcompiler.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_gfc_federate_improves_the_global_model_and_leaves_a_checkpoint_gfc_eval_reads(compiled, tmp_path):
    artifacts = str(compiled("onnx"))
    run_dir = tmp_path / "run"
    done = _gfc("federate", artifacts, "--data", "builtin:digits", "--clients", "2", "--rounds", "2", "--epochs", "1",
                "--lr", "0.01", "--alpha", "0.5", "--threads", "1", "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "round 2/2: global acc" in done.stderr and "2/2 clients" in done.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["event"] == "start")
    rounds = [r for r in records if r["event"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[2]["accuracy"] > rounds[0]["accuracy"] + 0.05 and rounds[2]["loss"] < rounds[0]["loss"]
    for r in rounds[1:]:  # the global trained tensors to each client, and each client's back
        assert r["bytes_sent"] == r["bytes_received"] == 2 * start["tensor_bytes"]
    assert start["tensor_bytes"] > 4 * start["parameters"]

    evaluated = _gfc("eval", artifacts, "--run-dir", str(run_dir), "--data", "builtin:digits/test", "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    scores = json.loads(evaluated.stdout)
    assert scores["accuracy"] == pytest.approx(rounds[2]["accuracy"], abs=1e-12)
    assert scores["loss"] == pytest.approx(rounds[2]["loss"], rel=1e-6)

    exported = _gfc("export", artifacts, "--run-dir", str(run_dir), "-o", str(tmp_path / "global.onnx"))
    assert exported.returncode == 0 and "checkpoint-00000002-" in exported.stdout, exported.stderr[-2000:]

    again = _gfc("federate", artifacts, "--data", "builtin:digits", "--run-dir", str(run_dir))
    assert again.returncode == 4 and again.stderr.strip().splitlines() == [
        f"gfc: error: {run_dir} already holds a checkpoint: pass --overwrite to start over (or another --run-dir)"]


@pytest.mark.parametrize(("args", "message"), [
    (["--clients", "0"], "--clients must be at least 1"),
    (["--data", "builtin:mnist", "--clients", "3"], "2 --data sources for 3 clients"),
    (["--alpha", "0"], "--alpha must be a positive number"),
    (["--data", "nowhere.npz"], "does not exist"),
])
def test_gfc_federate_refuses_bad_arguments_in_one_line(compiled, capsys, args, message):
    assert gfc(["federate", str(compiled("onnx")), "--data", "builtin:digits", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gfc: error: ") and message in lines[0]
