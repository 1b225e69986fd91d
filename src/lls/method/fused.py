"""The LLS-family local loss with a closed-form backward: fewer kernels than autograd's chain.

``ProjectionSignal`` (signals.py) writes the loss of METHOD.md section 3 as a chain of PyTorch ops:
pool, flatten, L2-normalise, score against the basis, modulate, divide by T, cross-entropy. Autograd
then runs one backward kernel per op, several of them over the whole N x d latent (the division's
two operands, the norm's, the clamp's mask, the sum of two gradient paths), plus a pooling
backward; with channels-last activations the chain also pools through two batched products. On a
GPU those launches, not the arithmetic, are the cost of the signal. With p the pooled latent,
inv = 1 / max(|p|, eps), W = B / T and u = s, s * m or s @ M where s = (p @ W^T) * inv, the
gradient written out is

    e    = (softmax(u) - onehot(y)) * dL / N                      (N x K)
    g_s  = e | e * m | e @ M^T             g_m = sum_n e * s,  g_M = s^T @ e
    g_p  = (g_s * inv) @ W  -  p * inv * <g_s * inv, s>           (<z, g_z> = <g_s, s>: N x K work)
    g_a  = each pooling bin's share of g_p                        (one broadcast multiply)

so the big tensors see one matrix product, one fused multiply-add and one broadcast write, and
everything else is N x K or N x 1. The basis is divided by T once, and its columns are permuted
once to the order in which a channels-last activation flattens (H, W, C), so neither the
activation nor its gradient is ever copied into another layout. (Unnormalised variants, the
random basis and local classifiers, have a short chain already; they run here too, for the
layout, with about the chain's op count.)

Rounding differs from the autograd chain (float32 results agree to ~1e-6 relative; tested against
autograd in float64 with gradcheck and in float32), so the eager engine keeps the chain, bit for
bit; the graph engine (engine.py) uses this. Constants are made once when a :class:`FusedProjection`
is built, never lazily inside a step: the graph engine issues blocks on several CUDA streams, and a
constant created on one stream and read on another would be a race.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import LLSError
from .signals import NORMALIZE_EPS, ProjectionSignal, latent_dim, pooling_matrix

# Where a block output's latent comes from: flat (dense), the (C, H, W) map as it is, or pooled.
# For a 4-D output, the latent is read in the order its memory holds it: channel-major for
# contiguous tensors, (H, W, C) for channels-last ones; the readout matrix's columns follow.
CHANNEL_MAJOR, POSITION_MAJOR = "channel-major", "position-major"


@dataclass(frozen=True)
class _Geometry:
    """How block outputs of one shape become latents: pooled side, pooling bins, sizes."""

    channels: int
    height: int
    width: int
    pool: int | None  # None: the map itself is the latent

    @property
    def side(self) -> tuple[int, int]:
        return (self.height, self.width) if self.pool is None else (self.pool, self.pool)

    @property
    def even(self) -> bool:
        """Whether every pooling bin has the same size (then the backward is a broadcast copy)."""
        return self.pool is None or (self.height % self.pool == 0 and self.width % self.pool == 0)


class FusedProjection:
    """The loss of a :class:`~lls.method.signals.ProjectionSignal` for block outputs of ``out_shape`` (no
    batch), with the closed-form backward: ``FusedProjection(signal, out_shape)(a, y) -> loss``.

    Equal to ``signal(a, y)`` up to float rounding, in value and in gradients with respect to
    ``a`` and the signal's parameters (LLS-M's vector, LLS-MxM's matrix, a local classifier's
    matrix). Works for every basis kind, reduced LLS-MxM, dense and conv latents, in either memory
    format. The signal's parameters are read at every call (the optimizer updates them in place).
    """

    def __init__(
        self,
        signal: ProjectionSignal,
        out_shape: torch.Size | tuple[int, ...],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        out_shape = tuple(out_shape)
        if not supports(signal, out_shape):
            raise LLSError(f"{type(signal).__name__} has no fused form here; use the signal itself")
        if latent_dim(torch.Size(out_shape), signal.pool) != signal.dim:
            raise LLSError(
                f"block output {out_shape} has latent size {latent_dim(torch.Size(out_shape), signal.pool)}, "
                f"its signal was built for {signal.dim}"
            )
        self.signal = signal
        self.inv_temperature = 1.0 / signal.temperature
        param = next(signal.parameters(), None)  # fixed bases have none: then device and dtype say
        ref = torch.empty(
            0,
            device=device if device is not None else (param.device if param is not None else "cpu"),
            dtype=dtype or (param.dtype if param is not None else torch.float32),
        )
        self.geometry = None
        if len(out_shape) == 3:
            c, h, w = out_shape
            self.geometry = _Geometry(c, h, w, signal.pool)
        self.learned = signal.classifier is not None
        # Fixed readouts: B / T in both column orders. Learned ones are permuted at each call.
        self.readout = {}
        if not self.learned:
            scaled = signal.readout_matrix(ref) * self.inv_temperature
            self.readout[CHANNEL_MAJOR] = scaled.contiguous()
            if self.geometry is not None:
                self.readout[POSITION_MAJOR] = _to_position_major(scaled, self.geometry)
        # Uneven adaptive-pooling bins (e.g. 7 -> 2): the backward is a product with the
        # (p*p) x (H*W) pooling matrix, each row averaging one bin.
        self.spread = None
        if self.geometry is not None and not self.geometry.even:
            g = self.geometry
            rows = pooling_matrix(g.height, g.pool, ref.dtype, ref.device)
            cols = pooling_matrix(g.width, g.pool, ref.dtype, ref.device)
            self.spread = torch.einsum("ih,jw->ijhw", rows, cols).reshape(g.pool * g.pool, g.height * g.width)
        self.minus_one = torch.full((1, 1), -1.0, dtype=ref.dtype, device=ref.device)

    def __call__(self, a: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """The loss, in closed form where that issues fewer kernels than the signal's own chain:
        always for normalised latents, and for channels-last outputs (whose chain pools through
        batched products); unnormalised contiguous ones (random basis, local classifiers) keep the
        chain, which is as short there. ``logits`` is taken, and unused, as by the signal itself."""
        if not self.signal.normalize and (a.dim() != 4 or a.is_contiguous()):
            return self.signal(a, y, logits)
        return self.closed_form(a, y)

    def closed_form(self, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss with the closed-form backward, whatever the variant and layout."""
        signal = self.signal
        return _ProjectionLoss.apply(a, y, signal.classifier, signal.modulation, self)

    # --- the pieces, used by the autograd.Function -----------------------------------------------

    def pool(self, a: torch.Tensor) -> tuple[torch.Tensor, str]:
        """The (N, d) latent of ``a`` before normalisation, and the order of its columns: the
        order in which ``a``'s memory holds it, so that no layout copy is made either way."""
        if self.geometry is None:
            return a.flatten(1), CHANNEL_MAJOR
        pooled = a if self.geometry.pool is None else F.adaptive_avg_pool2d(a, self.geometry.pool)
        if not a.is_contiguous() and a.is_contiguous(memory_format=torch.channels_last):
            return pooled.permute(0, 2, 3, 1).reshape(len(a), -1), POSITION_MAJOR
        return pooled.reshape(len(a), -1), CHANNEL_MAJOR

    def unpool(self, g: torch.Tensor, order: str) -> torch.Tensor:
        """Gradient with respect to the block output from the pooled latent's gradient ``g`` (N, d),
        in the block output's memory format: each pooling bin's share, made by one broadcast
        multiply (even bins: 1 / area each) or one product with the pooling matrix (uneven)."""
        geometry = self.geometry
        if geometry is None:
            return g
        n, (c, h, w), (ph, pw) = (
            g.shape[0],
            (geometry.channels, geometry.height, geometry.width),
            geometry.side,
        )
        kh, kw = h // ph, w // pw
        if order == CHANNEL_MAJOR:
            if self.spread is not None:
                return (g.view(n * c, ph * pw) @ self.spread).view(n, c, h, w)
            if kh * kw == 1:
                return g.view(n, c, h, w)
            spread = g.view(n, c, ph, 1, pw, 1).expand(n, c, ph, kh, pw, kw)
            return torch.mul(spread, 1.0 / (kh * kw)).reshape(n, c, h, w)
        if self.spread is not None:
            return torch.matmul(self.spread.T, g.view(n, ph * pw, c)).view(n, h, w, c).permute(0, 3, 1, 2)
        if kh * kw == 1:
            return g.view(n, h, w, c).permute(0, 3, 1, 2)
        spread = g.view(n, ph, 1, pw, 1, c).expand(n, ph, kh, pw, kw, c)
        return torch.mul(spread, 1.0 / (kh * kw)).reshape(n, h, w, c).permute(0, 3, 1, 2)

    def readout_in(self, order: str, classifier: torch.Tensor | None) -> torch.Tensor:
        """The rows x d readout (B / T, or a learned matrix unscaled) in ``order``."""
        if classifier is None:
            return self.readout[order]
        if order == POSITION_MAJOR:
            return _to_position_major(classifier, self.geometry)
        return classifier

    def readout_gradient(self, g: torch.Tensor, order: str) -> torch.Tensor:
        """A learned readout's gradient from its gradient in ``order`` back to channel-major."""
        if order == CHANNEL_MAJOR:
            return g
        geometry = self.geometry
        ph, pw = geometry.side
        return g.view(g.shape[0], ph * pw, geometry.channels).transpose(1, 2).reshape(g.shape[0], -1)


