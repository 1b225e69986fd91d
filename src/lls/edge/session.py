"""A training program from a run, and back: ``lls export --training``, ``lls edge train`` and
``lls edge check``.

- :func:`export_training`: a run's evaluated network (the weights and BatchNorm statistics
  ``lls eval`` measures; a schedule-free run's averaged weights) as a training program with the
  runtime's SGD; the run's configuration, normalisation and class names go into its metadata.
- :func:`program_trainer`: an ``lls`` trainer at the program's own starting state (its parameters
  read from the runtime, its statistics from the program's constant methods), stepping with the
  SGD the runtime has: what ``edge check`` compares with and ``edge train`` evaluates and saves with.
- :func:`train_program`: the device loop (:class:`~lls.edge.runtime.ProgramRunner`) over a
  dataset's batches inside ``lls``'s epoch loop (progress bar, evaluation, epoch records).
- :func:`check_program`: the same steps from the same state and batches in the runtime and in the
  trainer, and the largest relative difference of any parameter or statistic.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from ..errors import LLSError
from ..files import atomic_write
from ..step.factory import build_trainer
from ..step.optim import OPTIMIZERS
from ..step.step import StepResult
from ..step.trainer import Trainer
from ..training.config import TrainConfig
from ..training.fit import Loaders, Strategy, train_epoch
from .programs import RUNTIME_OPTIMIZER, SGD_MOMENTUM, BuiltProgram, build_program
from .runtime import ProgramRunner

Batch = tuple[torch.Tensor, torch.Tensor]


def check_optimizer(name: str) -> None:
    """Refuse an optimizer ExecuTorch's training runtime does not have (it has SGD only)."""
    OPTIMIZERS.get(name)  # an unknown name lists the known ones
    if name != RUNTIME_OPTIMIZER:
        raise LLSError(
            f"ExecuTorch's training runtime has no {name} optimizer, only SGD: export with --optimizer "
            f"sgd (momentum {SGD_MOMENTUM}, as lls's sgd) and choose its --lr"
        )


# --- a run to a program -------------------------------------------------------------------------


def export_training(
    run: str | Path,
    out: str | Path,
    *,
    batch_size: int | None = None,
    optimizer: str | None = None,
    lr: float | None = None,
    max_memory: int | None = None,
    data_dir: str | None = None,
    download: bool = True,
) -> BuiltProgram:
    """Write run ``run``'s evaluated network to ``out`` as a training program (see programs.py);
    nothing is written if anything is refused."""
    from ..training.run import open_trained
    from ..training.trained import describe_run, evaluation_refresh
    from . import require_executorch

    require_executorch()
    out = Path(out)
    if out.is_dir():
        raise LLSError(f"{out} is a directory; give the file to write, e.g. {out / 'train.pte'}")
    _, state, session = open_trained(run, device=torch.device("cpu"), data_dir=data_dir, download=download)
    config = session.config
    check_optimizer(optimizer or config.optimizer)
    if config.precision != "fp32":
        raise LLSError(f"training programs are float32; the run trains in {config.precision}")
    batch = batch_size or config.batch_size
    info = {
        **describe_run(session),
        "config": config.as_dict(),
        "source_run": str(run),
        "epoch": state["epoch"],
    }
    with session.trainer.evaluation(evaluation_refresh(session, state)):
        built = build_program(
            session.trainer,
            batch,
            lr=lr if lr is not None else config.lr,
            weight_decay=config.weight_decay,
            info=info,
            max_memory=max_memory,
        )
    atomic_write(out, built.buffer)
    return built


# --- a program back to an lls trainer -----------------------------------------------------------


