"""The Flower ServerApp: the strategy's rounds, global evaluation, checkpoints and metrics.

``app`` (``gfcompiler.federated.server_app:app``) reads the federation from
``context.run_config``; `create_server_app` bakes a config in (``gfc federate``).
`run_federation` is the whole server side:

* the initial global model is the compiled one's trained tensors (`Trainer.trainable_parameters`);
* each round, Flower's strategy (gfcompiler.federated.strategies) sends them to the
  clients and aggregates their updates;
* after each round (and before the first) the server loads the global tensors into its
  own `Trainer` and evaluates it on the held-out set (gfcompiler.federated.partition);
* after each round it saves that Trainer as the run directory's checkpoint
  (gfcompiler.runtime.checkpoints.RunDir, atomically), so ``gfc eval`` and ``gfc export``
  read the global model like any trained one, and an interrupted federation leaves the
  last completed round's model; it holds the run directory's writer lock throughout;
* ``metrics.jsonl`` gets one ``round`` record per round: global loss and accuracy, the
  clients' mean training loss, bytes sent and received, clients used, dropped, failed.

The checkpoint's training record counts rounds where ``gfc train`` counts epochs
(``position.epoch`` = rounds done, ``config.epochs`` = rounds) and carries the
federation under ``federated``; ``gfc train --resume`` would continue it as a plain run.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp

from gfcompiler.errors import GfcError, OutputError
from gfcompiler.federated.client_app import to_array_record, to_numpy
from gfcompiler.federated.partition import evaluation_data
from gfcompiler.federated.settings import FederationConfig
from gfcompiler.federated.strategies import GuardedStrategy, RoundTraffic, create_strategy
from gfcompiler.runtime.artifacts import open_artifacts
from gfcompiler.runtime.checkpoints import CheckpointRecord, RunDir
from gfcompiler.runtime.data import Dataset
from gfcompiler.runtime.loop import Position, TrainConfig
from gfcompiler.runtime.progress import MetricsLog, Progress
from gfcompiler.runtime.trainer import Trainer

_POLL_SECONDS = 0.1


class FederationStopped(GfcError):
    """The federation was asked to stop (Ctrl-C) between two polls for replies."""

    exit_code = 130


@dataclasses.dataclass
class FederationResult:
    history: list[dict]  # the ``round`` records, round 0 (the initial model) first
    checkpoint: CheckpointRecord | None  # the last completed round's global model
    interrupted: bool = False


def create_server_app(base: FederationConfig | None = None, progress: Progress | None = None,
                      stop: threading.Event | None = None, results: list | None = None,
                      finished: threading.Event | None = None) -> ServerApp:
    """A ServerApp running `run_federation` on ``base`` overridden by the run config; ``results``
    (when given) receives the FederationResult, ``finished`` is set when the app's main ends."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            config = FederationConfig.from_run_config(context.run_config, base)
            result = run_federation(grid, config, progress or Progress(), stop)
            if results is not None:
                results.append(result)
        finally:
            if finished is not None:
                finished.set()

    return app


def run_federation(grid, config: FederationConfig, progress: Progress,
                   stop: threading.Event | None = None) -> FederationResult:
    """Run ``config.rounds`` rounds on ``grid``; see the module docstring."""
    artifacts = open_artifacts(config.artifacts)
    runs = RunDir(config.run_path, artifacts)
    with runs.writing():
        if runs.has_checkpoint():
            if not config.overwrite:
                raise OutputError(f"{runs.path} already holds a checkpoint: pass --overwrite to start over "
                                  "(or --run-dir elsewhere)")
            runs.clear()
        model = GlobalModel(Trainer(artifacts, "cpu", threads=config.threads or None), evaluation_data(config),
                            runs, config, progress)
        strategy = create_strategy(config, warn=progress.message)
        model.strategy = strategy
        model.metrics.write("start", federation=config.to_run_config(), evaluation=model.evaluation.source,
                            evaluation_samples=len(model.evaluation), parameters=model.parameter_count,
                            tensor_bytes=model.tensor_bytes)
        try:
            strategy.start(grid=StoppableGrid(grid, stop), initial_arrays=to_array_record(model.trainer.trainable_parameters()),
                           num_rounds=config.rounds, timeout=config.round_timeout,
                           train_config=ConfigRecord({"local-epochs": config.local_epochs}), evaluate_fn=model.evaluate)
        except FederationStopped:
            return model.interrupted()
        last = model.history[-1]
        model.metrics.write("end", rounds=last["round"], loss=last["loss"], accuracy=last["accuracy"],
                            bytes_sent=sum(r["bytes_sent"] for r in model.history),
                            bytes_received=sum(r["bytes_received"] for r in model.history),
                            checkpoint=str(model.checkpoint.path) if model.checkpoint else None)
    return FederationResult(model.history, model.checkpoint)


