"""Export-friendly forms of the layers a block is made of, with the same numerics as PyTorch's.

ExecuTorch's portable kernels run the core ATen operator set. Two pieces of an ``lls`` block fall
outside what they can train:

- BatchNorm in training mode lowers to ``_native_batch_norm_legit_functional``, which is not a
  core operator. :class:`BatchStatsNorm` writes the same function with ``mean`` and ``var``
  (normalised with the biased variance, as ``nn.BatchNorm*d`` does in training mode), and, since a
  program's buffers cannot be read back by an app, takes the running statistics as inputs and
  gives the updated ones as outputs (momentum update with the unbiased variance, as PyTorch);
- the LLS latent is an adaptive average pool, whose backward the portable kernels lack.
  :class:`FixedPool` pools with ``reshape`` + ``mean`` where the pool divides the map (the same
  sums as adaptive pooling's equal bins) and with the pooling matrices of
  :mod:`lls.method.latent` (two products) where it does not.

Everything else (convolutions, linear layers, max-pool, the activations) exports as it is; ``lls``'s
memory-saving LeakyReLU becomes ``nn.LeakyReLU`` (the same function).

:func:`exportable` makes a copy of a module with these swaps, sharing nothing with the original:
the program captures the values at export time.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..method.activation import LeakyReLU
from ..method.latent import LatentPool, pooling_matrix


class BatchStatsNorm(nn.Module):
    """``nn.BatchNorm1d/2d`` in training mode, written with ``mean`` and ``var``.

    ``forward(x)`` normalises with the batch statistics. The running statistics are not buffers:
    :attr:`running` is set by the method that owns the layer to the (mean, var) tensors it was
    given as inputs, and :attr:`updated` holds the new ones after the call, for the method to
    return. Parameters keep ``nn.BatchNorm``'s names (``weight``, ``bias``)."""

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        if norm.momentum is None:
            raise ValueError("a cumulative-average BatchNorm (momentum=None) has no fixed update")
        self.weight = norm.weight if norm.affine else None  # the copy's own (exportable copies)
        self.bias = norm.bias if norm.affine else None
        self.eps, self.momentum = norm.eps, norm.momentum
        self.num_features = norm.num_features
        self.running: tuple[torch.Tensor, torch.Tensor] | None = None
        self.updated: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0] if x.dim() == 2 else [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, correction=0, keepdim=True)
        # One multiply-add of x by per-channel factors: the backward then keeps x alone at full
        # size, where (x - mean) * rsqrt * weight + bias keeps three more full-size tensors
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.view(shape)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.view(shape)
        out = x * scale + shift
        if self.running is not None:
            count = math.prod(x.shape) // x.shape[1]
            batch = (mean.detach().flatten(), var.detach().flatten())
            self.updated = running_update(self.running, batch, self.momentum, count)
        return out


