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
3. backward, inside ``loss.backward()`` (so ``Step.update``, the gradient sync of data
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

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..errors import LLSError
from ..method.signals import BlockSignal, latent_dim
from .sliced import SlicedBlock

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
        d = latent_dim(out.shape[1:], net.latent_pool[index])  # the latent the signal pools, when smaller
        pooled = out.dim() == 4 and d < out[0].numel()
        latents[index] = d * out.element_size() if pooled else 0

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

    @staticmethod
    def block_loss(
        signal: BlockSignal,
        a: torch.Tensor | SlicedBlock,
        y: torch.Tensor,
        logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A block's loss from its output ``a``, or from its sliced step's (the signal sliced)."""
        if isinstance(a, SlicedBlock):
            return a.loss(signal, y, logits)
        return signal(a, y, logits)
