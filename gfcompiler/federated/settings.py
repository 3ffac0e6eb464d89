"""`FederationConfig`: what defines a federation, and its form in Flower's run config.

The same two apps run under Flower's simulation engine (``gfc federate``, which builds
the config from its arguments) and its deployment engine (``flwr run``, where the
config is the app's ``[tool.flwr.app.config]`` with ``--run-config`` overrides). Flower
config values are str, int, float or bool and keys are hyphenated, so `to_run_config`
and `from_run_config` translate: several data sources are one string joined by
``DATA_SEPARATOR``, and empty strings / 0 stand for "the default" (``run-dir``: the
artifacts' ``run``; ``min-clients``: all clients; ``threads``: onnxruntime's choice).

Standard library only: ``gfc federate`` parses and checks its arguments before Flower
is imported.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path

from gfcompiler.errors import InputError

STRATEGIES = ("fedavg", "fedprox", "fedadam")
DATA_SEPARATOR = "|"


@dataclasses.dataclass(frozen=True)
class FederationConfig:
    """A federation of ``clients`` Trainers on ``artifacts``, ``rounds`` rounds of ``local_epochs`` epochs.

    ``data``: one source, split into label-skewed Dirichlet(``alpha``) shards (seeded by
    ``seed``), or one source per client. ``val_data``: the server's held-out evaluation
    set ("" = the ``/test`` split of a built-in set, else a seeded 20% of each source).
    """

    artifacts: str
    data: tuple[str, ...]
    clients: int = 2
    rounds: int = 3
    local_epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 32
    alpha: float = 0.5
    seed: int = 0
    strategy: str = "fedavg"
    proximal_mu: float = 0.01  # fedprox: weight of (mu / 2)·||w - w_global||²
    server_lr: float = 0.01  # fedadam: the server optimizer's step size (Flower's eta)
    val_data: str = ""
    run_dir: str = ""
    overwrite: bool = False
    min_clients: int = 0  # 0: every client; a round goes on with at least this many replies
    round_timeout: float = 3600.0  # seconds the server waits for a round's replies
    threads: int = 0  # onnxruntime threads per client; 0: onnxruntime's choice

    def checked(self) -> FederationConfig:
        """Self, validated (InputError naming the option)."""
        positive = {"--clients": self.clients, "--rounds": self.rounds, "--epochs": self.local_epochs,
                    "--batch-size": self.batch_size}
        for option, value in positive.items():
            if value < 1:
                raise InputError(f"{option} must be at least 1, got {value}")
        if not self.data:
            raise InputError("--data is required")
        if len(self.data) > 1 and len(self.data) != self.clients:
            raise InputError(f"{len(self.data)} --data sources for {self.clients} clients: give one source, "
                             "to be split, or one per client")
        if self.strategy not in STRATEGIES:
            raise InputError(f"unknown strategy {self.strategy!r}: choose {', '.join(STRATEGIES)}")
        for option, value in {"--alpha": self.alpha, "--lr": self.lr, "--server-lr": self.server_lr,
                              "--round-timeout": self.round_timeout}.items():
            if not (math.isfinite(value) and value > 0):
                raise InputError(f"{option} must be a positive number, got {value}")
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise InputError(f"--proximal-mu must be a number >= 0, got {self.proximal_mu}")
        if not 0 <= self.min_clients <= self.clients:
            raise InputError(f"min-clients must be between 0 (every client) and clients ({self.clients}), "
                             f"got {self.min_clients}")
        if any(DATA_SEPARATOR in source for source in self.data):
            raise InputError(f"a --data source may not contain {DATA_SEPARATOR!r}")
        return self

    @property
    def required_clients(self) -> int:
        """The fewest replies a round proceeds with (and nodes the server waits for)."""
        return self.min_clients or self.clients

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(self.artifacts) / "run"

    def to_run_config(self) -> dict:
        """Flower's run config: hyphenated keys, str/int/float/bool values."""
        values = dataclasses.asdict(self)
        values["data"] = DATA_SEPARATOR.join(self.data)
        return {name.replace("_", "-"): value for name, value in values.items()}

    @classmethod
    def from_run_config(cls, run_config: Mapping, base: FederationConfig | None = None) -> FederationConfig:
        """The config in ``run_config`` (keys as `to_run_config` writes them; unknown keys ignored) over
        ``base`` (default: the field defaults); InputError when artifacts or data are missing."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = dataclasses.asdict(base) if base is not None else {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name in fields:
                values[name] = _parse(name, value)
        missing = [name for name in ("artifacts", "data") if not values.get(name)]
        if missing:
            raise InputError(f"the run config lacks {' and '.join(missing)}")
        return cls(**values).checked()


def _parse(name: str, value):
    """A run-config value as the field ``name`` holds it."""
    if name == "data":
        return tuple(s for s in str(value).split(DATA_SEPARATOR) if s) if isinstance(value, str) else tuple(value)
    if name in ("clients", "rounds", "local_epochs", "batch_size", "seed", "min_clients", "threads"):
        return int(value)
    if name in ("lr", "alpha", "proximal_mu", "server_lr", "round_timeout"):
        return float(value)
    if name == "overwrite":
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    return str(value)
