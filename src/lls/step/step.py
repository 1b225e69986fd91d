"""The training step of a rule, apart from who owns it: the block-local pass and the update.

A local step walks the blocks in order. Each block gets a *detached* copy of its input, so no
gradient can cross from one block to the one before it; its output goes to its rule's signal, whose
loss updates that block (and the signal's own parameters) with the block's own optimizer. The head
learns with ordinary cross-entropy on its detached input. BP is the exception that proves the rule:
one loss at the head, one backward pass through everything (:meth:`Step.end_to_end`).

The engines (engine.py: eager, graph; lowmem.py: sliced) issue this one step; none of them holds a
copy of it. The :class:`~lls.step.trainer.Trainer` owns the optimizers and the state it reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..method.net import LocalNet
from ..method.rules import Rule
from ..method.signals import BlockSignal
from .lowmem import LowMemory
from .precision import FP32, Precision


@dataclass
class StepResult:
    """What one training step measured; tensors are detached and stay on the device."""

    logits: torch.Tensor  # (N, K) head output in training mode
    loss: torch.Tensor  # head cross-entropy
    block_losses: torch.Tensor  # (L,) each block's local loss; empty for rules without any (bp)


@dataclass
class LocalPass:
    """What :meth:`Step.local_pass` over a range of blocks produced."""

    output: torch.Tensor  # the head's logits (detached), or the input of the block after the range
    loss: torch.Tensor | None  # the head's cross-entropy, when the range ends with the last block
    block_losses: torch.Tensor  # (blocks in the range,) each block's local loss


class Schedule(Protocol):
    """Where :meth:`Step.local_pass` issues each block's work (engine.py's module docstring)."""

    def issue(self, index: int) -> Any: ...  # context manager around block ``index``'s work
    def ready(self, index: int, output: torch.Tensor) -> None: ...  # block ``index``'s output exists
    def join(self) -> None: ...  # before the blocks' results are read on the calling stream


class SerialSchedule:
    """Everything on the calling stream, in program order: the eager step."""

    def issue(self, index: int):
        return nullcontext()

    def ready(self, index: int, output: torch.Tensor) -> None:
        pass

    def join(self) -> None:
        pass


SERIAL = SerialSchedule()


class Step:
    """A rule's training step on ``net``: block ``i`` steps ``optimizers[i]`` on ``signals[i]``'s
    loss (index L: the head's, on cross-entropy). ``low_memory`` slices the blocks' steps."""

    def __init__(
        self,
        net: LocalNet,
        rule: Rule,
        signals: Sequence[BlockSignal],
        optimizers: Sequence[torch.optim.Optimizer],
        low_memory: LowMemory | None = None,
        precision: Precision = FP32,
    ) -> None:
        self.net, self.rule, self.signals, self.optimizers = net, rule, signals, optimizers
        self.low_memory = low_memory
        self.precision = precision  # where autocast runs, and fp16's gradient scalers (precision.py)
        # Called with an optimizer between its gradients and its step; data parallelism averages the
        # gradients across processes here, so every block still steps on its own signal alone.
        self.sync_gradients: Callable[[torch.optim.Optimizer], None] | None = None

    def eager(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        signals: Sequence[Callable[..., torch.Tensor]] | None = None,
        schedule: Schedule = SERIAL,
    ) -> StepResult:
        """The whole step op by op (the eager engine; the graph engine captures it)."""
        if self.rule.timing == "end-to-end":
            return self.end_to_end(x, y)
        done = self.local_pass(x, y, self.update, signals=signals, schedule=schedule)
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
        low = self.low_memory
        slicer = low.slicer(net, len(y)) if low is not None else None
        block_loss = low.block_loss if low is not None else self.precision.signal_loss
        block_losses, held = [], []  # held: block outputs waiting for the head's output (DFA)
        loss = None
        walk = net.walk(h, blocks, detach=True, slicer=slicer)
        autocast = self.precision.autocast
        for index in range(blocks.start, blocks.stop + 1):
            with schedule.issue(index):
                with autocast():
                    _, a = next(walk)  # the fixed op after the previous block, then this block
                if index == blocks.stop:  # the head's logits, or the next stage's input
                    output = self.precision.restore(a)  # float32, whatever autocast computed in
                    if blocks.stop == len(net.blocks):
                        with autocast():  # (autocast's cross-entropy is float32)
                            head_loss = F.cross_entropy(output, y)
                        loss = consume(index, head_loss)
                        output = output.detach()
                    continue
                schedule.ready(index, a)
                if waits_for_head:
                    held.append((index, a))
                else:
                    block_losses.append(consume(index, block_loss(signals[index], a, y)))
        while held:  # each block's output let go of once its update is done
            index, a = held.pop(0)
            block_losses.append(consume(index, block_loss(signals[index], a, y, output)))
        schedule.join()
        losses = torch.stack(block_losses) if block_losses else h.new_zeros(0)
        return LocalPass(output, loss, losses)

    def update(self, index: int, loss: torch.Tensor) -> torch.Tensor:
        """Backward of block ``index``'s loss (L: the head's) and a step of that block's optimizer."""
        optimizer = self.optimizers[index]
        optimizer.zero_grad(set_to_none=True)
        self.precision.update([optimizer], loss, self.sync_gradients, scaler=index)
        return loss.detach()

    def end_to_end(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """BP's step: one loss at the head, one backward pass through everything."""
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        with self.precision.autocast():
            logits, loss = bp_loss(self.net, x, y)
        self.precision.update(self.optimizers, loss, self.sync_gradients)
        return StepResult(self.precision.restore(logits.detach()), loss.detach(), loss.new_zeros(0))


def bp_loss(net: LocalNet, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BP's loss: the head's cross-entropy, with the graph through every block (logits, loss)."""
    logits = net(x)
    return logits, F.cross_entropy(logits, y)
