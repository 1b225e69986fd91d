"""The low-memory block-local step: a block trained in slices of the batch, with the same result.

A local rule's gradient for block l depends on block l's input, its parameters and the labels alone
(DFA's also on the head's logits), so the block can be recomputed and back-propagated a slice of the
batch at a time: its step holds one slice's activations instead of the whole batch's. Only
BatchNorm couples the samples of a batch, and here it still sees the whole batch, forward and
backward, so the step is the whole-batch step up to float rounding (tested for every model of the
zoo and every local rule). BP cannot do this: it back-propagates through every block at once.

A sliced block with m BatchNorm layers that normalise with batch statistics runs these passes over
its slices (``h`` is the block's input, kept whole; nothing of the block's own activations is):

1. statistics, m passes without gradients: pass k runs each slice up to the k-th BatchNorm (the
   earlier ones normalise with the batch statistics already known) and merges the slice's
   per-channel mean and variance into the batch's with Chan et al.'s pairwise update, in float64.
   That is as stable as a two-pass variance without a pass more; a running sum of squares would
   lose the variance's digits to cancellation wherever a channel's mean is large against its
   spread. The running statistics are then updated once, as ``nn.BatchNorm`` does (momentum or
   cumulative average, unbiased variance, ``num_batches_tracked``).
2. output, one pass: every slice is normalised with the batch's statistics and its output goes
   through the fixed ops (max-pool, ...) into the next block's input, the only thing kept of it.
   When the signal is known (every rule but DFA) the same pass computes the slice's loss, weighted
   by its share of the batch so that the slices add up to the batch's mean loss, and keeps what is
   small: the gradient of the signal's latent (C p^2 numbers per sample for LLS), the gradients of
   the signal's own parameters, and the last BatchNorm's backward sums (below). DFA's signal needs
   the head's logits: its blocks run this pass without gradients, and again after the head.
3. backward, inside ``loss.backward()`` (so ``Trainer.update``, the gradient sync of data
   parallelism and the diagnostics see an ordinary scalar loss): BatchNorm's input gradient needs
   the batch sums of dL/dy and dL/dy * x_hat, so one pass per remaining BatchNorm, last to first,
   gathers them; a last pass back-propagates every slice to the block's weights, each BatchNorm
   using the batch's sums, and adds the slices' weight gradients up.

A conv block (m = 1) costs 3 forward passes and 1 weight-gradient pass instead of 1 of each; a
depthwise-separable block (m = 2) 5 forward passes, 1 input-gradient pass of its pointwise half and
1 weight-gradient pass. Blocks whose whole-batch step fits the memory budget take the ordinary step
(DFA's always recompute: their inputs wait for the head, never their activations).

How big a slice: ``Budget(bytes)`` picks, block by block, the largest slice whose estimated step
peak fits: ``batch * (input + next input + latent) + PARAMETER_COPIES * parameters + slice * work``
bytes (DFA: every block's input instead of the block's two), where a probe forward pass measures, per
sample, the block's input, the next block's input and every layer output of the block; ``work`` is
the sum of the layer outputs (what autograd holds for a slice's backward) plus
``GRADIENTS_IN_FLIGHT`` more of the largest one (the gradients alive at once in its backward) and
two latents (the slice's, and its gradient).
Measured on CPU, the estimate is above the step peak of every block of VGG8 (docs/cost.md).
``"low"`` is a budget of ``LOW_FACTOR`` times the least any sliced step needs (the largest first
two terms over the blocks).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..errors import LLSError
from ..method.signals import BlockSignal

GRADIENTS_IN_FLIGHT = 2  # full-size gradients alive at once in a block's backward, beyond what it saves
PARAMETER_COPIES = 2  # a block's gradient and the optimizer step's temporaries, in parameter sizes
LOW_FACTOR = 2.0  # memory="low": a budget of twice the least a sliced step needs
PROBE_BATCH = 2  # samples of the probe forward pass (in eval mode: BatchNorm keeps its statistics)
MIB = 1 << 20
UNITS = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


# --- what to slice: the memory setting -------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """Slice each block so that a step's estimated peak stays within ``bytes``."""

    bytes: int

    def limit(self, floor: int) -> int:
        return self.bytes


