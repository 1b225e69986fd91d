"""The LLS-family loss with a closed-form backward: fewer kernels than autograd's chain.

:class:`FusedProjection` is a :class:`~lls.method.signals.ProjectionSignal`'s loss with the
pooling, normalising and scoring replaced by one autograd function whose backward is written out
(docs/method.md, "The loss in code", has the derivation); the graph engine (engine.py) uses it.
Equal to the signal's loss to float rounding (tests/test_engine.py, tests/test_lls_loss.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from ..errors import LLSError
from .latent import CHANNEL_MAJOR, POSITION_MAJOR, LatentPool, latent_dim


class Projection(Protocol):
    """What this module reads of a :class:`~lls.method.signals.ProjectionSignal` (which builds its
    fused form from here, so this module names the signal's pieces instead of importing it)."""

    pool: int | None
    dim: int
    normalize: bool
    eps: float
    classifier: torch.nn.Parameter | None

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...
    def readout_matrix(self, like: torch.Tensor) -> torch.Tensor: ...
    def scores_loss(self, *args, **kwargs) -> torch.Tensor: ...


class FusedProjection:
    """The loss of a :class:`~lls.method.signals.ProjectionSignal` for block outputs of ``out_shape``
    (no batch), with the closed-form backward: ``FusedProjection(signal, out_shape)(a, y) -> loss``.

    Equal to ``signal(a, y)`` up to float rounding, in value and in gradients with respect to
    ``a`` and the signal's parameters. The signal's parameters are read at every call (the optimizer
    updates them in place); its fixed readout is read once, here.
    """

    def __init__(
        self,
        signal: Projection,
        out_shape: torch.Size | tuple[int, ...],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        out_shape = tuple(out_shape)
        if latent_dim(out_shape, signal.pool) != signal.dim:
            raise LLSError(
                f"block output {out_shape} has latent size {latent_dim(out_shape, signal.pool)}, "
                f"its signal was built for {signal.dim}"
            )
        self.signal = signal
        param = next(signal.parameters(), None)  # fixed bases have none: then device and dtype say
        device = device if device is not None else (param.device if param is not None else "cpu")
        ref = torch.empty(
            0, device=device, dtype=dtype or (param.dtype if param is not None else torch.float32)
        )
        # the signal's own pooling, for this shape, with its constants on this device
        self.pooling = LatentPool(out_shape, signal.pool).to(ref.device, ref.dtype)
        self.learned = signal.classifier is not None
        # fixed readouts in both column orders; learned ones are permuted at each call
        self.readout = {}
        if not self.learned:
            fixed = signal.readout_matrix(ref)
            self.readout = {
                order: self.pooling.to_order(fixed, order).contiguous() for order in _orders(out_shape)
            }

    def __call__(self, a: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """The loss, in closed form where that issues fewer kernels than the signal's own chain:
        always for normalised latents, and for channels-last outputs (whose chain pools through
        batched products); unnormalised others (random basis, local classifiers) keep the chain,
        which is as short there. ``logits`` is taken, and unused, as by the signal itself."""
        if not self.signal.normalize and (a.dim() != 4 or a.is_contiguous()):
            return self.signal(a, y, logits)
        return self.closed_form(a, y)

    def closed_form(self, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss with the closed-form backward, whatever the variant and layout."""
        learned = self.signal.readout_matrix(a) if self.learned else None  # autograd reaches the classifier
        return self.signal.scores_loss(_Projection.apply(a, learned, self), y)


def _orders(out_shape: tuple[int, ...]) -> tuple[str, ...]:
    return (CHANNEL_MAJOR, POSITION_MAJOR) if len(out_shape) == 3 else (CHANNEL_MAJOR,)


class _Projection(torch.autograd.Function):
    """Forward: the pooled latent p in memory order, s = p @ R^T, times inv = 1 / max(|p|, eps) when
    the signal normalises. Backward: g_p = (g_s * inv) @ R - p * inv * <g_s * inv, s>, g_R = (g_s *
    inv)^T @ p, and each pooling bin's share of g_p (docs/method.md, "The loss in code")."""

    @staticmethod
    def forward(ctx, a, learned, plan: FusedProjection):
        signal = plan.signal
        p, order = plan.pooling.flat(a)
        readout = plan.readout[order] if learned is None else plan.pooling.to_order(learned, order)
        s = p @ readout.T  # the pooled latent scored as it is: normalising is one per-row scale
        r = norm = None
        if signal.normalize:
            r = torch.linalg.vector_norm(p, dim=1, keepdim=True)
            norm = r.clamp_min(signal.eps)
            s = s / norm
        ctx.plan, ctx.order = plan, order
        ctx.save_for_backward(p, r, norm, readout, s)
        return s

    @staticmethod
    def backward(ctx, g_s):
        plan, order = ctx.plan, ctx.order
        p, r, norm, readout, s = ctx.saved_tensors
        g_q = g_s if norm is None else g_s / norm  # the gradient of p @ R^T
        g_learned = None
        if ctx.needs_input_grad[1]:
            g_learned = plan.pooling.from_order(g_q.T @ p, order)
        if not ctx.needs_input_grad[0]:
            return None, g_learned, None
        g_p = g_q @ readout
        if norm is not None:
            # dL/dp = inv * (g_z - z <z, g_z>) with g_z = g_s @ R, z = p * inv, <z, g_z> = <g_s, s>:
            # (g_s * inv) @ R - p * inv * <g_s * inv, s>. The norm's term vanishes where the clamp
            # holds (|p| < eps), as in autograd's chain.
            dot = torch.bmm(g_q.unsqueeze(1), s.unsqueeze(2)).view(-1, 1)
            g_p.addcmul_(p, (dot / norm).masked_fill_(r < plan.signal.eps, 0.0), value=-1.0)
        return plan.pooling.spread(g_p, order), g_learned, None


def block_losses(signals, out_shapes, *, device: torch.device, dtype: torch.dtype) -> list:
    """One loss callable per block, ``loss(a, y, logits)``: the signal's fused form where it has one
    (:meth:`~lls.method.signals.BlockSignal.fused`), else the signal itself. Every constant is made
    now, on ``device``."""
    losses = []
    for signal, shape in zip(signals, out_shapes, strict=True):
        fused = signal.fused(torch.Size(shape), device=device, dtype=dtype)
        losses.append(signal if fused is None else fused)
    return losses
