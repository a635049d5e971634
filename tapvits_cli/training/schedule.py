"""Learning-rate schedule: linear warm-up, then cosine decay to a floor, per optimizer step.

A closed form inside torch's own :class:`~torch.optim.lr_scheduler.LambdaLR`: the rate of
step s depends on s alone, so a resumed run recomputes exactly the rates of an
uninterrupted one (a chained, recursive schedule would drift by rounding).
"""

from __future__ import annotations

import math


class WarmupCosine:
    """Multiplier of the base rate for optimizer step ``step`` (0-based).

    Warm-up rises linearly to 1 over ``warmup_steps`` steps (the first step already
    learns, at ``1/warmup_steps``); the cosine then falls from 1 towards ``floor``
    (``min_lr / lr``), reaching it after ``total_steps``. A plain object, not a lambda,
    so LambdaLR's ``state_dict`` carries its numbers.
    """

    def __init__(self, total_steps: int, warmup_steps: int, floor: float) -> None:
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.floor = float(floor)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int, min_lr: float):
    """A LambdaLR over every parameter group; ``min_lr`` is relative to each group's base rate."""
    from torch.optim.lr_scheduler import LambdaLR

    base = optimizer.param_groups[0]["lr"]
    floor = min_lr / base if base > 0 else 0.0
    return LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps, floor))
