"""The trainer: one place that owns every optimizer and the state of a training run.

The step itself (the block-local pass, the update) is :class:`~lls.step.step.Step`'s; the engines
issue it (engine.py, lowmem.py). The paper's evaluation procedure is evaluation.py's, and
:func:`~lls.step.factory.build_trainer` builds a trainer from names.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from ..checks import checked
from ..data.batches import check_batch
from ..errors import LLSError
from ..method.localize import as_local_net
from ..method.net import LocalNet
from ..method.rules import Rule, create_rule
from ..method.signals import BlockSignal
from ..training.config import DEFAULTS, check_step
from . import evaluation as evaluation_
from .engine import GraphEngine, check_capturable, is_capturable, optimizer_engine
from .evaluation import Batch, Evaluation
from .lowmem import LowMemory, MemorySpec, memory_plan
from .optim import LearningRate, OptimizerSpec, block_lrs, check_optimizer, is_schedule_free, make_optimizer
from .precision import Precision
from .schedules import ScheduleFactory, check_schedule
from .step import SERIAL, LocalPass, Schedule, Step, StepResult

NOT_SET_UP = "the trainer has not seen a batch yet: give input_shape=... or train one step first"

__all__ = ["Batch", "Evaluation", "LocalPass", "StepResult", "Trainer"]


class Trainer:
    """Trains a :class:`LocalNet` with a rule: ``Trainer(net, "lls", input_shape=(1, 28, 28))``.

    Without ``input_shape`` (and a network that does not know it), the first batch the trainer
    reads sets it up (:meth:`build_for`), as PyTorch's lazy modules do.

    Every block gets its own optimizer (``optimizer`` by name, schedule-free AdamW by default, lr
    5e-3, the paper's recipe; or a factory ``(params, lr, weight_decay) -> Optimizer``) over its
    parameters plus its signal's extra parameters; the head gets one more. The defaults are
    ``lls train``'s and the values are checked as it checks them. The device and dtype come from
    the network's parameters. ``engine`` says how steps are issued (engine.py): "eager" (op by op,
    the reference), "graph" (CUDA graphs; needs capturable optimizers) or "auto" (graph on CUDA).

    ``memory`` (local rules only): ``None`` for the ordinary step; ``"low"``, or a budget in bytes
    (an int, or a string such as ``"256MiB"``), runs each block's step in slices of the batch with
    the same gradients, holding one slice's activations at a time (``lowmem.py``).

    ``precision``: "fp32", or "bf16" / "fp16" mixed precision (``precision.py``).
    """

    @checked
    def __init__(
        self,
        net: nn.Module,
        rule: Rule | str = DEFAULTS.rule,
        *,
        input_shape: Sequence[int] | None = None,
        optimizer: OptimizerSpec = DEFAULTS.optimizer,
        lr: LearningRate = DEFAULTS.lr,
        weight_decay: float = DEFAULTS.weight_decay,
        engine: str = DEFAULTS.engine,
        memory: MemorySpec = DEFAULTS.memory,
        lr_schedule: ScheduleFactory | None = None,
        precision: str = DEFAULTS.precision,
    ) -> None:
        self.rule = create_rule(rule) if isinstance(rule, str) else rule
        check_step(
            self.rule,
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            engine=engine,
            memory=memory,
            precision=precision,
        )
        check_optimizer(optimizer, weight_decay)  # factories tried now, not at the first step
        check_schedule(lr_schedule)
        self.net, self.lr, self.memory, self.batch_size_in_step = net, lr, memory, 0
        # training steps taken, and that count when BatchNorm's statistics were last refreshed for
        # the weights (an evaluation, a loaded checkpoint): evaluated_state_dict() needs them current
        self.steps_taken, self._statistics_at = 0, 0
        self.input_shape: tuple[int, ...] | None = None  # set by _build, from the first batch if not given
        self._options = dict(
            optimizer=optimizer,
            weight_decay=weight_decay,
            engine=engine,
            lr_schedule=lr_schedule,
            precision=precision,
        )
        known = input_shape if input_shape is not None else getattr(net, "input_shape", None)
        # Without a shape, the first batch builds the rest (as PyTorch's lazy modules); a network that
        # could not be built from one is refused now, with the reason.
        if known is not None or not isinstance(net, (LocalNet, nn.Sequential)):
            self._build(known, **self._options)

    def build_for(self, x: torch.Tensor) -> None:
        """Set up from a batch's inputs (one sample's shape: ``x.shape[1:]``) if no input shape was
        known; nothing once set up. Every batch the trainer reads comes here first."""
        if self.input_shape is None:
            if not isinstance(x, torch.Tensor) or x.dim() < 1:
                raise LLSError(f"a batch must hold an input tensor of samples, got {type(x).__name__}")
            self._build(tuple(x.shape[1:]), **self._options)

    def _first_built(self, batches: Iterable[Batch]) -> Iterable[Batch]:
        """``batches``, read once, the trainer set up from the first of them if it was not."""
        if self.input_shape is not None:
            return batches
        batches = iter(batches)
        first = next(batches, None)
        if first is None:
            return ()
        self.build_for(first[0] if isinstance(first, (tuple, list)) and first else first)
        return itertools.chain([first], batches)

    def _built(self) -> None:
        if self.input_shape is None:
            raise LLSError(NOT_SET_UP)

    def _build(
        self,
        input_shape: Sequence[int] | None,
        *,
        optimizer: OptimizerSpec,
        weight_decay: float,
        engine: str,
        lr_schedule: ScheduleFactory | None,
        precision: str,
    ) -> None:
        """Everything that needs one sample's shape: the blocks, signals, optimizers and engine."""
        net, input_shape = as_local_net(self.net, input_shape)
        lr, memory = self.lr, self.memory
        self.net = net
        self.num_classes = _num_classes(net.head)
        for i, op in enumerate(net.between):
            if any(p.requires_grad for p in op.parameters()):
                raise LLSError(f"the op after block {i} has trainable parameters; put them in a block")
        param = next(net.parameters())
        shapes = net.block_output_shapes(input_shape)
        signals = [
            self.rule.signal(i, shape, pool, self.num_classes)
            for i, (shape, pool) in enumerate(zip(shapes, net.latent_pool, strict=True))
        ]
        self.signals: list[BlockSignal] = [s.to(param.device, param.dtype) for s in signals if s is not None]
        if self.signals and len(self.signals) != len(net.blocks):
            raise ValueError(f"rule {self.rule.name} gave signals to some blocks only")
        groups = [list(block.parameters()) for block in net.blocks]
        for group, signal in zip(groups, self.signals, strict=False):
            group.extend(signal.parameters())
        groups.append(list(net.head.parameters()))
        for i, group in enumerate(groups):
            if not group:
                raise LLSError(f"block {i} has no trainable parameters; merge it into a neighbour")
        self.precision = Precision(precision, param.device, len(groups))
        mode = optimizer_engine(engine, param.device, optimizer)  # "eager" or "graph"
        lrs = block_lrs(lr, len(net.blocks))
        # What keeps a step from being captured: "auto" then steps eagerly, "graph" refuses, naming it
        uncapturable = [
            # a scaler reads its overflow flag on the host
            (
                self.precision.scalers,
                "fp16's gradient scaling cannot be captured: use --engine eager, or bf16",
            ),
            # a captured step holds the whole batch's tensors
            (
                memory is not None,
                "the graph engine captures whole-batch steps and low memory slices them: "
                "use --engine eager with --memory",
            ),
            # a captured step replays the lr it saw
            (
                lr_schedule is not None,
                "the graph engine replays captured steps: use --engine eager with an lr schedule",
            ),
        ]
        reason = next((why for blocked, why in uncapturable if blocked), None)
        if mode == "graph" and reason is not None:
            if engine != "auto":
                raise LLSError(reason)
            mode = "eager"
        capturable = mode == "graph"  # the graph engine gets implementations it can capture
        self.optimizers = [
            make_optimizer(optimizer, group, rate, weight_decay, capturable=capturable)
            for group, rate in zip(groups, lrs, strict=True)
        ]
        if mode == "graph" and not all(is_capturable(o) for o in self.optimizers):
            if engine == "auto":
                mode = "eager"
            else:
                check_capturable(self.optimizers)
        self.schedulers = [lr_schedule(o) for o in self.optimizers] if lr_schedule is not None else []
        self.input_shape = tuple(input_shape)
        plan = memory_plan(memory)
        recompute_all = self.rule.timing == "head"
        self.low_memory = (
            None if plan is None else LowMemory(plan, net, self.input_shape, recompute_all=recompute_all)
        )
        self.step = Step(net, self.rule, self.signals, self.optimizers, self.low_memory, self.precision)
        evaluation_.train_mode(net, self.optimizers)
        # None: the eager step. "auto" steps eagerly where a step cannot be captured.
        self.engine = (
            GraphEngine(self.step, self.input_shape, strict=engine == "graph") if mode == "graph" else None
        )

    @property
    def sync_gradients(self) -> Callable[[torch.optim.Optimizer], None] | None:
        """Called with an optimizer between its gradients and its step (data parallelism's hook)."""
        return self.step.sync_gradients

    @sync_gradients.setter
    def sync_gradients(self, hook: Callable[[torch.optim.Optimizer], None] | None) -> None:
        self.step.sync_gradients = hook

    # --- training ------------------------------------------------------------------------------

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """One minibatch: every block updated from its own signal, the head from cross-entropy."""
        self.build_for(x)
        x, y = check_batch(
            (x, y),
            self.input_shape,
            self.num_classes,
            next(self.net.parameters()),
            integer_inputs=self._integer,
        )
        self.batch_size_in_step = len(y)  # read by data parallelism to weight this process's gradients
        self.steps_taken += 1
        # Checked here, on the host, for every engine: a replayed graph runs no optimizer's own check
        if not self.net.training or any(
            is_schedule_free(o) and not o.param_groups[0]["train_mode"] for o in self.optimizers
        ):
            raise LLSError(
                "a training step inside evaluation() (the network in eval mode, schedule-free optimizers "
                "on their averaged weights); step after the evaluation has ended"
            )
        if self.engine is not None:
            return self.engine.step(x, y)
        return self.step.eager(x, y)

    def local_pass(
        self,
        h: torch.Tensor,
        y: torch.Tensor,
        consume: Callable[[int, torch.Tensor], torch.Tensor],
        blocks: range | None = None,
        *,
        signals: Sequence[Callable[..., torch.Tensor]] | None = None,
        schedule: Schedule = SERIAL,
    ) -> LocalPass:
        """The block-local step over ``blocks``: :meth:`lls.step.step.Step.local_pass`."""
        return self.step.local_pass(h, y, consume, blocks, signals=signals, schedule=schedule)

    def update(self, index: int, loss: torch.Tensor) -> torch.Tensor:
        """Backward of block ``index``'s loss (L: the head's) and a step of that block's optimizer."""
        self.steps_taken += 1
        return self.step.update(index, loss)

    # --- evaluation ----------------------------------------------------------------------------

    def evaluation(self, refresh: Iterable[Batch] = ()) -> AbstractContextManager[LocalNet]:
        """The paper's evaluation procedure (evaluation.py); yields the network. Everything it
        changes (parameters, BatchNorm statistics, modes) is put back on exit, bit for bit."""
        refresh = self._first_built(refresh)
        self._built()  # no refresh batch to set up from
        return evaluation_.evaluation(self.net, self.optimizers, self.checked(refresh))

    def evaluated_state_dict(self, refresh: Iterable[Batch] | None = None) -> dict[str, torch.Tensor]:
        """The state of the model the evaluation measures: the averaged weights of schedule-free
        optimizers (the training weights otherwise) and BatchNorm statistics refreshed for them,
        keyed as the model given to :func:`~lls.localize` (else as the network). After ``lls.fit``,
        ``model.load_state_dict(trainer.evaluated_state_dict())`` makes ``model`` the one whose
        test accuracy fit reported. The statistics are those of the last evaluation (``fit``'s,
        ``evaluate``'s, or a loaded checkpoint's); after training steps since, give ``refresh``
        batches (``fit`` uses 50 training batches). The trainer itself is left as it was."""
        self._built()
        stale = self.steps_taken - self._statistics_at
        if refresh is None and stale and _has_statistics(self.net):
            raise LLSError(
                f"the network trained {stale} step(s) since its BatchNorm statistics were last "
                "refreshed: give refresh=training batches, or evaluate first"
            )
        source = getattr(self.net, "localized_from", None) or self.net
        with evaluation_.evaluation(self.net, self.optimizers, self.checked(refresh or ())) as net:
            values = {id(t): t for t in itertools.chain(net.parameters(), net.buffers())}
            return {
                name: values.get(id(t), t).detach().clone()
                for name, t in source.state_dict(keep_vars=True).items()
            }

    def evaluate(
        self,
        batches: Iterable[Batch],
        refresh: Iterable[Batch] = (),
        *,
        blocks: bool = False,
        probe_batches: Iterable[Batch] = (),
    ) -> Evaluation:
        """Loss and accuracy of the evaluation-mode network on ``batches`` (evaluation.py); with
        ``blocks``, also each block's own accuracy."""
        refresh = self._first_built(refresh)
        batches = self._first_built(batches)
        if self.input_shape is None:  # neither gave a batch to set up from
            raise LLSError("evaluation got no batches")
        self._statistics_at = self.steps_taken  # the statistics it refreshes stay (evaluation.py)
        return evaluation_.evaluate(
            self.net,
            self.optimizers,
            self.signals,
            self.num_classes,
            self.checked(batches),
            self.checked(refresh),
            blocks=blocks,
            probe_batches=probe_batches,
        )

    def checked(self, batches: Iterable[Batch]) -> Iterable[Batch]:
        """``batches`` checked and moved to the network's device (:func:`~lls.data.batches.check_batch`)."""
        like = next(self.net.parameters())
        return (
            check_batch(b, self.input_shape, self.num_classes, like, integer_inputs=self._integer)
            for b in batches
        )

    @property
    def _integer(self) -> bool:
        """Whether the network takes integer inputs (token ids: ``lls.localize(..., example=...)``)."""
        return getattr(self.net, "input_dtype", None) is not None

    # --- state ---------------------------------------------------------------------------------

    def extra_parameters(self) -> list[int]:
        """Trainable parameters each block's rule adds (0 for fixed bases, K for LLS-M, ...)."""
        self._built()
        if not self.signals:
            return [0] * len(self.net.blocks)
        return [sum(p.numel() for p in s.parameters() if p.requires_grad) for s in self.signals]

    def state_dict(self) -> dict[str, Any]:
        self._built()
        return {
            "net": self.net.state_dict(),
            "signals": [s.state_dict() for s in self.signals],
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            **({"scalers": self.precision.state_dict()} if self.precision.scalers else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._built()
        if self.engine is not None:  # optimizer state tensors are replaced: captured steps are stale
            self.engine.reset()
        self.net.load_state_dict(state["net"])
        for signal, signal_state in zip(self.signals, state["signals"], strict=True):
            signal.load_state_dict(signal_state)
        for optimizer, optimizer_state in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(optimizer_state)
        self.precision.load_state_dict(state.get("scalers"))
        for scheduler, scheduler_state in zip(self.schedulers, state.get("schedulers", []), strict=True):
            scheduler.load_state_dict(scheduler_state)
        self._statistics_at = self.steps_taken  # a checkpoint holds its last evaluation's statistics

    def end_epoch(self) -> None:
        """Step every learning-rate schedule (once per epoch)."""
        for scheduler in self.schedulers:
            scheduler.step()


def _has_statistics(net: nn.Module) -> bool:
    """Whether ``net`` keeps running statistics that training steps change (BatchNorm's)."""
    return any(getattr(m, "track_running_stats", False) for m in net.modules())


def _num_classes(head: nn.Module) -> int:
    if isinstance(head, nn.Linear):
        return head.out_features
    last = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise LLSError("cannot tell the number of classes: the head has no nn.Linear")
    return last[-1].out_features