class _ProjectionLoss(torch.autograd.Function):
    """Forward: s = p @ W^T on the pooled latent p (W = B / T, or a learned R), times inv =
    1 / max(|p|, eps) when normalised (1 / T for a learned R); u = s, s * m or s @ M;
    loss = nll(log_softmax(u), y). Backward as in the module docstring."""

    @staticmethod
    def forward(ctx, a, y, classifier, modulation, plan: FusedProjection):
        signal = plan.signal
        p, order = plan.pool(a)
        readout = plan.readout_in(order, classifier)
        s = p @ readout.T  # the pooled latent scored as it is: normalising is one per-row scale
        r = norm = None
        if signal.normalize:
            r = torch.linalg.vector_norm(p, dim=1, keepdim=True)
            norm = r.clamp_min(NORMALIZE_EPS)
            s = s / norm
        elif plan.learned:
            s = s * plan.inv_temperature
        if modulation is None:
            u = s
        elif modulation.dim() == 1:
            u = s * modulation
        else:
            u = s @ modulation
        logp = torch.log_softmax(u, dim=1)
        loss = F.nll_loss(logp, y)
        ctx.plan, ctx.order = plan, order
        ctx.save_for_backward(p, r, norm, readout, s, logp, y, modulation)
        return loss

    @staticmethod
    def backward(ctx, grad):
        plan, order = ctx.plan, ctx.order
        p, r, norm, readout, s, logp, y, modulation = ctx.saved_tensors
        n = logp.shape[0]
        e = logp.exp()  # softmax(u)
        e.scatter_add_(1, y.view(-1, 1), plan.minus_one.expand(n, 1))
        e.mul_(grad * (1.0 / n))  # dL/du
        g_classifier = g_modulation = None
        if modulation is None:
            g_s = e
        elif modulation.dim() == 1:
            g_modulation = (e * s).sum(0) if ctx.needs_input_grad[3] else None
            g_s = e * modulation
        else:
            g_modulation = s.T @ e if ctx.needs_input_grad[3] else None
            g_s = e @ modulation.T
        if plan.learned:
            g_s = g_s * plan.inv_temperature  # s = (p @ R^T) / T
            if ctx.needs_input_grad[2]:
                g_classifier = plan.readout_gradient(g_s.T @ p, order)
        if not ctx.needs_input_grad[0]:
            return None, None, g_classifier, g_modulation, None
        if norm is None:
            g_p = g_s @ readout
        else:
            # dL/dp = inv * (g_z - z <z, g_z>) with g_z = g_s @ W, z = p * inv, <z, g_z> = <g_s, s>:
            # (g_s * inv) @ W - p * inv * <g_s * inv, s>. The norm's term vanishes where the clamp
            # holds (|p| < eps), as in autograd's chain.
            g_q = g_s / norm
            g_p = g_q @ readout
            dot = torch.bmm(g_q.unsqueeze(1), s.unsqueeze(2)).view(n, 1)
            g_p.addcmul_(p, (dot / norm).masked_fill_(r < NORMALIZE_EPS, 0.0), value=-1.0)
        return plan.unpool(g_p, order), None, g_classifier, g_modulation, None


