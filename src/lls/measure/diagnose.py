"""``lls diagnose``: how far each block's local update is from the true gradient, and whether LLS
blocks synchronise with their class's basis vector.

Alignment: for each block, the cosine between the gradient the rule gives the block's weights and
the BP gradient of the same network on the same batch (both at the same weights, BatchNorm in
training mode as during training), and the ratio of their norms; the quantity alignment papers
plot. Synchronisation (LLS rules): for each class c, the mean normalised latent ``m_c`` of that
class's examples, and ``S[c, k] = cos(m_c, B_k)`` against every basis vector: a block is
synchronised when the diagonal dominates (its ``margin`` is the mean over classes of
``S[c, c] - max_{k != c} S[c, k]``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..method.basis import BASIS_KINDS, basis
from ..step.step import Step, bp_loss
from ..step.trainer import Trainer
from .plots import save_figure
from .report_format import table

BASIS_PLOT_COPIES = 6  # float64 K x d arrays alive at once while a basis is computed and drawn


@dataclass
class BlockDiagnosis:
    index: int
    cosines: list[float] = field(default_factory=list)  # one per batch
    norm_ratios: list[float] = field(default_factory=list)  # |rule gradient| / |BP gradient|
    sync: list[list[float]] | None = None  # K x K, for LLS rules

    @property
    def cosine(self) -> float:
        return sum(self.cosines) / len(self.cosines)

    @property
    def norm_ratio(self) -> float:
        return sum(self.norm_ratios) / len(self.norm_ratios)

    @property
    def sync_margin(self) -> float | None:
        if self.sync is None:
            return None
        s = torch.tensor(self.sync)
        off = s.clone()
        off.fill_diagonal_(-math.inf)
        return float((s.diagonal() - off.max(1).values).mean())

    @property
    def sync_accuracy(self) -> float | None:
        """Share of classes whose mean latent points most at their own basis vector."""
        if self.sync is None:
            return None
        s = torch.tensor(self.sync)
        return float((s.argmax(1) == torch.arange(len(s))).float().mean())

    def as_dict(self) -> dict[str, Any]:
        return {
            "block": self.index,
            "cosine": self.cosine,
            "cosines": self.cosines,
            "norm_ratio": self.norm_ratio,
            "sync_margin": self.sync_margin,
            "sync_accuracy": self.sync_accuracy,
            "sync": self.sync,
        }


def _flat_grads(params: list[torch.Tensor], grads) -> torch.Tensor:
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).flatten() for p, g in zip(params, grads, strict=True)]
    )


def bp_gradients(trainer: Trainer | Step, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The BP gradient of every block's parameters (one backward pass of BP's loss)."""
    net = trainer.net
    _, loss = bp_loss(net, x, y)
    params = [list(b.parameters()) for b in net.blocks]
    grads = torch.autograd.grad(loss, [p for group in params for p in group], allow_unused=True)
    out, start = [], 0
    for group in params:
        out.append(_flat_grads(group, grads[start : start + len(group)]))
        start += len(group)
    return out


