"""Learning-rate schedules, computed per step by the runtime.

The runtime sets the optimizer's learning rate before every step
(``optimizer.set_learning_rate``), so the learning rate is a pure function of the
global step and resuming a run resumes its schedule exactly. Schedules:

* ``constant``: ``lr`` throughout (no warm-up).
* ``warmup``:   linear warm-up from ``lr / warmup`` to ``lr``, then constant.
* ``linear``:   the warm-up, then a linear decay towards 0 at the last step.
* ``cosine``:   the warm-up, then a half-cosine decay towards 0 at the last step.

The user's learning rate is multiplied by the manifest's ``lr_multiplier`` elsewhere
(gfcompiler.runtime.trainer), not here: these are the rates the user thinks in.
"""

from __future__ import annotations

import dataclasses
import math

from gfcompiler.errors import InputError

SCHEDULES = ("constant", "warmup", "linear", "cosine")
DEFAULT_WARMUP_FRACTION = 0.05


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    kind: str
    base_lr: float
    total_steps: int
    warmup_steps: int = 0

    @classmethod
    def create(cls, kind: str, base_lr: float, total_steps: int, warmup_steps: int | None = None) -> LRSchedule:
        """Validate; ``warmup_steps=None`` means 0 for ``constant``, else 5% of the steps."""
        if kind not in SCHEDULES:
            raise InputError(f"unknown learning-rate schedule {kind!r}: use one of {', '.join(SCHEDULES)}")
        if not (base_lr > 0 and math.isfinite(base_lr)):
            raise InputError(f"the learning rate must be a positive number, got {base_lr}")
        if kind == "constant":
            warmup_steps = 0
        elif warmup_steps is None:
            warmup_steps = max(1, round(DEFAULT_WARMUP_FRACTION * total_steps))
        if warmup_steps < 0:
            raise InputError(f"--warmup-steps must be at least 0, got {warmup_steps}")
        return cls(kind, float(base_lr), max(int(total_steps), 1), min(int(warmup_steps), max(int(total_steps), 1)))

    def __call__(self, step: int) -> float:
        """The learning rate of 0-based step ``step``."""
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind in ("constant", "warmup"):
            return self.base_lr
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        if self.kind == "linear":
            return self.base_lr * (1.0 - progress)
        return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
