"""``lls reproduce``: the paper's presets run as a resumable sweep of run directories.

Each (preset, seed) trains into ``ROOT/TABLE/DATASET-MODEL-ROW-sSEED``; a finished row is skipped,
an unfinished one resumed, so the same command continues an interrupted sweep and, with more
``--epochs``, extends finished rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .presets import Preset
from .run import RunOptions, train_run
from .rundir import RunDir


@dataclass
class Row:
    preset: Preset
    seed: int
    out: Path

    @property
    def name(self) -> str:
        return f"{self.preset.name} seed {self.seed}"


def plan(presets: list[Preset], seeds: list[int], root: Path) -> list[Row]:
    return [
        Row(p, seed, root / p.table / f"{p.dataset}-{p.model}-{p.slug}-s{seed}")
        for p in presets
        for seed in seeds
    ]


def epochs_done(out: Path) -> int | None:
    """Finished epochs of a row's run directory (None: no run there; -1: stopped mid-epoch)."""
    if not (out / "config.json").exists():
        return None
    state = RunDir.open(out).load_checkpoint()
    if state is None:
        return 0
    return state["epoch"] if state["progress"] is None else -1


def sweep(
    rows: list[Row], options: RunOptions, *, dry_run: bool = False, say: Callable[[str], None] = print
) -> str:
    """Run every unfinished row; returns "finished", "interrupted" or "diverged" (the worst seen)."""
    worst = "finished"
    for row in rows:
        config = row.preset.config(row.seed)
        done = epochs_done(row.out)
        if done is not None and done >= config.epochs:
            say(f"done:    {row.name} ({done} epochs in {row.out})")
            continue
        if dry_run:
            say(f"to run:  {row.name} -> {row.out}")
            continue
        say(f"running: {row.name} -> {row.out}")
        outcome = train_run(config, row.out, options, resume=done is not None)
        if outcome.status == "interrupted":
            return "interrupted"
        if outcome.status == "diverged":
            say(f"lls: warning: {outcome.error}")
            worst = "diverged"
    return worst
