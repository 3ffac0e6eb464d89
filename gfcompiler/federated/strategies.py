"""Flower's FedAvg, FedProx and FedAdam, guarded: traffic counted, non-finite updates dropped.

`GuardedStrategy` goes before a Flower strategy in the class bases and changes only what
happens around it: `configure_train` records the bytes sent (the global ArrayRecord once
per sampled client), `aggregate_train` records the bytes received, drops every reply
whose tensors or training loss are NaN or infinite (a warning names the client and the
round) and hands the rest to Flower's own aggregation. A round in which no client
returns a usable update is a TrainingError naming the clients' errors: the federation
would otherwise go on without learning. Replies that are errors (a crashed or
timed-out client) are left out by Flower itself; the round goes on with the others.

Byte counts are Flower's ``ArrayRecord.count_bytes`` (the serialized tensors and their
names), the payload of the messages, not the transport's framing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from gfcompiler.errors import TrainingError
from gfcompiler.federated.settings import FederationConfig

WEIGHT_KEY = "num-examples"  # Flower's default weighted_by_key
LOSS_KEY = "train-loss"
PARTITION_KEY = "partition-id"


@dataclasses.dataclass
class RoundTraffic:
    """What one training round moved and kept."""

    sampled: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    replies: int = 0
    dropped: int = 0  # non-finite updates left out of the aggregate
    failed: list[str] = dataclasses.field(default_factory=list)  # error replies' reasons
    train_loss: float | None = None  # Flower's weighted mean of the used updates' losses


class GuardedStrategy:
    """Mixin: traffic per round in ``traffic``, non-finite updates dropped with ``warn(message)``."""

    def __init__(self, *args, warn: Callable[[str], None] = print, **kwargs):
        super().__init__(*args, **kwargs)
        self.warn = warn
        self.traffic: dict[int, RoundTraffic] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.traffic[server_round] = RoundTraffic(len(messages), arrays.count_bytes() * len(messages))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        traffic = self.traffic.setdefault(server_round, RoundTraffic())
        usable = []
        for reply in replies:
            if reply.has_error():
                traffic.failed.append(reply.error.reason)
                continue
            traffic.replies += 1
            traffic.bytes_received += sum(record.count_bytes() for record in reply.content.array_records.values())
            problem = non_finite(reply)
            if problem:
                traffic.dropped += 1
                self.warn(f"warning: round {server_round}: {_client(reply)} sent {problem}: "
                          "dropped from the aggregate")
            else:
                usable.append(reply)
        if not usable:
            raise TrainingError(f"round {server_round}: no client returned a usable update"
                                + (f" ({len(traffic.failed)} failed: {traffic.failed[0]})" if traffic.failed else
                                   f" ({traffic.dropped} non-finite)"))
        arrays, metrics = super().aggregate_train(server_round, usable)
        arrays = _in_dtypes_of(arrays, usable[0])
        if metrics is not None and LOSS_KEY in metrics:
            traffic.train_loss = float(metrics[LOSS_KEY])
        return arrays, metrics


def non_finite(reply: Message) -> str | None:
    """What is not finite in a training reply (its loss, or a tensor, named); None when all is."""
    for record in reply.content.metric_records.values():
        loss = record.get(LOSS_KEY)
        if loss is not None and not math.isfinite(float(loss)):
            return f"a non-finite training loss ({loss})"
    for record in reply.content.array_records.values():
        for name, array in record.items():
            values = array.numpy()
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                return f"non-finite values in {name!r}"
    return None


def _in_dtypes_of(arrays: ArrayRecord | None, reply: Message) -> ArrayRecord | None:
    """``arrays`` in the dtypes ``reply``'s tensors have (FedAdam's server step computes in float64,
    which would double the bytes of the next round and is not the model's dtype)."""
    if arrays is None:
        return None
    reference = {name: array.dtype for record in reply.content.array_records.values() for name, array in record.items()}
    if all(array.dtype == reference.get(name, array.dtype) for name, array in arrays.items()):
        return arrays
    return ArrayRecord({name: Array(np.asarray(array.numpy(), dtype=np.dtype(reference.get(name, array.dtype))))
                        for name, array in arrays.items()})


def _client(reply: Message) -> str:
    for record in reply.content.metric_records.values():
        if PARTITION_KEY in record:
            return f"client {int(record[PARTITION_KEY])}"
    return f"node {reply.metadata.src_node_id}"


class GuardedFedAvg(GuardedStrategy, FedAvg):
    """FedAvg (McMahan et al. 2017): the sample-weighted mean of the clients' tensors."""


class GuardedFedProx(GuardedStrategy, FedProx):
    """FedProx (Li et al. 2020): FedAvg, clients pulled towards the global model (proximal-mu)."""


class GuardedFedAdam(GuardedStrategy, FedAdam):
    """FedAdam (Reddi et al. 2021): the mean update applied by a server-side Adam (server-lr)."""


def create_strategy(config: FederationConfig, warn: Callable[[str], None]) -> GuardedStrategy:
    """The strategy ``config`` names; the server evaluates the global model itself, so no client
    evaluation rounds (fraction_evaluate 0)."""
    common = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": config.required_clients,
              "min_available_nodes": config.required_clients, "weighted_by_key": WEIGHT_KEY, "warn": warn}
    if config.strategy == "fedprox":
        return GuardedFedProx(proximal_mu=config.proximal_mu, **common)
    if config.strategy == "fedadam":
        return GuardedFedAdam(eta=config.server_lr, eta_l=config.lr, **common)
    return GuardedFedAvg(**common)