def program_config(runner: ProgramRunner, **changes: Any) -> TrainConfig:
    """The run configuration the program was exported from, with ``changes`` (and SGD)."""
    info = runner.layout.info
    if "config" not in info:
        raise LLSError(
            "the program does not say which run it came from; export it with `lls export --training`"
        )
    values = {**info["config"], "optimizer": RUNTIME_OPTIMIZER, "lr": runner.optimizer["lr"]}
    values.update({k: v for k, v in changes.items() if v is not None})
    values.update(channels_last=False, engine="eager", memory=None, lr_schedule="none")
    return TrainConfig.from_dict(values, where="the program's run configuration: ")


def program_trainer(runner: ProgramRunner, config: TrainConfig) -> Trainer:
    """A trainer of ``config`` (stepping with lls's SGD, momentum 0.9, as the runtime does) at the
    program's starting state: every parameter the program holds and its running statistics."""
    layout = runner.layout
    trainer = build_trainer(
        config.model,
        config.rule,
        tuple(layout.input_shape),
        layout.num_classes,
        rule_options=config.rule_options,
        model_options=config.model_options,
        seed=config.seed,
        channels_last=False,
        optimizer=RUNTIME_OPTIMIZER,
        lr=runner.optimizer["lr"],
        weight_decay=runner.optimizer["weight_decay"],
        engine="eager",
    )
    load_state(trainer, initial_state(runner))
    return trainer


def initial_state(runner: ProgramRunner) -> dict[str, torch.Tensor]:
    """The program's starting parameters and statistics by the run's names, read from a fresh copy
    of the program (a method gives its parameters only once it has run: each runs once on zeros)."""
    fresh = ProgramRunner(runner.buffer)
    for method in fresh.layout.methods:
        fresh.parameters(method)
    return fresh.state()


