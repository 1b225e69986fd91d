"""The trainer: one place that owns every optimizer and runs every backward pass.

A training step walks the blocks in order. Each block gets a *detached* copy of its input, so no
gradient can cross from one block to the one before it; its output goes to its rule's signal, whose
loss updates that block (and the signal's own parameters) with the block's own optimizer. The head
learns with ordinary cross-entropy on its detached input. BP is the exception that proves the rule:
one loss at the head, one backward pass through everything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import check_batch
from ..errors import LLSError
from ..method.localize import as_local_net
from ..method.models import create_model
from ..method.net import LocalNet, Spec
from ..method.rules import Rule, create_rule, seeded_options
from ..method.signals import BlockSignal
from .engine import SERIAL, GraphEngine, Schedule, check_capturable, is_capturable, optimizer_engine
from .lowmem import LowMemory, MemorySpec, SlicedBlock, memory_plan
from .optim import LearningRate, OptimizerSpec, block_lrs, is_schedule_free, make_optimizer
from .schedules import SCHEDULES, ScheduleFactory

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class StepResult:
    """What one training step measured; tensors are detached and stay on the device."""

    logits: torch.Tensor  # (N, K) head output in training mode
    loss: torch.Tensor  # head cross-entropy
    block_losses: torch.Tensor  # (L,) each block's local loss; empty for rules without any (bp)


@dataclass
class LocalPass:
    """What :meth:`Trainer.local_pass` over a range of blocks produced."""

    output: torch.Tensor  # the head's logits (detached), or the input of the block after the range
    loss: torch.Tensor | None  # the head's cross-entropy, when the range ends with the last block
    block_losses: torch.Tensor  # (blocks in the range,) each block's local loss


@dataclass
class Evaluation:
    loss: float  # mean cross-entropy of the head
    accuracy: float  # 0..1
    block_accuracy: list[float]  # each block's own accuracy (empty unless asked for)
    readout: str | None = None  # how blocks were read out: "basis", "learned classifier", "ridge probe"


class Trainer:
    """Trains a :class:`LocalNet` with a rule: ``Trainer(net, "lls", input_shape=(1, 28, 28))``.

    Every block gets its own optimizer (``optimizer`` by name, schedule-free AdamW by default, lr
    5e-3, the paper's recipe; or a factory ``(params, lr, weight_decay) -> Optimizer``) over its
    parameters plus its signal's extra parameters; the head gets one more. The device and dtype
    come from the network's parameters. ``engine`` says how steps are issued (engine.py): "eager"
    (op by op, the reference), "graph" (CUDA graphs; needs capturable optimizers) or "auto".

    ``memory`` (local rules only): ``None`` for the ordinary step; ``"low"``, or a budget in bytes
    (an int, or a string such as ``"256MiB"``), runs each block's step in slices of the batch with
    the same gradients, holding one slice's activations at a time (``lowmem.py``).
    """

    def __init__(
        self,
        net: LocalNet,
        rule: Rule | str = "lls",
        *,
        input_shape: Sequence[int] | None = None,
        optimizer: OptimizerSpec = "adamw-sf",
        lr: LearningRate = 5e-3,
        weight_decay: float = 0.0,
        engine: str = "eager",
        memory: MemorySpec = None,
        lr_schedule: ScheduleFactory | None = None,
    ) -> None:
        net, input_shape = as_local_net(net, input_shape)
        self.net = net
        self.rule = create_rule(rule) if isinstance(rule, str) else rule
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
        mode = optimizer_engine(engine, param.device, optimizer)  # "eager" or "graph"
        if mode == "graph" and memory is not None:  # a captured step holds the whole batch's tensors
            if engine != "auto":
                raise LLSError(
                    "the graph engine captures whole-batch steps and low memory slices them: "
                    "use --engine eager with --memory"
                )
            mode = "eager"
        lrs = block_lrs(lr, len(net.blocks))
        if lr_schedule is not None and mode == "graph":  # a captured step replays the lr it saw
            if engine != "auto":
                raise LLSError(
                    "the graph engine replays captured steps: use --engine eager with an lr schedule"
                )
            mode = "eager"
        # the graph engine gets implementations it can capture
        capturable = mode == "graph"
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
        self.lr = lr
        self.input_shape = tuple(input_shape)
        # Called with an optimizer between its gradients and its step; data parallelism averages the
        # gradients across processes here, so every block still steps on its own signal alone.
        self.sync_gradients: Callable[[torch.optim.Optimizer], None] | None = None
        self.batch_size_in_step = 0
        self.memory = memory
        self.low_memory = self._low_memory(memory_plan(memory))
        self._train_mode()
        # None: the eager step below. "auto" steps eagerly where a step cannot be captured.
        self.engine = GraphEngine(self, strict=engine == "graph") if mode == "graph" else None

    def _low_memory(self, plan) -> LowMemory | None:
        if plan is None:
            return None
        if self.rule.timing == "end-to-end":
            raise LLSError(
                f"{self.rule.name.upper()} back-propagates through every block at once; low memory runs "
                "one block's step at a time in slices, so it needs a local rule: drop the memory setting "
                f"for {self.rule.name}"
            )
        return LowMemory(plan, self.net, self.input_shape, recompute_all=self.rule.timing == "head")

    # --- training ------------------------------------------------------------------------------

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """One minibatch: every block updated from its own signal, the head from cross-entropy."""
        x, y = check_batch((x, y), self.input_shape, self.num_classes, next(self.net.parameters()))
        self.batch_size_in_step = len(y)  # read by data parallelism to weight this process's gradients
        if self.engine is not None:
            return self.engine.step(x, y)
        return self.eager_step(x, y)

    def eager_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """The training step op by op (the ``eager`` engine)."""
        if self.rule.timing == "end-to-end":
            return self.end_to_end_step(x, y)
        done = self.local_pass(x, y, self.update)
        return StepResult(done.output, done.loss, done.block_losses)

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
        """The block-local step of a local rule over ``blocks`` (all of them by default), ``h`` being
        the input of the first. Each block sees a detached input; its loss goes to
        ``consume(index, loss)`` as soon as it is known (index L is the head's, when the range ends
        with the last block), and ``consume`` runs the backward pass.

        Training passes :meth:`update` (backward + that block's optimizer step); a pipeline stage
        passes its own range of blocks; diagnostics pass a function that only collects gradients.
        ``signals`` replaces the blocks' loss functions (the graph engine's fused ones) and
        ``schedule`` says where each block's work is issued (engine.py; in program order by default).
        """
        net = self.net
        blocks = range(len(net.blocks)) if blocks is None else blocks
        signals = self.signals if signals is None else signals
        waits_for_head = self.rule.timing == "head"
        if waits_for_head and blocks.stop != len(net.blocks):
            raise ValueError(f"rule {self.rule.name} needs the head's output for every block")
        if waits_for_head and schedule is not SERIAL:
            raise ValueError(f"rule {self.rule.name} waits for the head: its blocks cannot overlap")
        slicer = self.low_memory.slicer(net, len(y)) if self.low_memory is not None else None
        block_losses, held = [], []  # held: block outputs waiting for the head's output (DFA)
        loss = None
        walk = net.walk(h, blocks, detach=True, slicer=slicer)
        for index in range(blocks.start, blocks.stop + 1):
            with schedule.issue(index):
                _, a = next(walk)  # the fixed op after the previous block, then this block
                if index == blocks.stop:  # the head's logits, or the next stage's input
                    output = a
                    if blocks.stop == len(net.blocks):
                        loss = consume(index, F.cross_entropy(output, y))
                        output = output.detach()
                    continue
                schedule.ready(index, a)
                if waits_for_head:
                    held.append((index, a))
                else:
                    block_losses.append(consume(index, self._block_loss(signals[index], a, y)))
        while held:  # each block's output let go of once its update is done
            index, a = held.pop(0)
            block_losses.append(consume(index, self._block_loss(signals[index], a, y, output)))
        schedule.join()
        losses = torch.stack(block_losses) if block_losses else h.new_zeros(0)
        return LocalPass(output, loss, losses)

    @staticmethod
    def _block_loss(
        signal: Callable[..., torch.Tensor],
        a: torch.Tensor | SlicedBlock,
        y: torch.Tensor,
        logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A block's local loss from its output ``a`` (or its sliced step's)."""
        if isinstance(a, SlicedBlock):
            return a.loss(signal, y, logits)
        return signal(a, y, logits)

    def update(self, index: int, loss: torch.Tensor) -> torch.Tensor:
        """Backward of block ``index``'s loss (L: the head's) and a step of that block's optimizer."""
        optimizer = self.optimizers[index]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.sync_gradients is not None:
            self.sync_gradients(optimizer)
        optimizer.step()
        return loss.detach()

    def end_to_end_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """BP's step: one loss at the head, one backward pass through everything."""
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        for optimizer in self.optimizers:
            if self.sync_gradients is not None:
                self.sync_gradients(optimizer)
            optimizer.step()
        return StepResult(logits.detach(), loss.detach(), loss.new_zeros(0))

    # --- evaluation ----------------------------------------------------------------------------

    def _train_mode(self) -> None:
        for optimizer in self.optimizers:
            if is_schedule_free(optimizer):
                optimizer.train()
        self.net.train()

    @contextmanager
    def evaluation(self, refresh: Iterable[Batch] = ()) -> Iterator[LocalNet]:
        """The paper's evaluation procedure, undone on exit.

        Switch schedule-free optimizers to their averaged weights, refresh BatchNorm statistics by
        forwarding the ``refresh`` batches in train mode without gradients, then put the network in
        eval mode. Yields the network, ready for inference.
        """
        for optimizer in self.optimizers:
            if is_schedule_free(optimizer):
                optimizer.eval()
        try:
            self.net.train()
            with torch.no_grad():
                for x, _ in self.checked(refresh):
                    self.net(x)
            self.net.eval()
            yield self.net
        finally:
            self._train_mode()

    @torch.no_grad()
    def evaluate(
        self,
        batches: Iterable[Batch],
        refresh: Iterable[Batch] = (),
        *,
        blocks: bool = False,
        probe_batches: Iterable[Batch] = (),
    ) -> Evaluation:
        """Loss and accuracy of the evaluation-mode network on ``batches`` (the paper's procedure).

        With ``blocks``, also each block's own accuracy (see ``readout.py``): the rule's basis or
        learned classifier where it has one, else ridge probes fitted on ``probe_batches``.
        """
        from ..method.readout import block_predictions, fit_probes, readout_kind

        total_loss = torch.zeros((), dtype=torch.float64)
        correct, count = 0, 0
        kind = readout_kind(self.signals) if blocks else None
        block_correct = [0] * len(self.net.blocks)
        with self.evaluation(refresh) as net:
            probes = fit_probes(net, probe_batches, self.num_classes) if kind == "ridge probe" else None
            for x, y in self.checked(batches):
                if kind is None:
                    logits = net(x)
                else:
                    *outputs, (_, logits) = net.walk(x)
                    for i, a in outputs:
                        predicted = block_predictions(self.signals, probes, i, a, net.latent_pool[i])
                        block_correct[i] += int((predicted == y).sum())
                total_loss += F.cross_entropy(logits, y, reduction="sum").double().cpu()
                correct += int((logits.argmax(1) == y).sum())
                count += len(y)
        if count == 0:
            raise LLSError("evaluation got no batches")
        block_accuracy = [c / count for c in block_correct] if kind is not None else []
        return Evaluation(float(total_loss) / count, correct / count, block_accuracy, kind)

    def checked(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        like = next(self.net.parameters())
        return (check_batch(b, self.input_shape, self.num_classes, like) for b in batches)

    # --- state ---------------------------------------------------------------------------------

    def extra_parameters(self) -> list[int]:
        """Trainable parameters each block's rule adds (0 for fixed bases, K for LLS-M, ...)."""
        if not self.signals:
            return [0] * len(self.net.blocks)
        return [sum(p.numel() for p in s.parameters() if p.requires_grad) for s in self.signals]

    def state_dict(self) -> dict[str, Any]:
        return {
            "net": self.net.state_dict(),
            "signals": [s.state_dict() for s in self.signals],
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.engine is not None:  # optimizer state tensors are replaced: captured steps are stale
            self.engine.reset()
        self.net.load_state_dict(state["net"])
        for signal, signal_state in zip(self.signals, state["signals"], strict=True):
            signal.load_state_dict(signal_state)
        for optimizer, optimizer_state in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(optimizer_state)
        for scheduler, scheduler_state in zip(self.schedulers, state.get("schedulers", []), strict=True):
            scheduler.load_state_dict(scheduler_state)

    def end_epoch(self) -> None:
        """Step every learning-rate schedule (once per epoch)."""
        for scheduler in self.schedulers:
            scheduler.step()


class HasShape(Protocol):
    input_shape: tuple[int, int, int]
    num_classes: int


def build_trainer(
    model: str | Sequence[Spec],
    rule: Rule | str,
    data: HasShape | Sequence[int],
    num_classes: int | None = None,
    *,
    rule_options: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
    optimizer: OptimizerSpec = "adamw-sf",
    lr: LearningRate = 5e-3,
    weight_decay: float = 0.0,
    engine: str = "eager",
    memory: MemorySpec = None,
    lr_schedule: str | ScheduleFactory | None = None,
    epochs: int = 1,
) -> Trainer:
    """A trainer for a model (a registered name, or a list of block specs) and a rule: the one way
    every command builds one.

    ``data`` is a dataset (its input shape and class count are used) or an input shape ``(C, H,
    W)`` with ``num_classes``. ``seed`` seeds the initial weights and, for rules that draw fixed
    random tensors (a random basis, feedback matrices), those too. The network is built with the
    rule's activation (Tanh for DRTP) and ``model_options`` (:class:`~lls.method.models.ModelOptions`,
    e.g. ``{"dense_latent": "output"}``), on ``device``, optionally in channels-last layout, and
    steps with ``engine`` ("eager", "graph" or "auto"; see engine.py). ``memory``: the low-memory
    step, see :class:`Trainer`. ``lr_schedule``: a schedule's name (over ``epochs`` epochs) or factory.

    ``build_trainer("smallconv", "lls", (1, 28, 28), 10, rule_options={"basis": "periodic"})``
    """
    if num_classes is None:
        if not hasattr(data, "input_shape"):
            raise TypeError("build_trainer needs a dataset, or an input shape and num_classes")
        input_shape, num_classes = tuple(data.input_shape), data.num_classes
    else:
        input_shape = tuple(data)
    if isinstance(rule, str):
        rule = create_rule(rule, **seeded_options(rule, rule_options or {}, seed))
    elif rule_options:
        raise TypeError("rule_options go with a rule name, not a Rule object")
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
        lr_schedule=SCHEDULES.get(lr_schedule)(epochs) if isinstance(lr_schedule, str) else lr_schedule,
    )


def _num_classes(head: nn.Module) -> int:
    if isinstance(head, nn.Linear):
        return head.out_features
    last = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise LLSError("cannot tell the number of classes: the head has no nn.Linear")
    return last[-1].out_features