@dataclass(frozen=True)
class Low:
    """``memory="low"``: a budget of ``LOW_FACTOR`` times the least a sliced step needs."""

    def limit(self, floor: int) -> int:
        return int(LOW_FACTOR * floor)


@dataclass(frozen=True)
class SliceSamples:
    """At most ``samples`` per slice in every block, whatever the memory (tests, experiments)."""

    samples: int


MemoryPlan = Budget | Low | SliceSamples
MemorySpec = MemoryPlan | str | int | None


def parse_memory(text: str) -> str | int:
    """``"low"`` -> ``"low"``; ``"256MiB"``, ``"1.5GiB"``, ``"65536B"`` -> bytes (binary units)."""
    text = text.strip()
    if text.lower() == "low":
        return "low"
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Za-z]+)", text)
    if not match or match.group(2).lower() not in UNITS:
        raise LLSError(
            f"memory {text!r} is neither 'low' nor a size such as 256MiB or 1GiB (units: B, KiB, MiB, GiB)"
        )
    size = int(float(match.group(1)) * UNITS[match.group(2).lower()])
    if size <= 0:
        raise LLSError(f"memory {text!r} must be more than 0 bytes")
    return size


def size_text(size: float) -> str:
    """Bytes as a person reads them (1.5 GiB, 300 MiB, 12 KiB); :func:`parse_memory` reads it back."""
    for unit, factor in (("GiB", UNITS["gib"]), ("MiB", UNITS["mib"]), ("KiB", UNITS["kib"])):
        if size >= factor:
            return f"{size / factor:.3g} {unit}"
    return f"{size:.0f} B"


def memory_plan(memory: MemorySpec) -> MemoryPlan | None:
    """The plan for a ``memory`` setting: ``None`` (ordinary step), ``"low"``, a budget in bytes (an
    int or a string such as ``"256MiB"``), or a plan object."""
    if memory is None or isinstance(memory, (Budget, Low, SliceSamples)):
        return memory
    if isinstance(memory, str):
        memory = parse_memory(memory)
    if memory == "low":
        return Low()
    if isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0:
        raise LLSError(f"memory {memory!r} is neither 'low' nor a positive number of bytes")
    return Budget(memory)


# --- how much a block needs: the probe -------------------------------------------------------------


@dataclass(frozen=True)
class BlockProfile:
    """Bytes per sample of one block's step."""

    input: int  # the block's input
    output: int  # the next block's input (the block's output after its fixed ops), or the head's
    work: int  # a slice's forward and backward: every layer output, plus the gradients in flight
    params: int = 0  # bytes of the block's parameters (not per sample)
    latent: int = 0  # the pooled latent, whose gradient the sliced step keeps (0: not pooled)


