"""Optimizers a trainer can give each block, by name.

A name means one algorithm. ``create_optimizer(..., capturable=True)`` asks for an implementation
whose step can be captured in a CUDA graph (per-step scalars on the device); the eager default keeps
the ``schedulefree`` package for "adamw-sf", so CPU runs stay bit-for-bit what they were.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import schedulefree
import torch

from ..registry import Registry
from .sfadamw import AdamWScheduleFree

OptimizerFactory = Callable[[list[torch.nn.Parameter], float, float], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")
CAPTURABLE_OPTIMIZERS: Registry[OptimizerFactory] = Registry("capturable optimizer")

OPTIMIZERS.register("adamw-sf")(
    lambda params, lr, wd: schedulefree.AdamWScheduleFree(params, lr=lr, weight_decay=wd)
)
# The copy of schedule-free AdamW in the LLS authors' code: bias correction folded into the step
# size, so the average's weights grow with 1 - beta2^t (see lls.sfadamw).
OPTIMIZERS.register("adamw-sf-authors")(
    lambda params, lr, wd: AdamWScheduleFree(params, lr=lr, weight_decay=wd, bias_correction="lr")
)
OPTIMIZERS.register("sgd-sf")(
    lambda params, lr, wd: schedulefree.SGDScheduleFree(params, lr=lr, weight_decay=wd)
)
OPTIMIZERS.register("adam")(lambda params, lr, wd: torch.optim.Adam(params, lr=lr, weight_decay=wd))
OPTIMIZERS.register("adamw")(lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd))
OPTIMIZERS.register("sgd")(
    lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
)

CAPTURABLE_OPTIMIZERS.register("adamw-sf")(
    lambda params, lr, wd: AdamWScheduleFree(params, lr=lr, weight_decay=wd)
)
CAPTURABLE_OPTIMIZERS.register("adamw-sf-authors")(OPTIMIZERS.get("adamw-sf-authors"))
# torch keeps Adam's step count on the device only when asked, and only on accelerators.
CAPTURABLE_OPTIMIZERS.register("adam")(
    lambda params, lr, wd: torch.optim.Adam(
        params, lr=lr, weight_decay=wd, capturable=params[0].device.type != "cpu"
    )
)
CAPTURABLE_OPTIMIZERS.register("adamw")(
    lambda params, lr, wd: torch.optim.AdamW(
        params, lr=lr, weight_decay=wd, capturable=params[0].device.type != "cpu"
    )
)
CAPTURABLE_OPTIMIZERS.register("sgd")(OPTIMIZERS.get("sgd"))  # no per-step scalar to capture


def create_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float = 0.0,
    *,
    capturable: bool = False,
) -> torch.optim.Optimizer:
    """The optimizer ``name``; ``capturable=True``: an implementation a CUDA graph can replay."""
    registry = CAPTURABLE_OPTIMIZERS if capturable else OPTIMIZERS
    OPTIMIZERS.get(name)  # an unknown name fails listing every optimizer, not only capturable ones
    return registry.get(name)(list(params), lr, weight_decay)


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """Schedule-free optimizers keep two weight sequences and must be told train / eval."""
    return hasattr(optimizer, "eval") and hasattr(optimizer, "train") and "train_mode" in optimizer.defaults
