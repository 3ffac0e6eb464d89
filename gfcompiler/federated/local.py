"""One client's round, without Flower: the global trained tensors in, E local epochs, the new ones out.

`train_locally` is what the ClientApp runs (gfcompiler.federated.client_app) on a fresh
`Trainer`: so each round restarts the client's optimizer state (AdamW moments and its
step count start from zero, as in most FedAvg implementations: moments accumulated on
an older global model would push the new one the wrong way). The batches are the
runtime's (gfcompiler.runtime.data.epoch_batches), epoch numbers continuing across rounds
(round r trains epochs (r-1)·E ... r·E-1), so round 1 is exactly ``gfc train`` for E
epochs on the client's data with the client's seed.

FedProx: the compiled step has no term for the proximal loss (μ/2)·||w - w_global||², so
after each optimizer step the client takes its gradient step on its own,
w ← w - lr·μ·(w - w_global): decoupled from the optimizer, as AdamW decouples weight
decay (towards the global model instead of zero).

A NaN or infinite loss ends the client's round at once (the bad step is not applied) and
is reported as the round's loss; the server drops such updates
(gfcompiler.federated.strategies).
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from gfcompiler.errors import InputError
from gfcompiler.runtime.data import Dataset, epoch_batches
from gfcompiler.runtime.trainer import NonFiniteLoss, Trainer


@dataclasses.dataclass(frozen=True)
class LocalUpdate:
    parameters: dict[str, np.ndarray]  # the trained tensors after the round
    samples: int  # the client's data size (FedAvg's weight)
    loss: float  # mean training loss over the round's samples; the non-finite loss that stopped it
    steps: int
    seconds: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and all(np.isfinite(a).all() for a in self.parameters.values())


def client_seed(seed: int, partition: int) -> int:
    """The shuffling seed of client ``partition`` (clients draw different batch orders)."""
    return seed + 1000 * partition


def train_locally(trainer: Trainer, data: Dataset, global_parameters: dict[str, np.ndarray], *, epochs: int,
                  batch_size: int, lr: float, seed: int, first_epoch: int = 0, proximal_mu: float = 0.0) -> LocalUpdate:
    """Load ``global_parameters``, train epochs ``first_epoch ..`` ``+ epochs``, return the update."""
    fixed = trainer.fixed_batch
    if fixed is not None and batch_size != fixed:
        raise InputError(f"the model was compiled for batch size {fixed}: use --batch-size {fixed}")
    trainer.load_parameters(global_parameters)
    anchor = trainer.trainable_parameters() if proximal_mu else None
    started, loss_sum, seen, steps = time.perf_counter(), 0.0, 0, 0
    for epoch in range(first_epoch, first_epoch + epochs):
        for _, indices in epoch_batches(len(data), batch_size, seed=seed, epoch=epoch, drop_last=fixed is not None):
            try:
                loss = trainer.step(data.x[indices], data.y[indices], lr=lr)
            except NonFiniteLoss as error:
                return LocalUpdate(trainer.trainable_parameters(), len(data), error.loss, steps,
                                   time.perf_counter() - started)
            loss_sum, seen, steps = loss_sum + loss * len(indices), seen + len(indices), steps + 1
            if anchor is not None:
                _proximal_step(trainer, anchor, lr * trainer.lr_multiplier * proximal_mu)
    return LocalUpdate(trainer.trainable_parameters(), len(data), loss_sum / max(seen, 1), steps,
                       time.perf_counter() - started)


def _proximal_step(trainer: Trainer, anchor: dict[str, np.ndarray], rate: float) -> None:
    """w ← w - rate·(w - anchor): a gradient step on (1/2)·||w - anchor||² scaled by ``rate``."""
    current = trainer.trainable_parameters()
    trainer.load_parameters({name: w - np.float32(rate) * (w - anchor[name]) for name, w in current.items()})