@torch.no_grad()
def profile(net: nn.Module, input_shape: Sequence[int]) -> list[BlockProfile]:
    """Per-sample bytes of every block's step, from one probe forward pass in eval mode."""
    param = next(net.parameters())
    inputs: dict[int, int] = {}
    latents: dict[int, int] = {}
    layers: dict[int, list[int]] = {i: [] for i in range(len(net.blocks))}

    def size(t: torch.Tensor) -> int:
        return t.numel() * t.element_size() // PROBE_BATCH

    def record_input(index: int, module: nn.Module, args: tuple) -> None:
        inputs[index] = size(args[0])

    def record_layer(index: int, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        layers[index].append(size(out))

    def record_latent(index: int, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        pool = net.latent_pool[index]
        pooled = out.dim() == 4 and pool is not None and out.shape[1] * pool * pool < out[0].numel()
        latents[index] = out.shape[1] * pool * pool * out.element_size() if pooled else 0

    hooks = [net.head.register_forward_pre_hook(partial(record_input, len(net.blocks)))]
    for i, block in enumerate(net.blocks):
        hooks.append(block.register_forward_pre_hook(partial(record_input, i)))
        hooks.append(block.register_forward_hook(partial(record_latent, i)))
        for leaf in (m for m in block.modules() if not any(m.children())):
            hooks.append(leaf.register_forward_hook(partial(record_layer, i)))
    was_training = net.training
    net.eval()
    try:
        net(torch.zeros(PROBE_BATCH, *input_shape, device=param.device, dtype=param.dtype))
    finally:
        net.train(was_training)
        for hook in hooks:
            hook.remove()
    profiles = []
    for i, block in enumerate(net.blocks):
        # + the slice's latent and the latent's gradient before it joins the batch's
        work = sum(layers[i]) + GRADIENTS_IN_FLIGHT * max(layers[i], default=0) + 2 * latents[i]
        params = sum(p.numel() * p.element_size() for p in block.parameters())
        profiles.append(BlockProfile(inputs[i], inputs[i + 1], work, params, latents[i]))
    return profiles


class LowMemory:
    """A trainer's low-memory mode: which blocks to slice, and how finely, for each batch size."""

    def __init__(
        self, plan: MemoryPlan, net: nn.Module, input_shape: Sequence[int], *, recompute_all: bool
    ) -> None:
        self.plan = plan
        self.profiles = profile(net, input_shape)  # of the net's layout: a copy of the net has the same
        # DFA: every block's input waits for the head's logits, so every block recomputes after it
        self.recompute_all = recompute_all
        self._samples: dict[int, list[int]] = {}

    def kept(self, batch: int) -> list[int]:
        """Bytes each block's step needs whatever its slices: the inputs it keeps whole (its own and
        the next block's; DFA: every block's), its latent's gradient, and its parameters' gradients
        and optimizer step."""
        held = sum(p.input for p in self.profiles) + self.profiles[-1].output
        return [
            batch * ((held if self.recompute_all else p.input + p.output) + p.latent)
            + PARAMETER_COPIES * p.params
            for p in self.profiles
        ]

    def slice_samples(self, batch: int) -> list[int]:
        """The most samples per slice of every block at this batch size (``batch``: not sliced)."""
        if batch not in self._samples:
            self._samples[batch] = self._choose(batch)
        return self._samples[batch]

    def _choose(self, batch: int) -> list[int]:
        if isinstance(self.plan, SliceSamples):
            return [min(batch, self.plan.samples)] * len(self.profiles)
        kept = self.kept(batch)
        limit = self.plan.limit(max(kept))
        least = [held + p.work for held, p in zip(kept, self.profiles, strict=True)]  # one sample a slice
        if limit < max(least):
            index = least.index(max(least))
            raise LLSError(
                f"a memory budget of {size_text(limit)} is below the smallest step at batch {batch}: "
                f"block {index} one sample at a time needs about {size_text(least[index])} (the inputs "
                f"it keeps whole); give --memory {math.ceil(max(least) / MIB)}MiB or more, or a smaller batch"
            )
        return [
            min(batch, (limit - held) // max(p.work, 1)) for held, p in zip(kept, self.profiles, strict=True)
        ]

    def estimated_peak(self, batch: int) -> int:
        """The estimated step peak (bytes) with the slices chosen for ``batch``."""
        samples = self.slice_samples(batch)
        return max(k + s * p.work for k, s, p in zip(self.kept(batch), samples, self.profiles, strict=True))

    def slices(self, batch: int) -> list[int]:
        """How many slices each block runs in at this batch size (1: the ordinary step)."""
        return [math.ceil(batch / s) for s in self.slice_samples(batch)]

    def slicer(self, net: nn.Module, batch: int) -> Callable[[int, torch.Tensor], SlicedBlock | None]:
        """For ``net.walk``: block ``index``'s sliced step on ``h``, or ``None`` for the ordinary one."""
        samples = self.slice_samples(batch)

        def slice_block(index: int, h: torch.Tensor) -> SlicedBlock | None:
            if samples[index] >= len(h) and not self.recompute_all:
                return None
            return SlicedBlock(net.blocks[index], net.between[index], h, samples[index])

        return slice_block


# --- BatchNorm with the whole batch's statistics -----------------------------------------------------


class _StatisticsTaken(Exception):
    """Ends a statistics pass at the BatchNorm whose statistics it gathers."""


def _dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]  # every dimension but the channel's


def _channel_shape(x: torch.Tensor) -> tuple[int, ...]:
    return (1, -1) + (1,) * (x.dim() - 2)


class _Norm:
    """One BatchNorm layer of a sliced block: the whole batch's statistics and backward sums."""

    def __init__(self, module: _BatchNorm) -> None:
        self.module = module
        self.count = 0  # elements per channel seen so far
        self.mean: torch.Tensor | None = None  # float64 running merge of the slices
        self.m2: torch.Tensor | None = None  # float64 sum of squared deviations from the mean
        self.batch_mean: torch.Tensor | None = None  # the batch's statistics, in the input's dtype
        self.batch_var: torch.Tensor | None = None  # (biased, the one that normalises)
        self.invstd: torch.Tensor | None = None
        self.sum_dy: torch.Tensor | None = None  # float64 backward sums over the batch
        self.sum_dy_xhat: torch.Tensor | None = None
        self.mean_dy: torch.Tensor | None = None  # the batch means of dL/dy and dL/dy * x_hat, once known
        self.mean_dy_xhat: torch.Tensor | None = None

    def add_statistics(self, x: torch.Tensor) -> None:
        """Merge one slice into the batch's mean and variance (Chan et al.'s pairwise update)."""
        n = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x.detach(), dim=_dims(x), correction=0)
        mean, m2 = mean.double(), var.double() * n
        if self.count == 0:
            self.mean, self.m2 = mean, m2
        else:
            total = self.count + n
            delta = mean - self.mean
            self.mean = self.mean + delta * (n / total)
            self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count += n
        self.dtype = x.dtype

    def finish_statistics(self) -> None:
        """The batch's statistics, and the running statistics updated once, as nn.BatchNorm would."""
        m = self.module
        if m.training and self.count < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got {self.count}")
        self.batch_mean = self.mean.to(self.dtype)
        self.batch_var = (self.m2 / self.count).to(self.dtype)
        self.invstd = torch.rsqrt(self.m2 / self.count + m.eps).to(self.dtype)
        if not (m.training and m.track_running_stats):
            return
        factor = 0.0 if m.momentum is None else m.momentum
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.add_(1)
            factor = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
        with torch.no_grad():
            m.running_mean.mul_(1 - factor).add_(self.mean.to(m.running_mean.dtype), alpha=factor)
            unbiased = (self.m2 / (self.count - 1)).to(m.running_var.dtype)
            m.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)

    def xhat(self, x: torch.Tensor) -> torch.Tensor:
        shape = _channel_shape(x)
        return (x - self.batch_mean.view(shape)).mul_(self.invstd.view(shape))

    def slice_sums(
        self, x: torch.Tensor, dy: torch.Tensor, *, xhat: bool = True, dy_sum: bool = True, fused=None
    ):
        """One slice's per-channel sums of dL/dy * x_hat and of dL/dy: the weight and bias gradients
        of an eval-mode BatchNorm with the batch's statistics. ``fused`` (the default on the CPU):
        one pass of PyTorch's kernel, no slice-sized temporary; CUDA's kernel insists on tensors the
        CPU's lets be, so there the sums are taken directly, at the price of one temporary."""
        if not (x.device.type == "cpu" if fused is None else fused):
            dims = _dims(x)
            sum_dy = dy.sum(dims) if dy_sum else None
            return ((dy * self.xhat(x)).sum(dims) if xhat else None), sum_dy
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy,
            x,
            None,
            self.batch_mean,
            self.batch_var,
            None,
            None,
            False,
            self.module.eps,
            [False, xhat, dy_sum],
        )
        return sum_dy_xhat, sum_dy

    def add_sums(self, x: torch.Tensor, dy: torch.Tensor) -> None:
        """Add one slice's sums of dL/dy and dL/dy * x_hat (``dy``: the gradient at this layer's output)."""
        sum_dy_xhat, sum_dy = (s.double() for s in self.slice_sums(x.detach(), dy))
        if self.sum_dy is None:
            self.sum_dy, self.sum_dy_xhat = sum_dy, sum_dy_xhat
        else:
            self.sum_dy += sum_dy
            self.sum_dy_xhat += sum_dy_xhat

    def finish_sums(self) -> None:
        self.mean_dy = (self.sum_dy / self.count).to(self.dtype)
        self.mean_dy_xhat = (self.sum_dy_xhat / self.count).to(self.dtype)


