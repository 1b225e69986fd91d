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
from .config import CHANNELS_LAST, EPOCHS, SEED, StepConfig, step_config
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
    seed: int = SEED,
    device: torch.device | str = "cpu",
    channels_last: bool = CHANNELS_LAST,
    config: StepConfig | None = None,
    epochs: int = EPOCHS,
    **options: Any,
) -> Trainer:
    """A trainer for a model (a registered name, or a list of block specs) and a rule: the one way
    every command builds one. The defaults are ``lls train``'s (:class:`~lls.training.config.TrainConfig`).

    ``data`` is a dataset (its input shape and class count are used) or an input shape ``(C, H,
    W)`` with ``num_classes``. ``seed`` seeds the initial weights and, for rules that draw fixed
    random tensors (a random basis, feedback matrices), those too. The network is built with the
    rule's activation (Tanh for DRTP) and ``model_options`` (:class:`~lls.method.net.ModelOptions`,
    e.g. ``{"dense_latent": "output"}``), on ``device``, in channels-last layout unless told not
    to. ``config`` (:class:`~lls.step.config.StepConfig`; a run's TrainConfig will do) says how it
    steps, its schedule over ``epochs`` epochs; its fields may also be given as keywords (``lr=1e-3``,
    ``optimizer="adam"``, ``lr_schedule="cosine"``, ...), as for :class:`~lls.step.trainer.Trainer`.

    ``build_trainer("smallconv", "lls", (1, 28, 28), 10, rule_options={"basis": "periodic"})``
    """
    config = step_config(config, **options)  # unknown keywords refused before anything is built
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
    return Trainer(net, rule, input_shape=input_shape, config=config, epochs=epochs)
