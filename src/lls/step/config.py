"""How a trainer steps: :class:`StepConfig`, declared once as options, and its checks.

A run's configuration (:class:`~lls.training.config.TrainConfig`) is a StepConfig with the run's
own options added, so these fields are ``lls train``'s flags and ``config.json``'s keys; the
:class:`~lls.step.trainer.Trainer`, :func:`~lls.step.factory.build_trainer` and ``lls bench`` take
a StepConfig and check it here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..checks import check_fields
from ..errors import LLSError
from ..method.rules import Rule
from ..options import check_values, flag, option, options_of
from .engine import ENGINES
from .lowmem import MemoryPlan, memory_plan
from .optim import OPTIMIZERS, LearningRate, OptimizerSpec
from .precision import PRECISIONS, is_mixed
from .schedules import SCHEDULES, ScheduleFactory, lr_schedule

# Defaults of what else builds a trainer (the run's options of the same names take theirs from here)
RULE = "lls"
SEED = 0
CHANNELS_LAST = True
BATCH_SIZE = 128
EPOCHS = 1


@dataclass
class StepConfig:
    """How every block's optimizer steps: ``StepConfig(lr=1e-3, optimizer="adam")``.

    Every block gets its own optimizer (``optimizer`` by name, or through the API a factory
    ``(params, lr, weight_decay) -> Optimizer``) over its parameters plus its signal's; the head
    gets one more. Through the API ``lr`` may also be one rate per block (a list) or a function of
    the block index, ``lr_schedule`` a factory ``optimizer -> LRScheduler``, and ``memory`` a
    budget in bytes (an int). Named values are checked as ``lls train`` checks them.
    """

    # Annotated with what the API takes; the first type of each is what a run's config.json holds
    lr: LearningRate = option(
        5e-3, help="learning rate of every block's optimizer", positive=True, maximum=1e3
    )
    weight_decay: float = option(0.0, help="weight decay of every optimizer", minimum=0.0, maximum=1e3)
    optimizer: OptimizerSpec = option(
        "adamw-sf", help="optimizer of every block and of the head", choices=OPTIMIZERS
    )
    lr_schedule: str | ScheduleFactory | None = option(
        "none", help="learning-rate schedule of every optimizer over the epochs", choices=SCHEDULES
    )
    memory: str | int | MemoryPlan | None = option(
        None,
        help="train each block in slices of the batch, holding one slice's activations at a time: "
        "'low' (a budget of twice the least a sliced step needs) or a budget such as 512MiB; "
        "same gradients, local rules only",
        resumable=True,
        distinguishing=False,
    )
    engine: str = option(
        "auto",
        help="how each step is issued: eager (op by op), graph (CUDA graphs, one stream per block), "
        "auto (graph on CUDA, eager on CPU)",
        choices=ENGINES,
        resumable=True,
        distinguishing=False,
    )
    precision: str = option(
        "fp32",
        help="what the forward pass computes in: fp32, or bf16 / fp16 mixed precision (autocast; "
        "weights, updates, the basis and the losses stay float32; fp16 scales each block's loss)",
        choices=tuple(PRECISIONS),
        known="precisions",
    )

    def __post_init__(self) -> None:
        check_fields(self)  # types, as the API's other arguments
        self.check_named()

    def check_named(self) -> None:
        """The checks ``lls train`` runs, on every value given as a name or a number (a factory, a
        per-block list or a budget in bytes is the caller's own): one line naming the flag."""
        values = {"weight_decay": self.weight_decay, "engine": self.engine, "precision": self.precision}
        if isinstance(self.lr, (int, float)):  # a list or a function of the block index: block_lrs checks it
            values["lr"] = self.lr
        if isinstance(self.optimizer, str):
            values["optimizer"] = self.optimizer
        if isinstance(self.lr_schedule, str):
            values["lr_schedule"] = self.lr_schedule
        check_values(StepConfig, values, name=flag)

    def check_for(self, rule: Rule) -> None:
        """Refuses a memory setting that does not parse, or one given to an end-to-end rule or with a
        mixed precision (the sliced step recomputes in float32)."""
        if self.memory is None:
            return
        memory_plan(self.memory)
        if is_mixed(self.precision):
            raise LLSError(f"--memory runs in float32: drop --memory or --precision {self.precision}")
        if rule.timing == "end-to-end":
            raise LLSError(
                f"--memory slices one block's step at a time and {rule.name} back-propagates "
                "through every block at once; drop --memory or pick a local rule"
            )

    def schedule(self, epochs: int) -> ScheduleFactory | None:
        """The learning-rate schedule for a run of ``epochs`` epochs (None: a constant rate)."""
        if isinstance(self.lr_schedule, str):
            return lr_schedule(self.lr_schedule, epochs)
        return self.lr_schedule

    def step_config(self) -> StepConfig:
        """The step's options alone (of a run's configuration, which is a StepConfig and more)."""
        return StepConfig(**{f.name: getattr(self, f.name) for f in STEP_FIELDS})


STEP_FIELDS = options_of(StepConfig)
STEP_OPTIONS = frozenset(f.name for f in STEP_FIELDS)


def step_config(step: StepConfig | None = None, /, **options: Any) -> StepConfig:
    """``step`` (the defaults if None) with ``options`` (the step's options as keywords) replacing its
    values: how the API's keyword arguments (``Trainer(net, rule, lr=1e-3)``) become a StepConfig."""
    unknown = sorted(set(options) - STEP_OPTIONS)
    if unknown:
        raise LLSError(f"unknown step options {unknown}; known: {', '.join(sorted(STEP_OPTIONS))}")
    if step is None:
        return StepConfig(**options)
    step = step.step_config() if type(step) is not StepConfig else step
    return dataclasses.replace(step, **options) if options else step