class _Normalize(torch.autograd.Function):
    """BatchNorm of one slice with the whole batch's statistics; its backward with the batch's sums."""

    @staticmethod
    def forward(ctx, x, weight, bias, norm: _Norm):
        shape = _channel_shape(x)
        scale = norm.invstd if weight is None else norm.invstd * weight
        shift = -norm.batch_mean * scale
        if bias is not None:
            shift = shift + bias
        ctx.save_for_backward(x, weight)
        ctx.norm = norm
        return torch.addcmul(shift.view(shape), x, scale.view(shape))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        norm, shape = ctx.norm, _channel_shape(x)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_weight, grad_bias = norm.slice_sums(
                x, dy, xhat=ctx.needs_input_grad[1], dy_sum=ctx.needs_input_grad[2]
            )
        if ctx.needs_input_grad[0]:
            if norm.mean_dy is None:
                raise RuntimeError("a sliced BatchNorm's input gradient was asked for before its batch sums")
            scale = norm.invstd if weight is None else norm.invstd * weight
            # (gamma / sigma) * (dy - mean(dy) - x_hat * mean(dy * x_hat)), the means over the batch,
            # computed in place in the one temporary x_hat
            grad_x = norm.xhat(x).mul_(-norm.mean_dy_xhat.view(shape)).add_(dy).sub_(norm.mean_dy.view(shape))
            grad_x.mul_(scale.view(shape))
        return grad_x, grad_weight, grad_bias, None


