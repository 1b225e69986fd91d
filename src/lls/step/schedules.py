"""Learning-rate schedules by name: a ``torch.optim.lr_scheduler`` per optimizer, stepped per epoch.

A schedule is a factory ``(optimizer) -> LRScheduler``; :func:`lr_schedule` makes the named ones
for a run of ``epochs`` epochs (``--lr-schedule`` on the command line). The trainer steps every
block's scheduler once after each epoch and checkpoints their state with the optimizers'.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, StepLR

from ..registry import Registry

ScheduleFactory = Callable[[torch.optim.Optimizer], LRScheduler]
STEP_DROPS = 3  # "step": the lr falls STEP_DROPS times over a run...
STEP_GAMMA = 0.1  # ...by this factor each time

SCHEDULES: Registry[Callable[[int], ScheduleFactory | None]] = Registry("lr schedule")
SCHEDULES.register("none")(lambda epochs: None)
# cosine from the lr down to 0 over the run's epochs (Loshchilov & Hutter's SGDR without restarts)
SCHEDULES.register("cosine")(lambda epochs: lambda opt: CosineAnnealingLR(opt, T_max=epochs))
SCHEDULES.register("step")(
    lambda epochs: lambda opt: StepLR(opt, step_size=max(1, epochs // (STEP_DROPS + 1)), gamma=STEP_GAMMA)
)


def lr_schedule(name: str, epochs: int) -> ScheduleFactory | None:
    """The schedule ``name`` ("none", "cosine", "step") for a run of ``epochs`` epochs."""
    return SCHEDULES.get(name)(epochs)