def running_update(
    running: tuple[torch.Tensor, torch.Tensor],
    batch: tuple[torch.Tensor, torch.Tensor],
    momentum: float,
    count: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``nn.BatchNorm``'s momentum update of the running mean and variance from a batch's mean and
    biased variance over ``count`` values per channel (the running variance is unbiased)."""
    m = momentum
    return (
        (1 - m) * running[0] + m * batch[0],
        (1 - m) * running[1] + m * batch[1] * (count / (count - 1)),
    )


class FixedPool(nn.Module):
    """:class:`~lls.method.latent.LatentPool` (the LLS latent of a block output) with operators
    whose backward the portable kernels have: equal to it to float rounding (tested)."""

    def __init__(self, pooling: LatentPool) -> None:
        super().__init__()
        self.mode, self.pool, self.out_shape = pooling.mode, pooling.pool, pooling.out_shape
        self.even = False
        if self.mode == "pooled":
            _, h, w = self.out_shape
            self.even = h % self.pool == 0 and w % self.pool == 0
            self.register_buffer("rows", pooling_matrix(h, self.pool).float(), persistent=False)
            self.register_buffer("cols", pooling_matrix(w, self.pool).float(), persistent=False)
        if self.mode == "dense":
            self.register_buffer(
                "matrix", pooling_matrix(self.out_shape[0], self.pool).float(), persistent=False
            )

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if self.mode == "tokens":
            return a.mean(1)
        if self.mode == "dense":
            return a @ self.matrix.T
        if self.mode != "pooled":
            return a.flatten(1)
        n, c, h, w = a.shape
        p = self.pool
        if self.even:
            return a.reshape(n, c, p, h // p, p, w // p).mean((3, 5)).flatten(1)
        return torch.matmul(torch.matmul(self.rows, a), self.cols.T).flatten(1)


class FixedAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` between blocks (BP differentiates through it), as :class:`FixedPool`."""

    def __init__(self, size: int, in_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.pool = FixedPool(LatentPool(in_shape, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x).view(x.shape[0], x.shape[1], self.pool.pool, self.pool.pool)


class WindowMax(nn.Module):
    """``nn.MaxPool2d(k)`` (stride k, no padding) as a reshape and ``amax``. ExecuTorch's portable
    kernel for max pooling's backward gives wrong gradients (BP's program through a 2x2 max-pool
    differed from PyTorch's step by 500x in the first block), while ``amax``'s backward is right.
    Where a window holds two equal maxima they share its gradient (max pooling gives it to one);
    float activations rarely tie."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        k = self.k
        x = x[:, :, : h // k * k, : w // k * k]
        return x.reshape(n, c, h // k, k, w // k, k).amax(dim=(3, 5))


def _window(pool: nn.MaxPool2d) -> int | None:
    """The window of a max pool WindowMax can stand for (square, stride = window, no padding)."""
    k, s = pool.kernel_size, pool.stride
    square = isinstance(k, int) or len(set(k)) == 1
    k = k if isinstance(k, int) else k[0]
    plain = pool.padding in (0, (0, 0)) and pool.dilation in (1, (1, 1)) and not pool.ceil_mode
    return k if square and s in (k, (k, k)) and plain and not pool.return_indices else None


def exportable(module: nn.Module, in_shape: tuple[int, ...] | None = None) -> nn.Module:
    """A contiguous float copy of ``module`` with every BatchNorm a :class:`BatchStatsNorm`, every
    ``lls`` LeakyReLU an ``nn.LeakyReLU`` and every adaptive average pool (inputs of ``in_shape``,
    without batch) a fixed one. Parameter names are kept."""
    module = copy.deepcopy(module).to(memory_format=torch.contiguous_format)
    return _swap(module, in_shape)


def _swap(module: nn.Module, in_shape: tuple[int, ...] | None) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return BatchStatsNorm(module)
    if isinstance(module, nn.MaxPool2d) and _window(module):
        return WindowMax(_window(module))
    if type(module) is LeakyReLU:
        return nn.LeakyReLU(module.negative_slope)
    if isinstance(module, nn.AdaptiveAvgPool2d) and in_shape is not None and len(in_shape) == 3:
        size = module.output_size
        if isinstance(size, int) or len(set(size)) == 1:
            return FixedAdaptiveAvgPool2d(size if isinstance(size, int) else size[0], in_shape)
    for name, child in module.named_children():
        child_shape = in_shape if isinstance(module, nn.Sequential) else None
        setattr(module, name, _swap(child, child_shape))
        if isinstance(module, nn.Sequential) and in_shape is not None:
            in_shape = _shape_after(child, in_shape)
    return module


def _shape_after(layer: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape after one of the fixed ops between blocks (None where it is not known here)."""
    if isinstance(layer, nn.MaxPool2d) and len(shape) == 3:
        return (shape[0], shape[1] // 2, shape[2] // 2)
    if isinstance(layer, (nn.Dropout, nn.Identity)):
        return shape
    return None


def norms(module: nn.Module) -> list[tuple[str, BatchStatsNorm]]:
    """The :class:`BatchStatsNorm` layers of ``module`` in call order (their names in it)."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, BatchStatsNorm)]


__all__ = [
    "BatchStatsNorm",
    "FixedAdaptiveAvgPool2d",
    "FixedPool",
    "WindowMax",
    "exportable",
    "norms",
    "running_update",
]