class GlobalModel:
    """The server's Trainer holding the global model: evaluated, saved and reported after each round."""

    def __init__(self, trainer: Trainer, evaluation: Dataset, runs: RunDir, config: FederationConfig, progress: Progress):
        self.trainer, self.evaluation, self.runs, self.config, self.progress = trainer, evaluation, runs, config, progress
        self.metrics = MetricsLog(runs.metrics_path, uuid.uuid4().hex[:12])
        self.strategy: GuardedStrategy | None = None
        self.history: list[dict] = []
        self.checkpoint: CheckpointRecord | None = None
        self._started = time.perf_counter()
        tensors = trainer.trainable_parameters()
        self.parameter_count = sum(int(t.size) for t in tensors.values())
        self.tensor_bytes = to_array_record(tensors).count_bytes()

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Flower's ``evaluate_fn``: load, evaluate, save (rounds >= 1), record, print."""
        self.trainer.load_parameters(to_numpy(arrays))
        scores = self.trainer.evaluate(self.evaluation, batch_size=max(self.config.batch_size, 256))
        traffic = (self.strategy.traffic.get(server_round) if self.strategy else None) or RoundTraffic()
        record = {"round": server_round, "loss": scores["loss"], "accuracy": _score(scores),
                  "train_loss": traffic.train_loss, "bytes_sent": traffic.bytes_sent,
                  "bytes_received": traffic.bytes_received, "clients": traffic.replies - traffic.dropped,
                  "sampled": traffic.sampled, "dropped": traffic.dropped, "failed": len(traffic.failed),
                  "seconds": time.perf_counter() - self._started}
        if server_round > 0:
            self.checkpoint = self.runs.save(self.trainer, self._training_record(server_round))
        self.history.append(record)
        self.metrics.write("round", **record)
        self.progress.message(round_line(record, self.config.rounds))
        if server_round < self.config.rounds:  # the status line until the next round's result replaces it
            self.progress.update(f"round {server_round + 1}/{self.config.rounds}: {self.config.clients} clients "
                                 f"training {self.config.local_epochs} local epoch(s)...", force=True)
        self._started = time.perf_counter()
        return MetricRecord({k: v for k, v in (("loss", record["loss"]), ("accuracy", record["accuracy"])) if v is not None})

    def interrupted(self) -> FederationResult:
        """The result of a federation stopped during round ``len(history)``: its model is not saved."""
        done = self.history[-1]["round"] if self.history else 0
        self.metrics.write("interrupted", round=done + 1, checkpoint=str(self.checkpoint.path) if self.checkpoint else None)
        kept = (f"the global model of round {done} is {self.checkpoint.path}" if self.checkpoint else
                "no round was completed: nothing saved")
        self.progress.message(f"interrupted in round {done + 1}/{self.config.rounds}; {kept}")
        return FederationResult(self.history, self.checkpoint, interrupted=True)

    def _training_record(self, server_round: int) -> dict:
        c = self.config
        return {
            "config": TrainConfig(epochs=c.rounds, batch_size=c.batch_size, lr=c.lr, seed=c.seed).to_dict(),
            "position": Position(epoch=server_round, global_step=server_round).to_dict(),
            "data": {"source": " | ".join(c.data), "evaluation": self.evaluation.source},
            "federated": {"round": server_round, "rounds": c.rounds, "clients": c.clients, "strategy": c.strategy,
                          "local_epochs": c.local_epochs, "alpha": c.alpha},
        }


def _score(scores: dict) -> float | None:
    """Accuracy (classifiers) or mean IoU (segmentation); None for regression losses."""
    return scores.get("accuracy", scores.get("mean_iou"))


def round_line(record: dict, rounds: int) -> str:
    """``round 2/5: global acc 81.4%, loss 0.5521; 5/5 clients (train loss 0.43), sent 1.2 MB, received 1.2 MB, 3.1 s``"""
    parts = [f"round {record['round']}/{rounds}: global"]
    if record["accuracy"] is not None:
        parts.append(f" acc {100 * record['accuracy']:.1f}%,")
    parts.append(f" loss {record['loss']:.4f}")
    if record["round"] == 0:
        return "".join(parts) + " (initial model)"
    parts.append(f"; {record['clients']}/{record['sampled']} clients")
    if record["train_loss"] is not None:
        parts.append(f" (train loss {record['train_loss']:.4f})")
    if record["dropped"] or record["failed"]:
        parts.append(f", {record['dropped']} dropped, {record['failed']} failed")
    parts.append(f", sent {_megabytes(record['bytes_sent'])}, received {_megabytes(record['bytes_received'])}, "
                 f"{record['seconds']:.1f} s")
    return "".join(parts)


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.2f} MB"


class StoppableGrid:
    """``grid`` whose `send_and_receive` gives up (FederationStopped) once ``stop`` is set, so a
    Ctrl-C does not wait for replies that will never come; everything else is ``grid``'s."""

    def __init__(self, grid, stop: threading.Event | None):
        self._grid, self._stop = grid, stop

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        if self._stop is None:
            return list(self._grid.send_and_receive(messages, timeout=timeout))
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.time() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.time() < deadline):
            if self._stop.is_set():
                raise FederationStopped("the federation was stopped")
            received = list(self._grid.pull_messages(pending))
            replies.extend(received)
            pending -= {reply.metadata.reply_to_message_id for reply in received}
            if pending:
                time.sleep(_POLL_SECONDS)
        return replies


app = create_server_app()
