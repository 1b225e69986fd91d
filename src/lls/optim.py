"""Optimizers a trainer can give each block, by name."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import schedulefree
import torch

from .registry import Registry

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter], float, float], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")

OPTIMIZERS.register("adamw-sf")(
    lambda params, lr, wd: schedulefree.AdamWScheduleFree(params, lr=lr, weight_decay=wd)
)
OPTIMIZERS.register("sgd-sf")(
    lambda params, lr, wd: schedulefree.SGDScheduleFree(params, lr=lr, weight_decay=wd)
)
OPTIMIZERS.register("adam")(lambda params, lr, wd: torch.optim.Adam(params, lr=lr, weight_decay=wd))
OPTIMIZERS.register("adamw")(lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd))
OPTIMIZERS.register("sgd")(
    lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
)


def create_optimizer(
    name: str | OptimizerFactory, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """An optimizer by registered name, or from a factory ``(params, lr, weight_decay)``."""
    factory = OPTIMIZERS.get(name) if isinstance(name, str) else name
    return factory(list(params), lr, weight_decay)


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """Schedule-free optimizers keep two weight sequences and must be told train / eval."""
    return hasattr(optimizer, "eval") and hasattr(optimizer, "train") and "train_mode" in optimizer.defaults
