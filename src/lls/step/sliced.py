"""One block's sliced step: the block run a slice of the batch at a time, with the whole batch's
gradients (the passes of lowmem.py's module docstring).

The loss a slice contributes is the block's own signal, sliced: :meth:`BlockSignal.latent` and
:meth:`BlockSignal.latent_loss` (or the whole ``forward`` when the signal reads all of the output),
weighted by the slice's share of the batch when the signal's ``batch_reduction`` is a mean.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..method.signals import BlockSignal
from .sliced_norm import BatchNormSums, BlockNorms, StatisticsTaken


def _balanced(batch: int, samples: int) -> list[tuple[int, int]]:
    """``ceil(batch / samples)`` slices whose sizes differ by at most one."""
    count = math.ceil(batch / samples)
    edges = [batch * i // count for i in range(count + 1)]
    return list(itertools.pairwise(edges))


def _empty_like_rows(part: torch.Tensor, rows: int) -> torch.Tensor:
    """An uninitialised tensor of ``rows`` samples laid out like ``part``."""
    layout = torch.contiguous_format
    if part.dim() == 4 and not part.is_contiguous() and part.is_contiguous(memory_format=torch.channels_last):
        layout = torch.channels_last
    return torch.empty((rows, *part.shape[1:]), dtype=part.dtype, device=part.device, memory_format=layout)


class SlicedBlock:
    """Block step on a batch ``h``, run ``samples`` at a time (the passes of the module docstring).

    Made by the walk in place of the block's output: the walk takes the next block's input from
    :meth:`next_input`, the trainer the block's loss from :meth:`loss`, whose backward does the rest.
    """

    def __init__(self, block: nn.Module, between: nn.Module, h: torch.Tensor, samples: int) -> None:
        self.block, self.between, self.h = block, between, h.detach()
        self.bounds = _balanced(len(h), samples)
        self.norms = BlockNorms(block)
        self._next: torch.Tensor | None = None
        self._ran_output = False
        self.signal: BlockSignal | None = None
        self._gather_statistics()

    def _gather_statistics(self) -> None:
        while pending := self.norms.pending():
            with torch.no_grad():
                for start, stop in self.bounds:
                    with self.norms.intercept():
                        try:
                            self.block(self.h[start:stop])
                        except StatisticsTaken:
                            continue
                    # a whole slice ran without reaching them: those layers take no part in the block
                    self.norms.norms = [n for n in self.norms.norms if n not in pending]
                    break
            for norm in pending:
                if norm.count:
                    norm.finish_statistics()

    def next_input(self) -> torch.Tensor:
        """The next block's input, the block's output after its fixed ops, for the whole batch."""
        if not self._ran_output:
            with torch.no_grad():
                self._output_pass(None)
        out, self._next = self._next, None
        return out

    def loss(self, signal: BlockSignal, y: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """The block's local loss on the whole batch; its backward computes the block's gradients."""
        if self.signal is not None:
            raise RuntimeError("a sliced block gives one loss per step")
        self.signal, self.y, self.logits = signal, y, logits
        self.signal_params = [p for p in signal.parameters() if p.requires_grad]
        self.block_params = [p for p in self.block.parameters() if p.requires_grad]
        with torch.enable_grad():
            value = self._output_pass(signal)
        return _SlicedLoss.apply(self, value, *self.block_params, *self.signal_params)

    # -- the passes --

    def _slice_loss(self, a: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent, loss) of one slice, the loss weighted by the slice's share of a mean."""
        signal = self.signal
        z = signal.latent(a)
        logits = None if self.logits is None else self.logits[start:stop]
        y = self.y[start:stop]
        loss = signal(a, y, logits) if z is a else signal.latent_loss(z, y, logits)
        if signal.batch_reduction == "mean":
            loss = loss * ((stop - start) / len(self.h))
        return z, loss

    def _output_pass(self, signal: BlockSignal | None) -> torch.Tensor | None:
        """Every slice forward with the batch statistics: the next block's input (the first time)
        and, given the signal, the loss, the latent's and the signal's gradients and the last
        BatchNorm's sums."""
        produce, self._ran_output = not self._ran_output, True
        total = torch.zeros((), dtype=torch.float64, device=self.h.device)
        self.keep_latent, self.latent_grad, self.signal_grads = False, None, None
        last = None  # the last BatchNorm, whose sums this pass gathers
        for start, stop in self.bounds:  # one slice at a time: nothing of a slice outlives its turn
            loss, last = self._output_slice(start, stop, produce, signal)
            if loss is not None:
                total += loss
        if signal is None:
            return None
        if last is not None:
            last.finish_sums()
        return total.to(self.h.dtype)

    def _output_slice(
        self, start: int, stop: int, produce: bool, signal: BlockSignal | None
    ) -> tuple[torch.Tensor | None, BatchNormSums | None]:
        with self.norms.intercept(keep="last" if signal is not None else None):
            a = self.block(self.h[start:stop])
        if produce:
            part = self.between(a.detach())
            if self._next is None:
                self._next = _empty_like_rows(part, len(self.h))
            self._next[start:stop] = part
            del part
        if signal is None:
            return None, None
        z, loss = self._slice_loss(a, start, stop)
        self.keep_latent = z is not a and z.numel() < a.numel()
        del a  # autograd holds what it needs of the slice's output
        kept, self.norms.kept = self.norms.kept, None
        targets = ([kept[2]] if kept is not None else []) + ([z] if self.keep_latent else [])
        if targets or self.signal_params:
            grads = torch.autograd.grad(loss, targets + self.signal_params, allow_unused=True)
            if self.keep_latent:
                g = grads[len(targets) - 1]
                if self.latent_grad is None:
                    self.latent_grad = g.new_empty((len(self.h), *g.shape[1:]))
                self.latent_grad[start:stop] = g
            self.signal_grads = _accumulate(self.signal_grads, grads[len(targets) :])
            if kept is not None:
                kept[0].add_sums(kept[1], grads[0])
        return loss.detach().double(), None if kept is None else kept[0]

    def _from_output(
        self, a: torch.Tensor, start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Where a slice's backward starts: the latent with its kept gradient, or the recomputed loss."""
        if self.keep_latent:
            return self.signal.latent(a), self.latent_grad[start:stop]
        return self._slice_loss(a, start, stop)[1], None

    def backward(self) -> list[torch.Tensor | None]:
        """The gradients of the block's and the signal's parameters (the loss's backward)."""
        with torch.enable_grad():
            for norm in reversed(self.norms.order):  # the sums still missing, last layer first
                if norm.mean_dy is not None:
                    continue
                for start, stop in self.bounds:
                    with self.norms.intercept(keep=norm):
                        out, grad = self._from_output(self.block(self.h[start:stop]), start, stop)
                    (_, x, edge), self.norms.kept = self.norms.kept, None
                    (dy,) = torch.autograd.grad(out, edge, grad)
                    del out
                    norm.add_sums(x, dy)
                norm.finish_sums()
            self.block_grads = None
            for start, stop in self.bounds:
                with self.norms.intercept():
                    out, grad = self._from_output(self.block(self.h[start:stop]), start, stop)
                    grads = torch.autograd.grad(out, self.block_params, grad, allow_unused=True)
                self.block_grads = _accumulate(self.block_grads, grads)
        # Every slice gives the block's parameters a list (a block without any takes no local step).
        grads = [*self.block_grads, *(self.signal_grads or [None] * len(self.signal_params))]
        self.h = self.latent_grad = self.block_grads = self.signal_grads = None  # the step is done
        return grads


def _accumulate(
    total: list[torch.Tensor | None] | None, grads: Sequence[torch.Tensor | None]
) -> list[torch.Tensor | None]:
    """``total`` (``None`` before the first slice) plus one slice's gradients, in place."""
    if total is None:
        return [None if g is None else g.clone() for g in grads]
    for i, g in enumerate(grads):
        if g is not None:
            total[i] = g.clone() if total[i] is None else total[i].add_(g)
    return total


class _SlicedLoss(torch.autograd.Function):
    """A sliced block's loss as a scalar whose backward is the block's sliced backward pass."""

    @staticmethod
    def forward(ctx, step: SlicedBlock, value: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.step = step
        return value.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        step, ctx.step = ctx.step, None
        if step is None:
            raise RuntimeError("a sliced block's loss can be back-propagated once")
        grads = step.backward()
        return (None, None, *(None if g is None else g.mul_(grad) for g in grads))
