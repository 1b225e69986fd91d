"""Optimizers a trainer can give each block, by name.

A name means one algorithm. ``create_optimizer(..., capturable=True)`` asks for an implementation
whose step can be captured in a CUDA graph (per-step scalars on the device); the eager default keeps
the ``schedulefree`` package for "adamw-sf", so CPU runs stay bit-for-bit what they were.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import schedulefree
import torch

from ..errors import LLSError
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


@CAPTURABLE_OPTIMIZERS.register("sgd")
def _capturable_sgd(params, lr: float, wd: float) -> torch.optim.Optimizer:
    """SGD keeps no per-step scalar on the host, so its step replays as captured; torch has no
    ``capturable`` flag for it, so the groups are marked the way the graph engine reads it."""
    optimizer = OPTIMIZERS.get("sgd")(params, lr, wd)
    for group in optimizer.param_groups:
        group["capturable"] = True
    return optimizer


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


OptimizerSpec = str | type[torch.optim.Optimizer] | OptimizerFactory
LearningRate = float | Sequence[float] | Callable[[int], float]


def make_optimizer(
    spec: OptimizerSpec,
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float = 0.0,
    *,
    capturable: bool = False,
) -> torch.optim.Optimizer:
    """An optimizer from a registered name, a ``torch.optim.Optimizer`` class (given ``lr`` and
    ``weight_decay`` by keyword: positionally Adam's third argument is ``betas``) or a factory
    ``(params, lr, weight_decay) -> Optimizer``."""
    if isinstance(spec, str):
        return create_optimizer(spec, params, lr, weight_decay, capturable=capturable)
    if isinstance(spec, type) and issubclass(spec, torch.optim.Optimizer):
        return spec(list(params), lr=lr, weight_decay=weight_decay)
    if callable(spec):
        return spec(list(params), lr, weight_decay)
    raise LLSError(
        f"optimizer must be a name ({', '.join(OPTIMIZERS.names())}), a torch.optim class or a "
        f"factory (params, lr, weight_decay) -> Optimizer; got {type(spec).__name__}"
    )


def check_optimizer(spec: OptimizerSpec, weight_decay: float) -> None:
    """Refuse, when a trainer is made, an optimizer that is not a name, an Optimizer class or a
    factory giving an Optimizer: it builds one over a throw-away parameter, not at the first step."""
    if isinstance(spec, str):
        return  # a name: checked against the registry with the run's options
    try:
        made = make_optimizer(spec, [torch.nn.Parameter(torch.zeros(1))], 1e-3, weight_decay)
    except LLSError:
        raise
    except Exception as error:
        raise LLSError(
            f"optimizer {getattr(spec, '__name__', type(spec).__name__)} failed on a parameter "
            f"({type(error).__name__}: {error}); give a name, a torch.optim class or a factory "
            "(params, lr, weight_decay) -> Optimizer"
        ) from None
    if not isinstance(made, torch.optim.Optimizer):
        raise LLSError(
            f"optimizer {getattr(spec, '__name__', type(spec).__name__)} returned {type(made).__name__}, "
            "not a torch.optim.Optimizer; give a name, a torch.optim class or a factory "
            "(params, lr, weight_decay) -> Optimizer"
        )


def block_lrs(lr: LearningRate, blocks: int) -> list[float]:
    """The learning rate of each block's optimizer, then the head's: ``lr`` is one number for all,
    a list of ``blocks + 1`` numbers, or a function of the index (``blocks`` for the head)."""
    if callable(lr):
        lrs = [lr(i) for i in range(blocks + 1)]
        where = "the lr function's value"
    elif isinstance(lr, (int, float)) and not isinstance(lr, bool):
        lrs, where = [lr] * (blocks + 1), "lr"
    elif isinstance(lr, Sequence) and not isinstance(lr, str):
        if len(lr) != blocks + 1:
            raise LLSError(
                f"lr has {len(lr)} values for {blocks} blocks and the head; give {blocks + 1} "
                "(one per block, the last for the head), one number, or a function of the block index"
            )
        lrs, where = list(lr), "lr"
    else:
        raise LLSError(
            f"lr must be a number, a list or a function of the block index; got {type(lr).__name__}"
        )
    for i, value in enumerate(lrs):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            who = "the head" if i == blocks else f"block {i}"
            raise LLSError(f"{where} for {who} is {value!r}; a learning rate is a positive finite number")
    return [float(v) for v in lrs]