def _to_position_major(matrix: torch.Tensor, geometry: _Geometry) -> torch.Tensor:
    """Columns of a rows x (C * h * w) matrix reordered from (C, h, w) to (h, w, C)."""
    h, w = geometry.side
    return matrix.view(matrix.shape[0], geometry.channels, h * w).transpose(1, 2).reshape(matrix.shape[0], -1)


def supports(signal: object, out_shape: tuple[int, ...] | torch.Size | None = None) -> bool:
    """Whether a block's signal has a fused form (for outputs of ``out_shape``, if given): the LLS
    family and local learned classifiers (a learned readout of a normalised latent is no rule of
    this project), with readouts as wide as the latent and dense latents taken as they are (the
    authors' pooled readouts and dense latents keep the signal's own chain)."""
    if not isinstance(signal, ProjectionSignal) or signal.width is not None:
        return False
    if signal.classifier is not None and signal.normalize:
        return False
    dense = out_shape is not None and len(out_shape) == 1
    return not (dense and signal.pool is not None and signal.pool != out_shape[0])


def block_losses(signals, out_shapes, *, device: torch.device, dtype: torch.dtype) -> list:
    """One loss callable per block, ``loss(a, y)``: a :class:`FusedProjection` where the signal has
    one, else the signal itself. Every constant is made now, on ``device``."""
    return [
        FusedProjection(signal, shape, device=device, dtype=dtype) if supports(signal, shape) else signal
        for signal, shape in zip(signals, out_shapes, strict=True)
    ]
