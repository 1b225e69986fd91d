"""A block's training step in slices of its batch, as ExecuTorch methods: the same step in less memory.

The device's counterpart of ``lls train --memory low`` (``lls.step.lowmem``): a local rule's
gradient for a block depends on the block's input, its parameters and the labels alone, so the block
can run a slice of the batch at a time and its method's arena holds one slice's activations. Only
BatchNorm couples the samples of a batch; here it still sees the whole batch, forward and backward,
so the step is the whole-batch step up to float rounding. BP cannot do this: its one method
back-propagates through every block at once.

For block ``i`` with m BatchNorm layers (call order 0..m-1), trained in S slices of n = N / S
samples, the program holds three kinds of method. Every one takes a slice; the app keeps the whole
batch's input and output and the gradient sums.

``block{i}_stats{k}`` (k = 0..m-1), forward only: inputs ``x`` (the slice), the block's parameters
    (:attr:`SlicedLayout.block_parameters`, as they are now), then the batch mean and variance of
    BatchNorm 0..k-1; outputs the slice's mean and (biased) variance of BatchNorm k's input, per
    channel. The app merges the slices into the batch's (equal slices: the mean of the means, the
    mean of the variances plus the variance of the means) and updates the running statistics.
``block{i}_sums{k}`` (k = m-1..0): inputs ``x``, ``y``, the method's parameters as they are now
    (:attr:`SlicedLayout.parameters`), every BatchNorm's batch mean and variance, then the backward
    means of BatchNorm k+1..m-1. Its own two parameters are zero *probes* added to BatchNorm k's
    weight and bias, never stepped: their gradients are the slice's sums of dL/dy * x_hat and dL/dy
    at that BatchNorm's output, which the app adds over the slices and divides by the values per
    channel (N x H x W): BatchNorm k's backward means.
``block{i}`` (the block's own method, holding its parameters): inputs ``x``, ``y``, every
    BatchNorm's batch mean and variance, then every backward mean; outputs ``objective`` (the
    slice's share of the loss, plus for each BatchNorm a term whose gradient is what the batch's
    mean and variance add to the slice's input gradient), ``loss`` (the share alone) and ``h``
    (the slice's next-block input); the gradients of the block's parameters, which the app adds up
    over the slices and steps once.

The extra term, for a BatchNorm with input x, output y = (x - mean) * invstd * weight + bias:
PyTorch's backward gives dL/dx = weight * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)); a
slice that normalises with the batch's mean and variance as constants gets the first term only, so
the method adds ``sum(c * x)`` with c = -weight * invstd * (mean(dy) + x_hat * mean(dy * x_hat))
held constant, whose gradient is the rest (written with per-channel sums, so that it keeps no
full-size tensor beyond x).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import LLSError
from .layers import BatchStatsNorm, running_update

STATS = "_stats"  # block{i}_stats{k}
SUMS = "_sums"  # block{i}_sums{k}


def _dims(x: torch.Tensor) -> list[int]:
    return [0] if x.dim() == 2 else [0, *range(2, x.dim())]


def _channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view([1, -1] + [1] * (x.dim() - 2))


class SliceNorm(nn.Module):
    """A :class:`~lls.edge.layers.BatchStatsNorm` that normalises a slice with the whole batch's
    statistics, given as inputs (module docstring). Parameters keep BatchNorm's names."""

    def __init__(self, norm: BatchStatsNorm) -> None:
        super().__init__()
        self.weight, self.bias = norm.weight, norm.bias
        self.eps, self.momentum, self.num_features = norm.eps, norm.momentum, norm.num_features
        self.take = False  # a statistics pass: measure the input (what follows is left unused)
        self.taken: tuple[torch.Tensor, torch.Tensor] | None = None
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None  # the batch's mean and variance
        self.means: tuple[torch.Tensor, torch.Tensor] | None = None  # mean(dy), mean(dy * x_hat)
        self.probe: tuple[torch.Tensor, torch.Tensor] | None = None  # zero additions to weight, bias
        self.extra: torch.Tensor | None = None  # the term the backward means ask for

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = _dims(x)
        if self.take:
            self.taken = (x.mean(dims), x.var(dims, correction=0))  # core operators, as BatchStatsNorm
        if self.batch is None:  # in a statistics pass, at or past the BatchNorm it measures: what
            return x  # follows is unused, and the export leaves it out
        mean, var = self.batch
        invstd = torch.rsqrt(var + self.eps)
        weight = self.weight if self.weight is not None else torch.ones_like(mean)
        bias = self.bias if self.bias is not None else torch.zeros_like(mean)
        if self.probe is not None:
            weight, bias = weight + self.probe[0], bias + self.probe[1]
        scale = invstd * weight
        out = x * _channel(scale, x) + _channel(bias - mean * scale, x)
        if self.means is not None:
            mean_dy, mean_dy_xhat = self.means
            coefficient = -(invstd * weight).detach()
            sum_x = x.sum(dims)
            sum_xx = (x.detach() * x).sum(dims)  # its gradient: x itself, held constant
            per_channel = mean_dy * sum_x + mean_dy_xhat * invstd * (sum_xx - mean * sum_x)
            self.extra = (coefficient * per_channel).sum()
        return out


