"""Learning-rate schedules as functions of *global progress* (0 at the first step of the whole
training, 1 at the last), so that a federated client training round r of R continues the
curve a central run follows instead of restarting it every round."""

from __future__ import annotations

import math
from dataclasses import dataclass


def lr_factor(schedule: str, progress: float) -> float:
    """Learning-rate multiplier at a point of the whole training (progress in [0, 1])."""
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "onecycle":
        # Warm up over the first 30% from lr/25, then cosine-anneal to ~0 (as torch's OneCycleLR).
        warm = 0.3
        if progress < warm:
            return 1 / 25 + (1 - 1 / 25) * (1 - math.cos(math.pi * progress / warm)) / 2
        return 1e-4 / 25 + (1 - 1e-4 / 25) * (1 + math.cos(math.pi * (progress - warm) / (1 - warm))) / 2
    if schedule == "cosine":
        return (1 + math.cos(math.pi * progress)) / 2
    if schedule in ("constant", "plateau"):
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}: onecycle, cosine, plateau or constant")


@dataclass
class StepSchedule:
    """Maps an optimiser step to an LR: steps [first_step, first_step + steps) of total_steps."""

    base_lr: float
    schedule: str
    total_steps: int
    first_step: int = 0

    def lr(self, step: int) -> float:
        return self.base_lr * lr_factor(self.schedule, (self.first_step + step) / max(self.total_steps - 1, 1))