def rule_gradients(step: Step, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The gradient each block's parameters get from the step's rule on this batch (no update);
    ``step`` is a trainer's (``trainer.step``) or a probe's."""
    if step.rule.timing == "end-to-end":
        return bp_gradients(step, x, y)
    blocks = step.net.blocks
    out: dict[int, torch.Tensor] = {}

    def collect(index: int, loss: torch.Tensor) -> torch.Tensor:
        if index < len(blocks):
            params = list(blocks[index].parameters())
            out[index] = _flat_grads(params, torch.autograd.grad(loss, params, allow_unused=True))
        return loss.detach()

    step.local_pass(x, y, collect)
    return [out[i] for i in range(len(blocks))]


def diagnose(trainer: Trainer, batches, *, sync: bool = True) -> list[BlockDiagnosis]:
    """Alignment (and synchronisation for LLS) of every block over ``batches``.

    Works on a copy of the network, so the trainer's weights and BatchNorm statistics are untouched.
    """
    # synchronisation needs every block's signal to have fixed class patterns (a basis of K rows)
    patterns = [s.class_patterns() for s in trainer.signals] if sync and trainer.signals else None
    if patterns is not None and any(p is None for p in patterns):
        patterns = None
    probe = Step(
        copy.deepcopy(trainer.net), trainer.rule, trainer.signals, trainer.optimizers, trainer.low_memory
    )
    probe.net.train()
    results = [BlockDiagnosis(i) for i in range(len(trainer.net.blocks))]
    sums: list[torch.Tensor | None] = [None] * len(results)
    counts = None
    for x, y in batches:
        rule = rule_gradients(probe, x, y)
        bp = bp_gradients(probe, x, y)
        for r, g_rule, g_bp in zip(results, rule, bp, strict=True):
            r.cosines.append(float(F.cosine_similarity(g_rule.double(), g_bp.double(), dim=0)))
            r.norm_ratios.append(float(g_rule.norm() / g_bp.norm().clamp_min(1e-30)))
        if patterns is not None:
            with torch.no_grad():
                onehot = F.one_hot(y, trainer.num_classes).double()
                counts = onehot.sum(0) if counts is None else counts + onehot.sum(0)
                *outputs, _ = probe.net.walk(x)
                for (i, a), signal in zip(outputs, trainer.signals, strict=True):
                    z = F.normalize(signal.latent(a).double(), dim=1)
                    per_class = onehot.T @ z  # (K, d) sums of normalised latents
                    sums[i] = per_class if sums[i] is None else sums[i] + per_class
    if patterns is not None and counts is not None:
        for r, total, basis in zip(results, sums, patterns, strict=True):
            means = total / counts.clamp_min(1)[:, None]
            r.sync = F.cosine_similarity(means[:, None, :], basis[None, :, :].double(), dim=2).tolist()
    return results


def diagnosis_text(results: list[BlockDiagnosis]) -> str:
    """``lls diagnose``'s table: alignment with BP and synchronisation, block by block."""

    rows = []
    for r in results:
        margin, sync = r.sync_margin, r.sync_accuracy
        rows.append(
            [
                f"block {r.index}",
                f"{r.cosine:+.3f}",
                f"{r.norm_ratio:.3g}",
                "-" if margin is None else f"{margin:+.3f}",
                "-" if sync is None else f"{100 * sync:.0f}%",
            ]
        )
    return table(["", "cosine to BP", "norm ratio", "sync margin", "classes synced"], rows)


def plot_diagnosis(results: list[BlockDiagnosis], folder: Path, title: str) -> list[Path]:
    # matplotlib takes about 0.9 s to import: only where a figure is drawn, not at every `lls` start
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    figure, ax = plt.subplots(figsize=(5, 3.4))
    blocks = [r.index for r in results]
    ax.bar(blocks, [r.cosine for r in results], color="tab:blue")
    ax.errorbar(
        blocks,
        [r.cosine for r in results],
        yerr=[torch.tensor(r.cosines).std().item() if len(r.cosines) > 1 else 0 for r in results],
        fmt="none",
        color="black",
        capsize=3,
    )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(xlabel="block", ylabel="cosine(rule update, BP gradient)", ylim=(-1.05, 1.05), title=title)
    ax.set_xticks(blocks)
    path = folder / "alignment.png"
    save_figure(figure, path)
    plt.close(figure)
    written.append(path)
    for r in results:
        if r.sync is None:
            continue
        figure, ax = plt.subplots(figsize=(4.4, 3.8))
        image = ax.imshow(torch.tensor(r.sync).numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
        figure.colorbar(image, ax=ax, label="cos(mean latent of class c, basis vector k)")
        ax.set(xlabel="basis vector k", ylabel="class c", title=f"block {r.index} synchronisation")
        path = folder / f"sync-block{r.index}.png"
        save_figure(figure, path)
        plt.close(figure)
        written.append(path)
    return written


def plot_basis_bytes(num_classes: int, dim: int) -> int:
    """Estimated peak bytes of :func:`plot_basis`: float64 copies of the K x d basis (its formula's
    terms, then matplotlib's normalised and RGBA images of it)."""
    return BASIS_PLOT_COPIES * num_classes * dim * 8


def plot_basis(num_classes: int, dim: int, kind: str, path: Path, seed: int = 0) -> Path:
    """A picture of the basis: all rows as an image, and the first rows as curves."""
    # matplotlib takes about 0.9 s to import: only where a figure is drawn, not at every `lls` start
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = basis(num_classes, dim, kind, seed, dtype=torch.float64).numpy()
    figure, axes = plt.subplots(
        2, 1, figsize=(9, 5.2), gridspec_kw={"height_ratios": [1.3, 1]}, layout="constrained"
    )
    axes[0].imshow(
        b, aspect="auto", cmap="RdBu_r", interpolation="nearest", vmin=-abs(b).max(), vmax=abs(b).max()
    )
    axes[0].set(ylabel="class k", title=f"{kind} basis, {num_classes} x {dim} (rows: classes)")
    shown = min(dim, 64)
    for k in range(min(num_classes, 3)):
        axes[1].plot(
            range(shown),
            b[k, :shown] + 2.5 * k,
            drawstyle="steps-mid" if BASIS_KINDS.get(kind).signs else "default",
            label=f"row {k}",
        )
    axes[1].set(xlabel=f"t (first {shown} entries)", yticks=[], title="first rows, offset for clarity")
    axes[1].legend(fontsize=7, loc="upper right")
    save_figure(figure, path)
    plt.close(figure)
    return path
