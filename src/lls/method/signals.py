"""Block signals: what turns a block's output (and the labels) into its local loss.

:func:`lls_loss` is the LLS loss itself, in a few lines; :class:`ProjectionSignal` applies it to a
block (LLS, its variants, local learned classifiers) and :class:`FeedbackSignal` is DFA's and DRTP's
surrogate loss. The method is docs/method.md's ("The local loss", "The comparison rules").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LLSError
from .basis import BASIS_KINDS
from .basis import basis as basis_values
from .fused import FusedProjection
from .latent import LatentPool, latent, latent_dim

NORMALIZE_EPS = 1e-12  # eps of the row-wise L2 normalisation max(||a||, eps)
MODULATION_INIT_STD = 0.01  # N(0, 0.01^2) init of LLS-M's vector and LLS-MxM's matrix
CLASSIFIER_INIT_STD = 0.1  # N(0, 0.1^2) init of the local learned classifiers
FEEDBACK_SCALE = 1e-4  # DFA / DRTP feedback matrices are drawn from U[0, 1e-4) (the specification)
# U[0, s) is the reference code's draw (all entries positive); "centred" draws from U[-s, s), zero
# mean, so that onehot(y) @ F does not push every unit of a block the same way for every class
FEEDBACK_KINDS = ("uniform", "centred")
LEARNED_READOUT = "learned classifier"  # the readout of a local learned classifier

__all__ = [
    "BlockSignal",
    "FeedbackSignal",
    "ProjectionSignal",
    "block_seed",
    "latent",
    "latent_dim",
    "lls_loss",
    "lls_scores",
    "scores_loss",
]


# --- the LLS loss ---------------------------------------------------------------------------------
# Pure functions of tensors (no module state, no device or autocast logic): every path that trains a
# block with LLS (the eager signal, the graph engine's fused form, the sliced low-memory step, mixed
# precision) computes this loss, and tests/test_lls_loss.py holds each of them to it.


def lls_scores(
    latent: torch.Tensor, basis: torch.Tensor, *, normalize: bool = True, eps: float = NORMALIZE_EPS
) -> torch.Tensor:
    """The N x K scores ``s = normalise(z) @ B^T`` of latents ``z`` (N x d) against a K x d basis."""
    if normalize:
        latent = F.normalize(latent, dim=1, eps=eps)
    return latent @ basis.T


def modulated(scores: torch.Tensor, modulation: torch.Tensor | None = None) -> torch.Tensor:
    """LLS-M's ``s * m`` (a K-vector), LLS-MxM's ``s @ M`` (a rows x K matrix), or ``s`` itself."""
    if modulation is None:
        return scores
    return scores * modulation if modulation.dim() == 1 else scores @ modulation


def scores_loss(
    scores: torch.Tensor,
    temperature: float,
    labels: torch.Tensor,
    modulation: torch.Tensor | None = None,
) -> torch.Tensor:
    """``CE(modulate(s) / T, y)``, the loss from the scores (mean over the batch)."""
    return F.cross_entropy(modulated(scores, modulation) / temperature, labels)


def lls_loss(
    latent: torch.Tensor,
    basis: torch.Tensor,
    temperature: float,
    labels: torch.Tensor,
    modulation: torch.Tensor | None = None,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """The LLS loss of latents ``z`` (N x d) with labels ``y``: ``CE(modulate(normalise(z) @ B^T) / T, y)``.

    ``basis``: the K x d fixed basis (or a learned classifier's matrix, with ``normalize=False``);
    ``modulation``: None (LLS), a K-vector (LLS-M) or a rows x K matrix (LLS-MxM, ``basis`` then
    has ``rows`` rows).
    """
    return scores_loss(lls_scores(latent, basis, normalize=normalize), temperature, labels, modulation)


def block_seed(seed: int, index: int) -> int:
    """Seed of block ``index``'s fixed random tensors, so that blocks do not share them."""
    return seed * 100_003 + index


class BlockSignal(nn.Module):
    """The learning signal of one block: ``forward(a, y, logits) -> scalar loss``.

    ``a`` is the block's output (a graph leaf's descendant: the trainer detaches the block's input),
    ``y`` the integer labels and ``logits`` the head's output, given only to ``timing == "head"``
    rules. Parameters registered here are the rule's extra trainable parameters for this block and
    are updated by this block's optimizer; fixed tensors are non-persistent buffers (rebuilt from
    the rule's options, never in a checkpoint).
    """

    # How the loss combines the samples of a batch: "mean" (a slice's loss weighs by its share of the
    # batch) or "sum" (slices add up as they are). The low-memory step (lowmem.py) needs to know.
    batch_reduction: ClassVar[Literal["mean", "sum"]] = "mean"
    # The name of the block's own readout (its per-block accuracy is reported under it); None: the
    # signal has none, and blocks are read out by ridge probes (readout.py).
    readout: str | None = None

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

    def ops(self, out_shape: torch.Size) -> tuple[int, int]:
        """(multiplies, additions) per sample that the signal spends to give the block its gradient
        at the output, forward and backward (``lls cost``'s learning signal)."""
        raise LLSError(f"{type(self).__name__} does not say what its signal costs; give it an ops() method")

    def predict(self, a: torch.Tensor) -> torch.Tensor:
        """The classes the block predicts from its output ``a`` with the signal's own readout."""
        raise LLSError(f"{type(self).__name__} has no readout of its own; read its blocks with ridge probes")

    def class_patterns(self) -> torch.Tensor | None:
        """The fixed K x d pattern of each class that latents should line up with (``lls diagnose``'s
        synchronisation), or None where the signal has none (learned or reduced readouts, feedback)."""
        return None

    def fused(
        self, out_shape: torch.Size, *, device: torch.device, dtype: torch.dtype
    ) -> Callable[..., torch.Tensor] | None:
        """The same loss with a closed-form backward for outputs of ``out_shape`` (the graph engine's
        fast path, fused.py), or None where the signal has none (the engine runs the signal itself)."""
        return None


class ProjectionSignal(BlockSignal):
    """LLS and its relatives: scores ``s = normalise(z) @ B^T`` (optionally modulated), loss ``CE(s / T, y)``.

    ``basis`` is a basis kind (basis.py; fixed, built once into a non-persistent buffer) or None for
    a local learned classifier (a trainable K x d matrix, never normalised). ``modulation`` is
    ``None``, ``"vector"`` (LLS-M, ``s * m``) or ``"matrix"`` (LLS-MxM, ``s @ M`` with M of shape
    rows x K).

    ``width``: the random basis is drawn, and the learned classifier trained, as a K x width
    matrix average-pooled to K x d (the reference code's convention); ``None`` (or ``d``) makes it
    K x d directly.

    The loss is :func:`lls_loss`, in two pieces: :meth:`project` (the N x d work: normalise and
    score, :func:`lls_scores`) and :meth:`scores_loss`; the fused form replaces the first with its
    closed-form backward and calls the second as it is.
    """

    eps: ClassVar[float] = NORMALIZE_EPS

    def __init__(
        self,
        num_classes: int,
        out_shape: torch.Size | tuple[int, ...],
        pool: int | None,
        *,
        basis: str | None,
        temperature: float,
        seed: int = 0,
        modulation: Literal["vector", "matrix"] | None = None,
        rows: int | None = None,
        width: int | None = None,
    ) -> None:
        super().__init__()
        self.pooling = LatentPool(out_shape, pool)
        dim = self.pooling.dim
        self.num_classes, self.dim, self.pool = num_classes, dim, pool
        self.kind = BASIS_KINDS.get(basis) if basis is not None else None
        self.temperature, self.seed = temperature, seed
        self.normalize = self.kind.normalized if self.kind is not None else False
        self.readout = self.kind.readout if self.kind is not None else LEARNED_READOUT
        self.rows = rows or num_classes
        self.width = width if width != dim else None
        if modulation != "matrix" and self.rows != num_classes:
            raise ValueError("a reduced basis (rows != classes) needs a matrix modulation")
        self.classifier = (
            nn.Parameter(CLASSIFIER_INIT_STD * torch.randn(self.rows, width or dim))
            if self.kind is None
            else None
        )
        self.modulation = None
        if modulation == "vector":
            self.modulation = nn.Parameter(MODULATION_INIT_STD * torch.randn(num_classes))
        elif modulation == "matrix":
            self.modulation = nn.Parameter(MODULATION_INIT_STD * torch.randn(self.rows, num_classes))
        fixed = None
        if self.kind is not None:  # float64 values: a move to the network's dtype casts them once
            fixed = basis_values(self.rows, dim, self.kind.name, seed, width=self.width, dtype=torch.float64)
        self.register_buffer("basis", fixed, persistent=False)

    def readout_matrix(self, like: torch.Tensor) -> torch.Tensor:
        """The rows x d matrix the latent is scored against, on ``like``'s device and dtype."""
        if self.classifier is not None:
            if self.width is None:
                return self.classifier
            return F.adaptive_avg_pool1d(self.classifier, self.dim)  # differentiable: trains all of it
        return self.basis.to(like.device, like.dtype)

    def latent(self, a: torch.Tensor) -> torch.Tensor:
        return self.pooling(a)

    def _check_dim(self, z: torch.Tensor) -> None:
        if z.shape[1] != self.dim:
            raise LLSError(f"block output has latent size {z.shape[1]}, its signal was built for {self.dim}")

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """The N x rows scores of latents ``z`` before modulation: ``normalise(z) @ R^T``."""
        self._check_dim(z)
        return lls_scores(z, self.readout_matrix(z), normalize=self.normalize, eps=self.eps)

    def modulate(self, s: torch.Tensor) -> torch.Tensor:
        """LLS-M's ``s * m``, LLS-MxM's ``s @ M``, or ``s`` as it is (:func:`modulated`)."""
        return modulated(s, self.modulation)

    def scores_loss(self, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss from :meth:`project`'s scores: ``CE(modulate(s) / T, y)`` (:func:`scores_loss`)."""
        return scores_loss(s, self.temperature, y, self.modulation)

    def scores(self, a: torch.Tensor) -> torch.Tensor:
        return self.latent_scores(self.latent(a))

    def latent_scores(self, z: torch.Tensor) -> torch.Tensor:
        return self.modulate(self.project(z))

    def latent_loss(
        self, z: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        self._check_dim(z)
        return lls_loss(
            z, self.readout_matrix(z), self.temperature, y, self.modulation, normalize=self.normalize
        )

    def predict(self, a: torch.Tensor) -> torch.Tensor:
        return self.scores(a).argmax(1)

    def class_patterns(self) -> torch.Tensor | None:
        return self.basis if self.basis is not None and self.rows == self.num_classes else None

    def fused(self, out_shape, *, device, dtype):
        return FusedProjection(self, out_shape, device=device, dtype=dtype)

    def ops(self, out_shape: torch.Size) -> tuple[int, int]:
        """Pooling (:meth:`LatentPool.ops`); normalisation: d squares + d-1 additions for the norm, d
        divisions, backward ``(g - z (z.g)) / |a|``: 3d multiplies and 2d additions; scoring
        ``z @ B^T`` and its backward ``g @ B``: the basis kind's :meth:`~BasisKind.scoring_ops`
        (K*d multiply-adds each way; additions only for sign bases). A learned classifier also
        computes its weight gradient (K*d more multiply-adds); one trained at a width W != d is
        pooled to K x d once per step, not per sample (K*W / batch, left out), and a random basis
        drawn at W is pooled once, when the signal is built. Modulation: K (vector) or R*K (matrix)
        multiply-adds forward, twice that backward. The softmax cross-entropy on K scores (O(K)) is
        not counted."""
        d, rows = self.dim, self.rows
        mults, adds = LatentPool(out_shape, self.pool).ops()
        if self.normalize:
            mults += d + d + 3 * d
            adds += (d - 1) + 2 * d
        learned = (3 * rows * d, 3 * rows * d)  # scores, their backward and the classifier's gradient
        scoring = self.kind.scoring_ops(rows, d) if self.kind is not None else learned
        mults, adds = mults + scoring[0], adds + scoring[1]
        if self.modulation is not None:
            size = self.modulation.numel()
            mults += 3 * size
            adds += 3 * size
        return mults, adds


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

    def ops(self, out_shape: torch.Size) -> tuple[int, int]:
        """The projection ``t @ F``: K x (size of the block output) multiply-adds."""
        size = self.num_classes * math.prod(out_shape)
        return size, size
