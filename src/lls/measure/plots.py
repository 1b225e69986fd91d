"""Figures of a run: accuracy, loss and per-block local-loss curves."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from ..errors import LLSError
from ..training.files import atomic_write, check_output, describe_os_error

FIGURE_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}  # a figure's file suffix -> format


def figure_format(path: Path) -> str:
    """The format a figure at ``path`` is written in, from its suffix; other suffixes are refused."""
    kind = FIGURE_FORMATS.get(path.suffix.lower())
    if kind is None or path.is_dir():
        what = "is a folder" if path.is_dir() else "has another suffix"
        raise LLSError(f"{path} {what}: give a file name ending in {', '.join(FIGURE_FORMATS)}")
    return kind


def save_figure(figure, path: Path, *, tight: bool = True, run_file: bool = False) -> None:
    """Write a matplotlib figure, atomically, so a reader never sees half a picture; the format
    follows the suffix (PNG, PDF or SVG). ``tight`` crops to the drawn area (one more layout pass;
    figures laid out by matplotlib's constrained layout need none). Anywhere but a run's own
    curves (``run_file``), the path must be one a command may write (``files.check_output``)."""
    kind = figure_format(path)
    if not run_file:
        check_output(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LLSError(describe_os_error(error, path.parent)) from None
    buffer = io.BytesIO()
    figure.savefig(buffer, format=kind, dpi=110, bbox_inches="tight" if tight else None)
    atomic_write(path, buffer.getvalue())


def plot_curves(records: Sequence[dict], path: Path, title: str = "") -> None:
    """Accuracy (train / test), loss (train / test) and one curve per block's local loss.

    Drawn after epochs of a run, so drawn cheaply: a plain Figure with a fixed layout and fixed
    legend corners (matplotlib's constrained layout and "best" legends tripled the time, to ~1 s)."""
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in records]
    blocks = len(records[0]["block_losses"]) if records else 0
    readouts = len(records[0].get("block_accuracy", [])) if records else 0
    panels = 2 + bool(blocks) + bool(readouts)
    figure = Figure(figsize=(4.2 * panels, 3.6))
    figure.subplots_adjust(left=0.06 / panels * 4, right=0.99, bottom=0.14, top=0.84, wspace=0.28)
    axes = figure.subplots(1, panels)
    axes[0].plot(epochs, [100 * r["train_accuracy"] for r in records], "o-", label="train")
    axes[0].plot(epochs, [100 * r["test_accuracy"] for r in records], "o-", label="test")
    axes[0].set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    axes[1].plot(epochs, [r["train_loss"] for r in records], "o-", label="train")
    axes[1].plot(epochs, [r["test_loss"] for r in records], "o-", label="test")
    axes[1].set(xlabel="epoch", ylabel="cross-entropy", title="head loss")
    corners = ["lower right", "upper right"]
    panel = 2
    if blocks:
        for b in range(blocks):
            axes[panel].plot(epochs, [r["block_losses"][b] for r in records], "o-", label=f"block {b}")
        axes[panel].set(xlabel="epoch", ylabel="local loss", title="per-block local loss")
        corners.append("upper right")
        panel += 1
    if readouts:
        for b in range(readouts):
            axes[panel].plot(
                epochs, [100 * r["block_accuracy"][b] for r in records], "o-", label=f"block {b}"
            )
        axes[panel].plot(epochs, [100 * r["test_accuracy"] for r in records], "k--", label="network")
        readout = records[-1].get("readout") or ""
        axes[panel].set(xlabel="epoch", ylabel="test accuracy (%)", title=f"per-block accuracy ({readout})")
        corners.append("lower right")
    for ax, corner in zip(axes, corners, strict=True):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc=corner)
    if title:
        figure.suptitle(title, fontsize=10)
    save_figure(figure, path, tight=False, run_file=True)
