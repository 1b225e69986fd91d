"""The LLS latent of a block output: what the LLS-family losses score.

:class:`LatentPool` pools a block output to its latent (adaptive average pooling, flattened
channel-major; docs/method.md, "The loss in code"), and also in memory order for the closed-form
backward (:meth:`LatentPool.flat`, :meth:`LatentPool.spread`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# The order of a latent's columns: channel-major (C, h, w), the flattening of a contiguous conv
# output and the order the loss is defined in, or position-major (h, w, C), a channels-last one's.
CHANNEL_MAJOR, POSITION_MAJOR = "channel-major", "position-major"


def pooling_bins(size: int, pool: int) -> list[tuple[int, int]]:
    """The ``pool`` adaptive-average bins over ``size`` entries: [i*size//pool, ceil((i+1)*size/pool))."""
    return [((i * size) // pool, -(-(i + 1) * size // pool)) for i in range(pool)]


def pooling_matrix(size: int, pool: int) -> torch.Tensor:
    """``pool x size`` float64 matrix averaging each of :func:`pooling_bins`."""
    matrix = torch.zeros(pool, size, dtype=torch.float64)
    for i, (start, end) in enumerate(pooling_bins(size, pool)):
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def latent_dim(out_shape: torch.Size | tuple[int, ...], pool: int | None) -> int:
    """``d_l``, the length of the latent of an output of shape ``out_shape`` (without batch)."""
    if len(out_shape) == 3 and pool is not None:
        return out_shape[0] * pool * pool
    if len(out_shape) == 1 and pool is not None:
        return pool
    if len(out_shape) == 2:  # (tokens, dim): the token mean
        return out_shape[1]
    return math.prod(out_shape)


def pooling_ops(sizes: tuple[int, ...], pool: int) -> tuple[int, int]:
    """(multiplies, additions) of adaptive average pooling over ``sizes`` (one channel) to ``pool``
    per dimension, forward and backward.

    Forward: each bin sums its entries (length - 1 additions) and scales the sum (one multiply,
    none for a bin of one entry, a copy). Backward: each bin scales its gradient (one multiply,
    again none for a copy) and every entry adds up the gradients of the bins holding it (bins - 1
    additions; pooling a 1024-vector up to 2048 therefore costs 1024 additions, all backward).
    Bins overlap when ``pool`` does not divide ``size``, and hold one entry each when ``pool >=
    size``, which then repeats entries.
    """
    per_dim = [[end - start for start, end in pooling_bins(size, pool)] for size in sizes]
    bins = pool ** len(sizes)
    entries = math.prod(sizes)
    held = math.prod(sum(lengths) for lengths in per_dim)  # (bin, entry) pairs
    copies = math.prod(sum(length == 1 for length in lengths) for lengths in per_dim)
    mults = 2 * (bins - copies)
    adds = (held - bins) + (held - entries)
    return mults, adds


def latent(a: torch.Tensor, pool: int | None) -> torch.Tensor:
    """The latent of ``a`` (any shape), for readers that hold no signal (ridge probes, diagnostics)."""
    return LatentPool(a.shape[1:], pool).to(a.device, a.dtype)(a)


class LatentPool(nn.Module):
    """How block outputs of ``out_shape`` (without batch) become latents of length :attr:`dim`."""

    def __init__(self, out_shape: torch.Size | tuple[int, ...], pool: int | None) -> None:
        super().__init__()
        self.out_shape, self.pool = tuple(out_shape), pool
        self.dim = latent_dim(self.out_shape, pool)
        self.conv = len(self.out_shape) == 3
        # "map": a conv output's (C, H, W) is the latent as it is; "pooled": pooled to p x p;
        # "dense": a flat output pooled to length p; "tokens": the mean over tokens; "flat": as it is
        if len(self.out_shape) == 2:
            self.mode = "tokens"
        elif self.conv:
            self.mode = "map" if pool is None else "pooled"
        elif len(self.out_shape) == 1 and pool is not None and pool != self.out_shape[0]:
            self.mode = "dense"
        else:
            self.mode = "flat"
        if self.mode == "pooled":
            _, h, w = self.out_shape
            self.register_buffer("rows", pooling_matrix(h, pool), persistent=False)
            self.register_buffer("cols", pooling_matrix(w, pool), persistent=False)
            # uneven bins (e.g. 7 -> 2): the backward is a product with this (p*p) x (H*W) matrix
            spread = None
            if h % pool or w % pool:
                spread = torch.einsum("ih,jw->ijhw", self.rows, self.cols).reshape(pool * pool, h * w)
            self.register_buffer("spread_matrix", spread, persistent=False)
        if self.mode == "dense":  # the pooling matrix's nonzeros: (bin, entry, 1 / bin length)
            bins = pooling_bins(self.out_shape[0], pool)
            lengths = torch.tensor([end - start for start, end in bins])
            entries = torch.cat([torch.arange(start, end) for start, end in bins])
            self.register_buffer(
                "dense_bins", torch.arange(pool).repeat_interleave(lengths), persistent=False
            )
            self.register_buffer("dense_entries", entries, persistent=False)
            weights = (1.0 / lengths.double()).repeat_interleave(lengths)
            self.register_buffer("dense_weights", weights, persistent=False)

    def ops(self) -> tuple[int, int]:
        """(multiplies, additions) per sample of the pooling, forward and backward (:func:`pooling_ops`
        per channel of a conv output, or on a dense output); flattening costs nothing."""
        if self.mode == "pooled":
            mults, adds = pooling_ops(self.out_shape[1:], self.pool)
            return self.out_shape[0] * mults, self.out_shape[0] * adds
        if self.mode == "dense":
            return pooling_ops(self.out_shape, self.pool)
        if self.mode == "tokens":  # (T - 1) d additions and d scalings forward; d scalings backward
            tokens, dim = self.out_shape
            return 2 * dim, (tokens - 1) * dim
        return 0, 0

    # --- the definition ----------------------------------------------------------------------------

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        pool = self.pool
        if self.mode == "tokens":
            return a.mean(1)
        if self.mode in ("map", "flat") or a.dim() not in (2, 4):
            return a.flatten(1)
        if a.dim() == 2:
            return a if a.shape[1] == pool else F.adaptive_avg_pool1d(a.unsqueeze(1), pool).squeeze(1)
        if not a.is_contiguous(memory_format=torch.channels_last) or a.shape[1] == 1:
            return F.adaptive_avg_pool2d(a, pool).flatten(1)
        # Channels-last: adaptive_avg_pool2d's backward (and torch.matmul's, which transposes a
        # broadcast operand) hands back a channels-first gradient, and every backward kernel of the
        # block then runs on mismatched strides (measured 5x slower for LeakyReLU's). The same pooling
        # as two explicit batched matmuls over the (N, H, W, C) view keeps the gradient channels-last.
        n, c, h, w = a.shape
        rows, cols = self._matrices(h, w, a)
        pooled = torch.bmm(rows.expand(n, pool, h), a.permute(0, 2, 3, 1).reshape(n, h, w * c))
        pooled = torch.bmm(cols.expand(n * pool, pool, w), pooled.view(n * pool, w, c))
        return pooled.view(n, pool, pool, c).permute(0, 3, 1, 2).flatten(1)

    def _matrices(self, h: int, w: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if (h, w) == tuple(self.out_shape[1:]):
            rows, cols = self.rows, self.cols
        else:  # an output of another size than the one this module was built for
            rows, cols = pooling_matrix(h, self.pool), pooling_matrix(w, self.pool)
        return rows.to(like.device, like.dtype), cols.to(like.device, like.dtype)

    # --- the same pooling, for a closed-form backward ------------------------------------------------

    def flat(self, a: torch.Tensor) -> tuple[torch.Tensor, str]:
        """The (N, d) latent of ``a`` (no autograd), and the order of its columns: the order in which
        ``a``'s memory holds it, so that no layout copy is made either way."""
        if self.mode == "dense":
            return F.adaptive_avg_pool1d(a.unsqueeze(1), self.pool).squeeze(1), CHANNEL_MAJOR
        if self.mode == "tokens":
            return a.mean(1), CHANNEL_MAJOR
        if not self.conv:
            return a.flatten(1), CHANNEL_MAJOR
        pooled = a if self.mode == "map" else F.adaptive_avg_pool2d(a, self.pool)
        if not a.is_contiguous() and a.is_contiguous(memory_format=torch.channels_last):
            return pooled.permute(0, 2, 3, 1).reshape(len(a), -1), POSITION_MAJOR
        return pooled.reshape(len(a), -1), CHANNEL_MAJOR

    def spread(self, g: torch.Tensor, order: str) -> torch.Tensor:
        """The gradient with respect to the block output from the latent's gradient ``g`` (N, d) in
        ``order``, in the block output's memory format: each pooling bin's share, by one broadcast
        multiply (even bins: 1 / area each) or one product with the pooling matrix (uneven)."""
        if self.mode == "dense":  # each entry gathers the shares of the bins that hold it
            shares = g.index_select(1, self.dense_bins) * self.dense_weights
            return g.new_zeros(len(g), *self.out_shape).index_add_(1, self.dense_entries, shares)
        if self.mode == "tokens":  # every token gets 1 / T of the mean's gradient
            return (g / self.out_shape[0]).unsqueeze(1).expand(len(g), *self.out_shape)
        if not self.conv:
            return g.view(len(g), *self.out_shape)
        n, (c, h, w) = g.shape[0], self.out_shape
        ph, pw = (h, w) if self.mode == "map" else (self.pool, self.pool)
        kh, kw, uneven = h // ph, w // pw, self.mode == "pooled" and self.spread_matrix is not None
        if order == CHANNEL_MAJOR:
            if uneven:
                return (g.view(n * c, ph * pw) @ self.spread_matrix).view(n, c, h, w)
            if kh * kw == 1:
                return g.view(n, c, h, w)
            spread = g.view(n, c, ph, 1, pw, 1).expand(n, c, ph, kh, pw, kw)
            return torch.mul(spread, 1.0 / (kh * kw)).reshape(n, c, h, w)
        if uneven:
            return (
                torch.matmul(self.spread_matrix.T, g.view(n, ph * pw, c)).view(n, h, w, c).permute(0, 3, 1, 2)
            )
        if kh * kw == 1:
            return g.view(n, h, w, c).permute(0, 3, 1, 2)
        spread = g.view(n, ph, 1, pw, 1, c).expand(n, ph, kh, pw, kw, c)
        return torch.mul(spread, 1.0 / (kh * kw)).reshape(n, h, w, c).permute(0, 3, 1, 2)

    def to_order(self, matrix: torch.Tensor, order: str) -> torch.Tensor:
        """A rows x d matrix over channel-major latents with its columns in ``order``."""
        if order == CHANNEL_MAJOR:
            return matrix
        c, hw = self.out_shape[0], self.dim // self.out_shape[0]
        return matrix.reshape(matrix.shape[0], c, hw).transpose(1, 2).reshape(matrix.shape[0], -1)

    def from_order(self, matrix: torch.Tensor, order: str) -> torch.Tensor:
        """The inverse of :meth:`to_order`: columns in ``order`` back to channel-major."""
        if order == CHANNEL_MAJOR:
            return matrix
        c, hw = self.out_shape[0], self.dim // self.out_shape[0]
        return matrix.reshape(matrix.shape[0], hw, c).transpose(1, 2).reshape(matrix.shape[0], -1)
