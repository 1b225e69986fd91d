"""``build_trainer``: a trainer from names, the one way every command builds one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from ..checks import checked, shown
from ..errors import LLSError
from ..method.models import create_model
from ..method.net import Spec
from ..method.rules import Rule, create_rule, seeded_options
from ..training.config import DEFAULTS
from .lowmem import MemorySpec
from .optim import LearningRate, OptimizerSpec
from .schedules import ScheduleFactory
from .schedules import lr_schedule as named_schedule
from .trainer import Trainer


class HasShape(Protocol):
    input_shape: tuple[int, int, int]
    num_classes: int


@checked
def build_trainer(
    model: str | Sequence[Spec],
    rule: Rule | str,
    data: HasShape | Sequence[int],
    num_classes: int | None = None,
    *,
    rule_options: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
    seed: int = DEFAULTS.seed,
    device: torch.device | str = "cpu",
    channels_last: bool = DEFAULTS.channels_last,
    optimizer: OptimizerSpec = DEFAULTS.optimizer,
    lr: LearningRate = DEFAULTS.lr,
    weight_decay: float = DEFAULTS.weight_decay,
    engine: str = DEFAULTS.engine,
    memory: MemorySpec = DEFAULTS.memory,
    lr_schedule: str | ScheduleFactory | None = DEFAULTS.lr_schedule,
    epochs: int = DEFAULTS.epochs,
    precision: str = DEFAULTS.precision,
) -> Trainer:
    """A trainer for a model (a registered name, or a list of block specs) and a rule: the one way
    every command builds one. The defaults are ``lls train``'s (:class:`~lls.training.config.TrainConfig`).

    ``data`` is a dataset (its input shape and class count are used) or an input shape ``(C, H,
    W)`` with ``num_classes``. ``seed`` seeds the initial weights and, for rules that draw fixed
    random tensors (a random basis, feedback matrices), those too. The network is built with the
    rule's activation (Tanh for DRTP) and ``model_options`` (:class:`~lls.method.net.ModelOptions`,
    e.g. ``{"dense_latent": "output"}``), on ``device``, in channels-last layout unless told not
    to, and steps with ``engine`` ("eager", "graph" or "auto"; see engine.py). ``memory``: the
    low-memory step, see :class:`~lls.step.trainer.Trainer`. ``lr_schedule``: a schedule's name
    (over ``epochs`` epochs) or a factory ``optimizer -> LRScheduler``. ``precision``: "fp32",
    "bf16" or "fp16" (precision.py).

    ``build_trainer("smallconv", "lls", (1, 28, 28), 10, rule_options={"basis": "periodic"})``
    """
    shaped = num_classes is not None and isinstance(data, Sequence) and not isinstance(data, str)
    if not (shaped or (num_classes is None and hasattr(data, "input_shape"))):
        raise LLSError(
            "build_trainer: data must be a dataset, or an input shape (C, H, W) given with "
            f"num_classes; got {shown(data)}"
        )
    if num_classes is None:
        input_shape, num_classes = tuple(data.input_shape), data.num_classes
    else:
        input_shape = tuple(data)
    if isinstance(rule, str):
        rule = create_rule(rule, **seeded_options(rule, rule_options or {}, seed))
    elif rule_options:
        raise LLSError("build_trainer: rule_options go with a rule name, not a Rule object")
    torch.manual_seed(seed)  # the network's (and the rule's extra parameters') initial weights
    net = create_model(
        model,
        in_channels=input_shape[0],
        input_size=input_shape[1:],
        num_classes=num_classes,
        activation=rule.activation,
        **(model_options or {}),
    ).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return Trainer(
        net,
        rule,
        input_shape=input_shape,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        engine=engine,
        memory=memory,
        lr_schedule=named_schedule(lr_schedule, epochs) if isinstance(lr_schedule, str) else lr_schedule,
        precision=precision,
    )