def _uses_batch_statistics(m: _BatchNorm) -> bool:
    return m.training or m.running_mean is None


class _Norms:
    """The BatchNorm layers of one block, swapped for :class:`_Normalize` while a slice runs."""

    def __init__(self, block: nn.Module) -> None:
        for m in block.modules():
            if isinstance(m, nn.SyncBatchNorm) or (isinstance(m, _InstanceNorm) and m.track_running_stats):
                raise LLSError(
                    f"the low-memory step cannot slice a block with {type(m).__name__}; "
                    "use plain BatchNorm or train without low memory"
                )
        self.norms = [
            _Norm(m) for m in block.modules() if isinstance(m, _BatchNorm) and _uses_batch_statistics(m)
        ]
        self.order: list[_Norm] = []  # call order, from the first slice that ran them all
        # whose input and output gradient edge a slice keeps: a layer, "last", or none. The edge, not
        # the output: autograd.grad can stop there without the output tensor kept alive.
        self.keep: _Norm | str | None = None
        self.kept: tuple[_Norm, torch.Tensor, GradientEdge] | None = None

    def pending(self) -> list[_Norm]:
        return [n for n in self.norms if n.invstd is None]

    @contextmanager
    def intercept(self, keep: _Norm | str | None = None) -> Iterator[None]:
        """Within: the block's BatchNorm layers normalise with the batch's statistics, and the
        statistics of the first layer still without them are gathered (ending the slice's run)."""
        self.keep, self.kept, calls = keep, None, []
        for norm in self.norms:
            norm.module.forward = partial(self._forward, norm, calls)
        try:
            yield
        finally:
            for norm in self.norms:
                del norm.module.forward
            if len(calls) == len(self.norms):
                self.order = calls

    def _forward(self, norm: _Norm, calls: list[_Norm], x: torch.Tensor) -> torch.Tensor:
        if norm.invstd is None:
            norm.add_statistics(x)
            raise _StatisticsTaken
        calls.append(norm)
        y = _Normalize.apply(x, norm.module.weight, norm.module.bias, norm)
        if self.keep == "last" or self.keep is norm:
            self.kept = (norm, x, get_gradient_edge(y))
        return y


# --- one block's sliced step -------------------------------------------------------------------------


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
        self.norms = _Norms(block)
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
                        except _StatisticsTaken:
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
    ) -> tuple[torch.Tensor | None, _Norm | None]:
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
        grads = [*(self.block_grads or [None] * len(self.block_params)), *(self.signal_grads or [])]
        if not self.signal_grads:
            grads += [None] * len(self.signal_params)
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
