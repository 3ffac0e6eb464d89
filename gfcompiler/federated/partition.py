"""Who trains on what: label-skewed client shards and the server's held-out set.

`dirichlet_partition` is the usual non-IID split of federated-learning papers (Hsu et
al. 2019): for each class, the shares of the K clients are drawn from Dirichlet(α·1),
and that class's samples (shuffled) are cut in those proportions. Small α gives each
client few classes; large α approaches an IID split. A draw that leaves a client with
fewer than ``min_samples`` samples is redrawn (from the same seeded generator), so the
result is a pure function of (labels, K, α, seed).

`client_data` and `evaluation_data` are what a client and the server load from a
`FederationConfig`: every process computes the same split from the same seed, so no
sample indices travel. Numpy and the runtime only.
"""

from __future__ import annotations

import functools

import numpy as np

from gfcompiler.errors import InputError
from gfcompiler.federated.settings import FederationConfig
from gfcompiler.runtime.artifacts import Artifacts, open_artifacts
from gfcompiler.runtime.data import BUILTIN_SETS, Dataset, load_dataset

HOLDOUT_FRACTION = 0.2
_REDRAWS = 100


def dirichlet_partition(labels: np.ndarray, clients: int, alpha: float, seed: int,
                        min_samples: int = 1) -> list[np.ndarray]:
    """Sorted sample indices of each of ``clients`` shards; disjoint, covering every sample."""
    labels = skew_labels(labels)
    if clients * min_samples > len(labels):
        raise InputError(f"{len(labels)} samples cannot give {clients} clients {min_samples} sample(s) each")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(_REDRAWS):
        shards: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for value in classes:
            members = rng.permutation(np.flatnonzero(labels == value))
            shares = rng.dirichlet(np.full(clients, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * len(members)).round().astype(int)
            for shard, part in zip(shards, np.split(members, cuts)):
                shard.append(part)
        result = [np.sort(np.concatenate(parts)) for parts in shards]
        if min(len(r) for r in result) >= min_samples:
            return result
    raise InputError(f"Dirichlet(alpha={alpha}) left a client with fewer than {min_samples} sample(s) in "
                     f"{_REDRAWS} draws: use fewer --clients or a larger --alpha")


def skew_labels(labels: np.ndarray) -> np.ndarray:
    """The class each sample counts as for the skew: its label, a segmentation mask's most frequent
    class, or one class for all (regression targets: the split is then IID)."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        return np.zeros(len(labels), np.int64)
    if labels.ndim == 1:
        return labels
    return np.array([np.bincount(row).argmax() for row in labels.reshape(len(labels), -1)])


def holdout_split(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(rest, held out): a seeded ``fraction`` of ``dataset`` (at least one sample) held out."""
    order = np.random.default_rng([seed, len(dataset)]).permutation(len(dataset))
    count = max(1, int(round(fraction * len(dataset))))
    if count >= len(dataset):
        raise InputError(f"{dataset.source} has {len(dataset)} sample(s): too few to hold some out; pass --val-data")
    held, rest = np.sort(order[:count]), np.sort(order[count:])
    return _subset(dataset, rest, "rest"), _subset(dataset, held, "held out")


def _subset(dataset: Dataset, indices: np.ndarray, what: str) -> Dataset:
    return Dataset(dataset.x[indices], dataset.y[indices], f"{dataset.source} ({what})", dataset.classes)


def _builtin_whole(source: str) -> bool:
    """``builtin:NAME`` without a split: clients take its /train split, the server its /test one."""
    name = source.removeprefix("builtin:")
    return source.startswith("builtin:") and "/" not in name and name in BUILTIN_SETS


@functools.lru_cache(maxsize=8)
def shared_artifacts(directory: str) -> Artifacts:
    """The artifacts at ``directory``, opened (and verified) once per process."""
    return open_artifacts(directory)


@functools.lru_cache(maxsize=8)
def _load(source: str, directory: str) -> Dataset:
    """``source`` loaded for the artifacts at ``directory``, once per process."""
    return load_dataset(source, shared_artifacts(directory))


@functools.lru_cache(maxsize=8)
def _held_out(source: str, directory: str, seed: int) -> tuple[Dataset, Dataset]:
    """``source``'s seeded (rest, held out) split, made once per process."""
    return holdout_split(_load(source, directory), HOLDOUT_FRACTION, seed)


@functools.lru_cache(maxsize=8)
def _shards(config: FederationConfig, partitions: int) -> list[np.ndarray]:
    """The Dirichlet shards of the one ``--data`` source's pool, drawn once per process."""
    pool = training_pool(config, config.data[0])
    return dirichlet_partition(pool.y, partitions, config.alpha, config.seed)


def training_pool(config: FederationConfig, source: str) -> Dataset:
    """What the clients of ``source`` share: all of it, its /train split, or what the holdout leaves."""
    if config.val_data:
        return _load(source, config.artifacts)
    if _builtin_whole(source):
        return _load(f"{source}/train", config.artifacts)
    return _held_out(source, config.artifacts, config.seed)[0]


def client_data(config: FederationConfig, partition: int, partitions: int, own_source: str | None = None) -> Dataset:
    """Client ``partition``'s data: ``own_source`` whole (a node's own data), its own ``--data``
    source (one per client), or its Dirichlet shard of the one source."""
    if own_source:
        return _load(own_source, config.artifacts)
    if not 0 <= partition < partitions:
        raise InputError(f"partition-id {partition} is outside 0..{partitions - 1}")
    if len(config.data) > 1:
        if partitions != len(config.data):
            raise InputError(f"{partitions} partitions for {len(config.data)} data sources")
        return training_pool(config, config.data[partition])
    pool = training_pool(config, config.data[0])
    shard = _shards(config, partitions)[partition]
    return Dataset(pool.x[shard], pool.y[shard], f"{pool.source} [shard {partition + 1}/{partitions}]", pool.classes)


def evaluation_data(config: FederationConfig) -> Dataset:
    """The server's held-out set: ``val_data``, else each source's /test split or held-out 20%, joined."""
    if config.val_data:
        return _load(config.val_data, config.artifacts)
    parts = []
    for source in config.data:
        if _builtin_whole(source):
            parts.append(_load(f"{source}/test", config.artifacts))
        else:
            parts.append(_held_out(source, config.artifacts, config.seed)[1])
    if len(parts) == 1:
        return parts[0]
    try:
        x, y = np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts])
    except ValueError as error:
        raise InputError(f"the --data sources do not stack into one evaluation set ({error})") from None
    return Dataset(x, y, " + ".join(p.source for p in parts), parts[0].classes)


def describe_shards(config: FederationConfig) -> list[str]:
    """One line per client: its samples and classes (for ``gfc federate``'s header)."""
    lines = []
    for partition in range(config.clients):
        data = client_data(config, partition, config.clients)
        values, counts = np.unique(skew_labels(data.y), return_counts=True)
        top = ", ".join(f"{v}:{c}" for v, c in sorted(zip(values, counts), key=lambda vc: -vc[1])[:4])
        lines.append(f"client {partition}: {len(data)} samples, {len(values)} classes (most: {top})")
    return lines