@dataclass
class SlicedLayout:
    """How a sliced block's methods are called (in the program's metadata, beside its method)."""

    slices: int  # S: the block's batch runs in S slices of batch_size / S samples
    parameters: list[str]  # the block method's parameters, in the order the sums passes take them
    block_parameters: list[str]  # the ones the statistics passes take (the block's own layers)
    norms: list[dict] = field(default_factory=list)  # each BatchNorm: channels, count, momentum
    held_bytes: int = 0  # kept by the app while the block runs: the whole input and output, the gradient sums
    block_parameter_bytes: int = 0  # the parameters a statistics pass takes as inputs
    parameter_bytes: int = 0  # the parameters a sums pass takes as inputs


class _Passes(nn.Module):
    """A block with its BatchNorm layers as :class:`SliceNorm`: what every sliced method runs."""

    def __init__(self, block, between, signal, pool, share: float, order: Sequence[str]) -> None:
        super().__init__()
        self.block, self.between, self.signal, self.pool = block, between, signal, pool
        self.share = share  # the slice's weight in the batch's loss
        self.norms: list[SliceNorm] = [block.get_submodule(name) for name in order]  # in call order

    def set_batch(self, stats: Sequence[torch.Tensor]) -> None:
        for i, norm in enumerate(self.norms):
            norm.batch = (stats[2 * i], stats[2 * i + 1]) if 2 * i < len(stats) else None

    def set_means(self, means: Sequence[torch.Tensor], first: int) -> None:
        """Backward means of BatchNorm ``first`` onwards, in ``means``; the earlier ones none."""
        for i, norm in enumerate(self.norms):
            j = i - first
            norm.means = (means[2 * j], means[2 * j + 1]) if j >= 0 else None

    def clear(self) -> None:
        """Drop every tensor a call set on the modules: export refuses a module left holding any."""
        for norm in self.norms:
            norm.taken = norm.batch = norm.means = norm.probe = norm.extra = None

    def run(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(objective, the slice's loss share, h)."""
        a = self.block(x)
        z = self.pool(a) if self.pool is not None else self.signal.latent(a)
        loss = self.signal.latent_loss(z, y, None) * self.share
        objective = loss
        for norm in self.norms:
            if norm.means is not None:
                objective = objective + norm.extra
        return objective, loss.detach(), self.between(a.detach())


Slot = tuple[str, nn.Module, str]  # a parameter's name, the module that holds it, its name there


def _parameters_as_inputs(module: nn.Module) -> list[Slot]:
    """Remove ``module``'s parameters, leaving slots that the method's inputs fill at each call (so
    that the method holds no copy of them); in parameter order."""
    slots = []
    for name, _ in list(module.named_parameters()):
        *path, leaf = name.split(".")
        owner = module.get_submodule(".".join(path))
        del owner._parameters[leaf]
        slots.append((name, owner, leaf))
    return slots


def _fill(slots: list[Slot], values: Sequence[torch.Tensor]) -> None:
    for (_, owner, leaf), value in zip(slots, values, strict=True):
        setattr(owner, leaf, value)


class WeightsPass(_Passes):
    """``block{i}``: ``(x, y, *batch statistics, *backward means) -> (objective, loss, h)``."""

    def forward(self, x: torch.Tensor, y: torch.Tensor, *rest: torch.Tensor):
        m = 2 * len(self.norms)
        self.set_batch(rest[:m])
        self.set_means(rest[m:], 0)
        try:
            return self.run(x, y)
        finally:
            self.clear()


class StatsPass(nn.Module):
    """``block{i}_stats{k}``: ``(x, *block parameters, *statistics of BatchNorm 0..k-1) -> (mean, var)``."""

    def __init__(self, passes: _Passes, k: int) -> None:
        super().__init__()
        self.passes, self.k = passes, k
        slots = _parameters_as_inputs(passes)  # the signal's are not used before a BatchNorm
        self.slots = [slot for slot in slots if slot[0].startswith("block.")]

    def forward(self, x: torch.Tensor, *rest: torch.Tensor):
        n = len(self.slots)
        _fill(self.slots, rest[:n])
        self.passes.set_batch(rest[n:])
        self.passes.set_means([], len(self.passes.norms))
        norm = self.passes.norms[self.k]
        norm.take = True
        try:
            self.passes.block(x)
            taken = norm.taken
        finally:
            norm.take = False
            self.passes.clear()
            _fill(self.slots, [None] * len(self.slots))
        return taken


class SumsPass(nn.Module):
    """``block{i}_sums{k}``: ``(x, y, *parameters, *batch statistics, *backward means of BatchNorm
    k+1..) -> (objective,)``, with BatchNorm k's probes as its parameters."""

    def __init__(self, passes: _Passes, k: int) -> None:
        super().__init__()
        self.passes, self.k = passes, k
        self.slots = _parameters_as_inputs(passes)
        channels = passes.norms[k].num_features
        self.probe_weight = nn.Parameter(torch.zeros(channels))
        self.probe_bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor, *rest: torch.Tensor):
        n, m = len(self.slots), 2 * len(self.passes.norms)
        _fill(self.slots, rest[:n])
        self.passes.set_batch(rest[n : n + m])
        self.passes.set_means(rest[n + m :], self.k + 1)
        norm = self.passes.norms[self.k]
        norm.probe = (self.probe_weight, self.probe_bias)
        try:
            objective, _, _ = self.passes.run(x, y)
        finally:
            self.passes.clear()
            _fill(self.slots, [None] * len(self.slots))
        return (objective,)


def slice_norms(module: nn.Module) -> nn.Module:
    """``module`` (an exportable copy) with every :class:`BatchStatsNorm` a :class:`SliceNorm`."""
    for name, child in module.named_children():
        if isinstance(child, BatchStatsNorm):
            setattr(module, name, SliceNorm(child))
        else:
            slice_norms(child)
    return module


def norm_order(block: nn.Module, in_shape: Sequence[int]) -> list[tuple[str, int]]:
    """The :class:`BatchStatsNorm` layers of an exportable block in the order it calls them, each
    with its values per channel and sample (H x W; 1 for a dense layer's)."""
    names = {m: n for n, m in block.named_modules()}
    order: list[tuple[str, int]] = []

    def hook(module, args, out):
        order.append((names[module], args[0][0, 0].numel()))

    norms_ = [m for m in block.modules() if isinstance(m, BatchStatsNorm)]
    handles = [m.register_forward_hook(hook) for m in norms_]
    try:
        with torch.no_grad():
            block(torch.zeros(2, *in_shape))
    finally:
        for handle in handles:
            handle.remove()
    return order


def check_slices(slices: int, batch_size: int, where: str) -> None:
    """Refuse, naming ``where``, a number of slices that does not split the batch evenly."""
    if slices < 1 or batch_size % slices:
        raise LLSError(
            f"{where}: {slices} slices do not divide the batch of {batch_size}; "
            "choose a number of slices that divides the batch size"
        )


# --- the app's side: merging the slices -------------------------------------------------------------


def merge_statistics(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's mean and biased variance from equal slices' (in float64, given back as float32)."""
    means = torch.stack([m.double() for m, _ in parts])
    variances = torch.stack([v.double() for _, v in parts])
    mean = means.mean(0)
    var = variances.mean(0) + ((means - mean) ** 2).mean(0)
    return mean.float(), var.float()


def held_bytes(batch_size: int, in_shape: Sequence[int], out_shape: Sequence[int], parameters: int) -> int:
    """What the app keeps outside the arena while a sliced block runs (float32): the batch's input
    and next input, and the sums of the slices' gradients."""
    return 4 * batch_size * (math.prod(in_shape) + math.prod(out_shape)) + parameters


def sliced_step(runner, method, h: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    """One step of a sliced block in the runtime (``runner``: a :class:`~lls.edge.runtime.ProgramRunner`):
    its statistics, sums and weights passes over the slices, one SGD step; (its loss, the next
    block's input)."""
    layout = SlicedLayout(**method.sliced)
    xs, ys = h.chunk(layout.slices), y.chunk(layout.slices)
    own = runner.parameters(method)
    block_parameters = [own[name] for name in layout.block_parameters]
    parameters = [own[name] for name in layout.parameters]
    m = len(layout.norms)
    batch: list[torch.Tensor] = []
    for k in range(m):
        parts = [runner.forward(f"{method.name}{STATS}{k}", (x, *block_parameters, *batch)) for x in xs]
        batch += merge_statistics(parts)
    for k, norm in enumerate(layout.norms):
        names = method.statistics[2 * k : 2 * k + 2]
        running = running_update(
            (runner.statistics[names[0]], runner.statistics[names[1]]),
            batch[2 * k : 2 * k + 2],
            norm["momentum"],
            norm["count"],
        )
        runner.statistics.update(zip(names, running, strict=True))
    means: list[list[torch.Tensor]] = [[] for _ in range(m)]
    for k in reversed(range(m)):
        later = [t for pair in means[k + 1 :] for t in pair]
        dy_xhat = dy = 0
        for x, y_ in zip(xs, ys, strict=True):
            _, grads = runner.run(f"{method.name}{SUMS}{k}", [x, y_, *parameters, *batch, *later])
            dy_xhat, dy = dy_xhat + grads["probe_weight"], dy + grads["probe_bias"]
        count = layout.norms[k]["count"]
        means[k] = [dy / count, dy_xhat / count]
    every = [t for pair in means for t in pair]
    total: dict[str, torch.Tensor] = {}
    loss, outputs = 0.0, []
    for x, y_ in zip(xs, ys, strict=True):
        out, grads = runner.run(method.name, [x, y_, *batch, *every])
        for name, g in grads.items():
            total[name] = total[name] + g if name in total else g
        loss += float(out[1])
        outputs.append(out[2])
    runner.optimize(method, total)
    return loss, torch.cat(outputs)