def run_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The trainer's parameters and statistics under the names a program's layout uses."""
    state = {
        f"net.{k}": v for k, v in trainer.net.state_dict().items() if not k.endswith("num_batches_tracked")
    }
    for i, signal in enumerate(trainer.signals):
        state.update({f"signals.{i}.{k}": v for k, v in signal.state_dict().items()})
    return state


def load_state(trainer: Trainer, values: dict[str, torch.Tensor], steps: int = 0) -> None:
    """Copy ``values`` (by the run's names) into the trainer; ``steps`` more batches counted by
    every BatchNorm (``num_batches_tracked``, which the momentum update does not read)."""
    target = run_state(trainer)
    missing = sorted(set(target) - set(values))
    unknown = sorted(set(values) - set(target))
    if missing or unknown:
        raise LLSError(
            f"the program does not fit its run's model (missing {missing[:3]}, unknown {unknown[:3]}); "
            "export it again from the run"
        )
    with torch.no_grad():
        for name, value in values.items():
            target[name].copy_(value.view_as(target[name]))
        for module in trainer.net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and steps:
                module.num_batches_tracked += steps


# --- the device loop inside lls's epochs ----------------------------------------------------------


def full_batches(batches: Iterable[Batch], size: int) -> Iterator[Batch]:
    """The batches of exactly ``size`` samples (a program has fixed shapes): a short last one is dropped."""
    return ((x, y) for x, y in batches if len(y) == size)


class RuntimeStrategy(Strategy):
    """Trains every epoch in ExecuTorch's runtime; after each, the device's weights and statistics
    go into the trainer, which evaluates them as they are (no BatchNorm refresh: the statistics the
    device keeps are the ones its model uses) and is what a run directory saves."""

    def __init__(self, runner: ProgramRunner, steps: int | None = None) -> None:
        self.runner, self.steps, self.done = runner, steps, 0  # steps: in all (None: whole epochs)

    def describe(self) -> str:
        return "ExecuTorch runtime"

    def train_epoch(self, trainer: Trainer, loaders: Loaders, epoch: int, **options) -> Any:
        loader = loaders.train
        batches = full_batches(loader.epoch(epoch), self.runner.batch_size)
        if self.steps is not None:
            batches = islice(batches, self.steps - self.done)
        options.pop("resume", None)
        done = train_epoch(trainer, loader, epoch, batches=batches, step_fn=self.step, **options)
        load_state(trainer, self.runner.state(), steps=done.step)
        self.done += done.step
        return done

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        outcome = self.runner.step(x, y)
        return StepResult(outcome.logits, torch.tensor(outcome.loss), torch.tensor(outcome.block_losses))

    def evaluate(self, trainer: Trainer, loaders: Loaders, epoch: int, blocks: bool):
        import time

        start = time.perf_counter()
        probes = loaders.probe.epoch() if blocks and loaders.probe is not None else ()
        result = trainer.evaluate(loaders.test.epoch(), blocks=blocks, probe_batches=probes)
        return result, time.perf_counter() - start


# --- runtime against lls --------------------------------------------------------------------------


@dataclass
class CheckResult:
    """``edge check``'s figures: relative differences ``max|a - b| / max|b|`` per tensor."""

    steps: int
    largest: float  # runtime against lls's float32 trainer, over every parameter and statistic
    where: str  # the tensor it is in
    losses: float  # the largest difference of any step's head or block loss (absolute)
    float64: float  # lls's float32 trainer against the same in float64: float32's own rounding
    float64_where: str
    tensors: int
    after: list[dict[str, float]] = dataclasses.field(default_factory=list)  # both figures after each step

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def relative_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    for name, ref in b.items():
        ref = ref.double()
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        diff = float((a[name].double() - ref).abs().max()) if ref.numel() else 0.0
        out[name] = diff / scale if scale > 0 else diff
    return out


def check_program(
    runner: ProgramRunner, trainer: Trainer, batches: Iterable[Batch], steps: int
) -> CheckResult:
    """Run ``steps`` batches in the runtime and in ``trainer`` (at the program's state) and compare."""
    trainer64 = double_trainer(trainer)
    losses = 0.0
    done = 0
    after: list[dict[str, float]] = []
    for x, y in islice(full_batches(batches, runner.batch_size), steps):
        outcome = runner.step(x, y)
        result = trainer.train_step(x, y)
        trainer64.train_step(x.double(), y)
        mine = torch.tensor([*outcome.block_losses, outcome.loss], dtype=torch.float64)
        theirs = torch.cat([result.block_losses.double(), result.loss.double().view(1)])
        losses = max(losses, float((mine - theirs).abs().max()))
        done += 1
        expected = run_state(trainer)
        runtime = max(relative_differences(runner.state(), expected).values())
        rounding = max(relative_differences(run_state(trainer64), expected).values())
        after.append({"step": done, "largest": runtime, "float64": rounding})
    if done < steps:
        raise LLSError(
            f"the dataset gives {done} full batches of {runner.batch_size}, fewer than --steps {steps}"
        )
    expected = run_state(trainer)
    runtime = relative_differences(runner.state(), expected)
    rounding = relative_differences(run_state(trainer64), expected)
    worst, worst64 = max(runtime, key=runtime.get), max(rounding, key=rounding.get)
    return CheckResult(done, runtime[worst], worst, losses, rounding[worst64], worst64, len(expected), after)


def double_trainer(trainer: Trainer) -> Trainer:
    """The same trainer in float64 (the same rule, state and SGD), for float32's own rounding."""
    net = copy.deepcopy(trainer.net).double()
    twin = Trainer(
        net,
        trainer.rule,
        input_shape=trainer.input_shape,
        optimizer=RUNTIME_OPTIMIZER,
        lr=trainer.config.lr,
        weight_decay=trainer.optimizers[0].param_groups[0]["weight_decay"],
        engine="eager",
    )
    with torch.no_grad():
        for mine, theirs in zip(twin.signals, trainer.signals, strict=True):
            for p, q in zip(mine.parameters(), theirs.parameters(), strict=True):
                p.copy_(q)
    return twin


__all__ = [
    "CheckResult",
    "RuntimeStrategy",
    "check_optimizer",
    "check_program",
    "export_training",
    "initial_state",
    "load_state",
    "program_config",
    "program_trainer",
    "run_state",
]
