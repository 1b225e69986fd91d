"""Learning-rate schedules by name, stepped per epoch: the lr of epoch e is a pure function of e and
the run's total epochs.

A schedule is a factory ``(optimizer) -> LRScheduler``; :func:`lr_schedule` makes the named ones
for a run of ``epochs`` epochs (``--lr-schedule`` on the command line). The trainer steps every
block's scheduler once after each epoch and checkpoints their state with the optimizers'.

A named schedule is an :class:`EpochSchedule`: ``lr(e) = base lr * factor(e, total)``, computed
from the formula at every epoch (never by multiplying the previous epoch's lr), and its checkpoint
holds only the epoch reached and the base lrs. Restored into a schedule of another ``total`` (a
resumed run given more ``--epochs``), it continues with that total's lrs: from the restored epoch
on, exactly the lrs an uninterrupted run of that many epochs has.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from ..checks import checked
from ..errors import LLSError
from ..registry import Registry

ScheduleFactory = Callable[[torch.optim.Optimizer], LRScheduler]
Factor = Callable[[int, int], float]  # (epoch, total epochs) -> what multiplies the base lr
STEP_DROPS = 3  # "step": the lr falls STEP_DROPS times over a run...
STEP_GAMMA = 0.1  # ...by this factor each time


def cosine(epoch: int, total: int) -> float:
    """From 1 down to 0 over the run (Loshchilov & Hutter's SGDR without restarts)."""
    return (1 + math.cos(math.pi * epoch / total)) / 2


def step(epoch: int, total: int) -> float:
    """STEP_GAMMA ** k after the k-th of STEP_DROPS + 1 equal parts of the run."""
    return STEP_GAMMA ** (epoch // max(1, total // (STEP_DROPS + 1)))


SCHEDULES: Registry[Factor | None] = Registry("lr schedule")
SCHEDULES.register("none")(None)  # no scheduler at all (the graph engine replays a fixed lr)
SCHEDULES.register("cosine")(cosine)
SCHEDULES.register("step")(step)


class EpochSchedule(LRScheduler):
    """``lr = base lr * factor(epoch, total)`` for each of the optimizer's groups."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor: Factor, total: int) -> None:
        self.factor, self.total = factor, total
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch, self.total) for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs), "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The epoch reached and the base lrs (also of torch's own schedulers' checkpoints, which
        runs before this class wrote); the lrs are recomputed at this schedule's ``total``."""
        self.last_epoch, self.base_lrs = int(state["last_epoch"]), list(state["base_lrs"])
        self._step_count = self.last_epoch + 1
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr


@checked
def lr_schedule(name: str, epochs: int) -> ScheduleFactory | None:
    """The schedule ``name`` ("none", "cosine", "step") for a run of ``epochs`` epochs; None for
    "none"."""
    if not isinstance(name, str):
        raise LLSError(f"lr_schedule's name must be a str ({', '.join(SCHEDULES.names())}), got {name!r}")
    factor = SCHEDULES.get(name)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise LLSError(f"lr_schedule's epochs must be a whole number >= 1 (the run's length), got {epochs!r}")
    if factor is None:
        return None
    return lambda optimizer: EpochSchedule(optimizer, factor, epochs)


def check_schedule(schedule: Any) -> None:
    """Refuse, when a trainer is made, an ``lr_schedule`` that is not a factory ``optimizer ->
    LRScheduler``: it is called once on a throw-away optimizer, not an epoch later."""
    if schedule is None:
        return
    takes = "a factory optimizer -> torch.optim.lr_scheduler.LRScheduler (e.g. lls.lr_schedule('cosine', 10))"
    if isinstance(schedule, str) or not callable(schedule):
        raise LLSError(f"lr_schedule must be {takes}, got {schedule!r}")
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        made = schedule(probe)
    except LLSError:
        raise
    except Exception as error:
        raise LLSError(
            f"lr_schedule failed on an optimizer ({type(error).__name__}: {error}); give {takes}"
        ) from None
    if not all(hasattr(made, name) for name in ("step", "state_dict", "load_state_dict")):
        raise LLSError(f"lr_schedule returned {type(made).__name__}, not a scheduler; give {takes}")
