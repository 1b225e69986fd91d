"""BatchNorm with the whole batch's statistics, for a block run in slices (lowmem.py, passes 1 and 3).

A sliced block's BatchNorm layers are swapped, while a slice runs, for :class:`Normalize`: it
normalises the slice with the batch's statistics, gathered slice by slice in float64 (Chan et al.'s
pairwise update), and its backward uses the batch's sums of dL/dy and dL/dy * x_hat, so that every
slice gets the whole batch's gradient.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..errors import LLSError


class StatisticsTaken(Exception):
    """Ends a statistics pass at the BatchNorm whose statistics it gathers."""


def _dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]  # every dimension but the channel's


def _channel_shape(x: torch.Tensor) -> tuple[int, ...]:
    return (1, -1) + (1,) * (x.dim() - 2)


class BatchNormSums:
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


class Normalize(torch.autograd.Function):
    """BatchNorm of one slice with the whole batch's statistics; its backward with the batch's sums."""

    @staticmethod
    def forward(ctx, x, weight, bias, norm: BatchNormSums):
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


class BlockNorms:
    """The BatchNorm layers of one block, swapped for :class:`Normalize` while a slice runs."""

    def __init__(self, block: nn.Module) -> None:
        for m in block.modules():
            if isinstance(m, nn.SyncBatchNorm) or (isinstance(m, _InstanceNorm) and m.track_running_stats):
                raise LLSError(
                    f"the low-memory step cannot slice a block with {type(m).__name__}; "
                    "use plain BatchNorm or train without low memory"
                )
        self.norms = [
            BatchNormSums(m)
            for m in block.modules()
            if isinstance(m, _BatchNorm) and _uses_batch_statistics(m)
        ]
        self.order: list[BatchNormSums] = []  # call order, from the first slice that ran them all
        # whose input and output gradient edge a slice keeps: a layer, "last", or none. The edge, not
        # the output: autograd.grad can stop there without the output tensor kept alive.
        self.keep: BatchNormSums | str | None = None
        self.kept: tuple[BatchNormSums, torch.Tensor, GradientEdge] | None = None

    def pending(self) -> list[BatchNormSums]:
        return [n for n in self.norms if n.invstd is None]

    @contextmanager
    def intercept(self, keep: BatchNormSums | str | None = None) -> Iterator[None]:
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

    def _forward(self, norm: BatchNormSums, calls: list[BatchNormSums], x: torch.Tensor) -> torch.Tensor:
        if norm.invstd is None:
            norm.add_statistics(x)
            raise StatisticsTaken
        calls.append(norm)
        y = Normalize.apply(x, norm.module.weight, norm.module.bias, norm)
        if self.keep == "last" or self.keep is norm:
            self.kept = (norm, x, get_gradient_edge(y))
        return y
