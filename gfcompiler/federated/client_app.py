"""The Flower ClientApp: a `Trainer` on the compiled artifacts and this node's data.

``app`` (``gfcompiler.federated.client_app:app``) reads everything from Flower's
Context: the federation from ``context.run_config`` (gfcompiler.federated.settings) and
which data this node holds from ``context.node_config``: ``partition-id`` and
``num-partitions`` (set by the simulation engine, or ``flower-supernode --node-config``)
pick its Dirichlet shard or its own ``--data`` source, and an optional ``data`` entry
names a source the node uses whole. `create_client_app` bakes a config in (``gfc
federate``: the simulation passes no run config); run-config entries still override it.

A training message carries the global trained tensors (ArrayRecord ``arrays``, one
entry per trainable parameter by its name) and the round (``config`` ``server-round``,
and ``proximal-mu`` under FedProx); the reply carries the tensors after E local epochs
(gfcompiler.federated.local) and a MetricRecord with the sample count (FedAvg's
weight), the mean training loss and the client's partition.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from gfcompiler.federated.local import LocalUpdate, client_seed, train_locally
from gfcompiler.federated.partition import client_data, shared_artifacts
from gfcompiler.federated.settings import FederationConfig
from gfcompiler.federated.strategies import LOSS_KEY, PARTITION_KEY, WEIGHT_KEY
from gfcompiler.runtime.trainer import Trainer

ARRAYS_KEY = "arrays"  # Flower strategies' default arrayrecord_key
CONFIG_KEY = "config"  # and configrecord_key


def create_client_app(base: FederationConfig | None = None) -> ClientApp:
    """A ClientApp whose federation is ``base`` overridden by the run config (``base`` None: the run config alone)."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        config = FederationConfig.from_run_config(context.run_config, base)
        partition = int(context.node_config.get("partition-id", 0))
        update = train_round(config, message, partition, int(context.node_config.get("num-partitions", config.clients)),
                             str(context.node_config.get("data", "")) or None)
        return Message(content=reply_content(update, partition), reply_to=message)

    return app


def train_round(config: FederationConfig, message: Message, partition: int, partitions: int,
                own_source: str | None = None) -> LocalUpdate:
    """This client's update for the round ``message`` asks for."""
    round_config = message.content[CONFIG_KEY]
    server_round = int(round_config["server-round"])
    trainer = Trainer(shared_artifacts(config.artifacts), "cpu", threads=config.threads or None, lr=config.lr)
    return train_locally(
        trainer, client_data(config, partition, partitions, own_source), to_numpy(message.content[ARRAYS_KEY]),
        epochs=config.local_epochs, batch_size=config.batch_size, lr=config.lr,
        seed=client_seed(config.seed, partition), first_epoch=(server_round - 1) * config.local_epochs,
        proximal_mu=float(round_config.get("proximal-mu", 0.0)),
    )


def reply_content(update: LocalUpdate, partition: int) -> RecordDict:
    metrics = MetricRecord({WEIGHT_KEY: update.samples, LOSS_KEY: float(update.loss), PARTITION_KEY: partition,
                            "steps": update.steps, "seconds": float(update.seconds)})
    return RecordDict({ARRAYS_KEY: to_array_record(update.parameters), "metrics": metrics})


def to_array_record(parameters: dict[str, np.ndarray]) -> ArrayRecord:
    """Named tensors as Flower's ArrayRecord (names kept, so the server loads them by name)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in parameters.items()})


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


app = create_client_app()
