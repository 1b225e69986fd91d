"""Block signals: what turns a block's output (and the labels) into its local loss.

A :class:`BlockSignal` is an ``nn.Module`` holding one block's extra parameters and fixed buffers
for a rule (rules.py makes them): :class:`ProjectionSignal` for the LLS family and local learned
classifiers (METHOD.md section 3: pool, normalise, score against a basis or a learned matrix,
cross-entropy at temperature T), :class:`FeedbackSignal` for DFA and DRTP (section 5: a fixed
random projection of the output error or the target onto the block's output). The LLS latent
(:func:`latent`) and its length (:func:`latent_dim`) live here too, for every module that reads a
block output the way the loss does.
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LLSError
from .basis import basis

NORMALIZE_EPS = 1e-12  # eps of the row-wise L2 normalisation max(||a||, eps)
MODULATION_INIT_STD = 0.01  # N(0, 0.01^2) init of LLS-M's vector and LLS-MxM's matrix
CLASSIFIER_INIT_STD = 0.1  # N(0, 0.1^2) init of the local learned classifiers
FEEDBACK_SCALE = 1e-4  # DFA / DRTP feedback matrices are drawn from U[0, 1e-4) (the specification)
# U[0, s) is the reference code's draw (all entries positive); "centred" draws from U[-s, s), zero
# mean, so that onehot(y) @ F does not push every unit of a block the same way for every class
FEEDBACK_KINDS = ("uniform", "centred")


def latent(a: torch.Tensor, pool: int | None) -> torch.Tensor:
    """A block output as the flat latent the LLS-family losses score (METHOD.md section 3, step 2).

    Conv outputs are average-pooled adaptively to ``pool x pool`` (PyTorch's ``adaptive_avg_pool2d``
    bins) and flattened channel-major, ``d = C * pool^2``. Flat (dense) outputs are average-pooled
    adaptively to length ``pool`` as the reference code does (``adaptive_avg_pool1d``: 1024 -> 2048
    repeats every entry, 4096 -> 2048 averages pairs). With ``pool`` None, outputs are flattened as
    they are. A (N, tokens, dim) output (a transformer block's) is scored by its mean over tokens.
    """
    if a.dim() == 3:
        return a.mean(1)
    if pool is None:
        return a.flatten(1)
    if a.dim() == 2:
        return a if a.shape[1] == pool else F.adaptive_avg_pool1d(a.unsqueeze(1), pool).squeeze(1)
    if a.dim() != 4:
        return a.flatten(1)
    if not a.is_contiguous(memory_format=torch.channels_last) or a.shape[1] == 1:
        return F.adaptive_avg_pool2d(a, pool).flatten(1)
    # Channels-last: adaptive_avg_pool2d's backward (and torch.matmul's, which transposes a
    # broadcast operand) hands back a channels-first gradient, and every backward kernel of the
    # block then runs on mismatched strides (measured 5x slower for LeakyReLU's). The same pooling
    # as two explicit batched matmuls over the (N, H, W, C) view keeps the gradient channels-last.
    n, c, h, w = a.shape
    rows, cols = pooling_matrix(h, pool, a.dtype, a.device), pooling_matrix(w, pool, a.dtype, a.device)
    pooled = torch.bmm(rows.expand(n, pool, h), a.permute(0, 2, 3, 1).reshape(n, h, w * c))
    pooled = torch.bmm(cols.expand(n * pool, pool, w), pooled.view(n * pool, w, c))
    return pooled.view(n, pool, pool, c).permute(0, 3, 1, 2).flatten(1)


@functools.lru_cache(maxsize=64)
def pooling_matrix(size: int, pool: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``pool x size`` matrix averaging the adaptive-pooling bins [i*size//pool, ceil((i+1)*size/pool))."""
    matrix = torch.zeros(pool, size, dtype=torch.float64)
    for i in range(pool):
        start, end = (i * size) // pool, -(-(i + 1) * size // pool)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix.to(device=device, dtype=dtype)


def latent_dim(out_shape: torch.Size, pool: int | None) -> int:
    """``d_l``, the length of :func:`latent` of an output of shape ``out_shape`` (without batch)."""
    if len(out_shape) == 3 and pool is not None:
        return out_shape[0] * pool * pool
    if len(out_shape) == 1 and pool is not None:
        return pool
    if len(out_shape) == 2:  # (tokens, dim): the token mean
        return out_shape[1]
    return math.prod(out_shape)


def block_seed(seed: int, index: int) -> int:
    """Seed of block ``index``'s fixed random tensors, so that blocks do not share them."""
    return seed * 100_003 + index


class BlockSignal(nn.Module):
    """The learning signal of one block: ``forward(a, y, logits) -> scalar loss``.

    ``a`` is the block's output (a graph leaf's descendant: the trainer detaches the block's input),
    ``y`` the integer labels and ``logits`` the head's output, given only to ``timing == "head"``
    rules. Parameters registered here are the rule's extra trainable parameters for this block and
    are updated by this block's optimizer.
    """

    # How the loss combines the samples of a batch: "mean" (a slice's loss weighs by its share of the
    # batch) or "sum" (slices add up as they are). The low-memory step (lowmem.py) needs to know.
    batch_reduction: ClassVar[Literal["mean", "sum"]] = "mean"

    def forward(self, a: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        return self.latent_loss(self.latent(a), y, logits)

    def latent(self, a: torch.Tensor) -> torch.Tensor:
        """What of the block output the loss reads (all of it unless a signal says less): the
        low-memory step keeps this one's gradient, when it is smaller than ``a``, instead of
        recomputing the loss."""
        return a

    def latent_loss(
        self, z: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss from :meth:`latent`'s output; ``forward`` is ``latent_loss(latent(a), y, logits)``."""
        raise NotImplementedError


class ProjectionSignal(BlockSignal):
    """LLS and its relatives: scores ``s = z @ B^T`` (optionally modulated), loss ``CE(s / T, y)``.

    ``readout`` is a basis kind (fixed, regenerated on demand, never stored) or ``"learned"`` for a
    local learned classifier (a trainable K x d matrix). ``modulation`` is ``None``, ``"vector"``
    (LLS-M, ``s * m``) or ``"matrix"`` (LLS-MxM, ``s @ M`` with M of shape rows x K).

    ``width``: the random basis is drawn, and the learned classifier trained, as a K x width
    matrix average-pooled to K x d each time it is used (the reference code's convention);
    ``None`` (or ``d``) makes it K x d directly.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        pool: int | None,
        *,
        readout: str,
        temperature: float,
        normalize: bool,
        seed: int = 0,
        modulation: Literal["vector", "matrix"] | None = None,
        rows: int | None = None,
        width: int | None = None,
    ) -> None:
        super().__init__()
        self.num_classes, self.dim, self.pool = num_classes, dim, pool
        self.readout, self.temperature, self.normalize, self.seed = readout, temperature, normalize, seed
        self.rows = rows or num_classes
        self.width = width if width != dim else None
        if modulation != "matrix" and self.rows != num_classes:
            raise ValueError("a reduced basis (rows != classes) needs a matrix modulation")
        self.classifier = (
            nn.Parameter(CLASSIFIER_INIT_STD * torch.randn(self.rows, width or dim))
            if readout == "learned"
            else None
        )
        self.modulation = None
        if modulation == "vector":
            self.modulation = nn.Parameter(MODULATION_INIT_STD * torch.randn(num_classes))
        elif modulation == "matrix":
            self.modulation = nn.Parameter(MODULATION_INIT_STD * torch.randn(self.rows, num_classes))

    def readout_matrix(self, like: torch.Tensor) -> torch.Tensor:
        """The rows x d matrix the latent is scored against, on ``like``'s device and dtype."""
        if self.classifier is not None:
            if self.width is None:
                return self.classifier
            return F.adaptive_avg_pool1d(self.classifier, self.dim)  # differentiable: trains all of it
        return basis(
            self.rows,
            self.dim,
            self.readout,
            self.seed,
            width=self.width,
            device=like.device,
            dtype=like.dtype,
        )

    def latent(self, a: torch.Tensor) -> torch.Tensor:
        return latent(a, self.pool)

    def scores(self, a: torch.Tensor) -> torch.Tensor:
        return self.latent_scores(self.latent(a))

    def latent_scores(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[1] != self.dim:
            raise LLSError(f"block output has latent size {z.shape[1]}, its signal was built for {self.dim}")
        if self.normalize:
            z = F.normalize(z, dim=1, eps=NORMALIZE_EPS)
        s = z @ self.readout_matrix(z).T
        if self.modulation is not None:
            s = s * self.modulation if self.modulation.dim() == 1 else s @ self.modulation
        return s

    def latent_loss(
        self, z: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        return F.cross_entropy(self.latent_scores(z) / self.temperature, y)


class FeedbackSignal(BlockSignal):
    """DFA / DRTP: a fixed random projection ``F`` (K x size of the block output) of a K-vector.

    The loss is the surrogate ``sum(a * (t @ F))`` whose gradient with respect to ``a`` is exactly
    ``t @ F``: ``t = softmax(logits) - onehot(y)`` for DFA, ``t = onehot(y)`` for DRTP. ``F`` is
    regenerated from its seed (a non-persistent buffer), like the LLS basis.
    """

    batch_reduction: ClassVar[Literal["mean", "sum"]] = "sum"  # each sample's gradient is t @ F, unscaled

    def __init__(
        self, num_classes: int, out_shape: torch.Size, *, use_error: bool, seed: int, kind: str = "uniform"
    ) -> None:
        super().__init__()
        self.num_classes, self.use_error = num_classes, use_error
        generator = torch.Generator().manual_seed(seed)
        draw = torch.rand(num_classes, math.prod(out_shape), generator=generator)
        feedback = FEEDBACK_SCALE * (draw if kind == "uniform" else 2 * draw - 1)
        self.register_buffer("feedback", feedback, persistent=False)

    def target(self, y: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
        onehot = F.one_hot(y, self.num_classes).to(self.feedback.dtype)
        if not self.use_error:
            return onehot
        if logits is None:
            raise ValueError("DFA's signal needs the head's logits")
        return torch.softmax(logits.detach(), dim=1) - onehot

    def latent_loss(
        self, z: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        grad = (self.target(y, logits) @ self.feedback).view_as(z)
        return (z * grad).sum()
