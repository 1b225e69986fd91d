"""``lls report``: finished runs collected into the paper's tables, with costs and figures."""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import dataset_shape
from ..errors import LLSError
from ..method.models import model_options
from ..method.rules import RULES, create_rule
from ..training.config import DISTINGUISHING, TrainConfig
from ..training.files import atomic_write, check_folder, check_output
from ..training.rundir import RunDir
from .cost import count_costs
from .memory import measure_memory
from .plots import save_figure
from .report_format import si


@dataclass
class RunResult:
    path: Path
    config: TrainConfig
    records: list[dict[str, Any]]
    environment: dict[str, Any]

    @property
    def label(self) -> str:
        """The rule, and whatever else sets this run apart from the defaults (seeds aside)."""
        fields = dataclasses.fields(RULES.get(self.config.rule))
        defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
        given = {**defaults, **self.config.rule_options}  # an option left out is its default
        basis, reduced = given.pop("basis", None), given.pop("reduced", None)
        options = {k: v for k, v in given.items() if k != "seed" and v != defaults.get(k)}
        # LLS rows always name their basis; the variants only when it is not the default
        shown_basis = basis if self.config.rule == "lls" or basis != defaults.get("basis") else None
        name = self.config.rule + (f" ({shown_basis})" if shown_basis else "")
        extras = [f"R={reduced}"] if reduced else []
        extras += [f"{k}={v}" for k, v in sorted(options.items())]
        model, model_defaults = model_options(self.config.model_options), model_options({})
        extras += [f"{k}={v}" for k, v in sorted(model.items()) if v != model_defaults[k]]  # not defaults
        default = TrainConfig()
        extras += [
            f"{field}={getattr(self.config, field)}"
            for field in DISTINGUISHING
            if getattr(self.config, field) != getattr(default, field)
        ]
        return " ".join([name, *extras])

    @property
    def dataset(self) -> str:
        holdout = self.config.holdout
        return self.config.dataset + (f" (holdout {holdout})" if holdout else "")

    @property
    def group(self) -> tuple[str, str, str, int]:
        """Runs that differ only in their seed are one row; anything else makes another."""
        return (self.dataset, self.config.model, self.label, self.config.epochs)

    @property
    def finished(self) -> bool:
        return len(self.records) >= self.config.epochs


def collect(paths: list[Path]) -> list[RunResult]:
    """Every run directory under ``paths`` (a run directory itself, or a folder of them)."""
    found, seen = [], set()
    for root in paths:
        check_folder(root, "run folder")
        candidates = (
            [root]
            if (root / "config.json").is_file()
            else sorted(p.parent for p in root.rglob("config.json"))
        )
        for path in candidates:
            if path.resolve() in seen:  # named twice (`lls report R R`, or R and its parent): one run
                continue
            seen.add(path.resolve())
            run = RunDir.open(path)
            found.append(RunResult(path, run.read_config(), run.read_metrics(), run.read_record()))
    if not found:
        raise LLSError(f"no run directories (with config.json) under {', '.join(map(str, paths))}")
    return found


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}"


def summarize(runs: list[RunResult], with_costs: bool = True) -> list[dict[str, Any]]:
    groups: dict[tuple, list[RunResult]] = defaultdict(list)
    for run in runs:
        if run.finished:
            groups[run.group].append(run)
    rows = []
    for (dataset, model, label, _), members in sorted(groups.items()):
        config = members[0].config
        row: dict[str, Any] = {
            "dataset": dataset,
            "model": model,
            "rule": label,
            "seeds": sorted(m.config.seed for m in members),
            "epochs": config.epochs,
            "final": [m.records[config.epochs - 1]["test_accuracy"] for m in members],
            "best": [max(r["test_accuracy"] for r in m.records[: config.epochs]) for m in members],
            "train_hours": sum(
                sum(r["train_seconds"] + r["eval_seconds"] for r in m.records) for m in members
            )
            / 3600,
            "curves": [[r["test_accuracy"] for r in m.records[: config.epochs]] for m in members],
            "block_curves": [
                [r.get("block_accuracy", []) for r in m.records[: config.epochs]] for m in members
            ],
            "readout": members[0].records[-1].get("readout"),
            "commit": sorted({m.environment.get("commit", "?") for m in members}),
        }
        if with_costs:
            row.update(costs_of(config))
        rows.append(row)
    return rows


def costs_of(config: TrainConfig) -> dict[str, Any]:
    """Learning-signal multiply-adds, extra parameters and activation memory from ``lls cost``."""

    known = dataset_shape(config.dataset)
    if known is None:
        return {}
    shape, classes = known
    rule = create_rule(config.rule, **config.rule_options)
    report = count_costs(config.model, rule, shape, classes)
    memory = measure_memory(
        config.model,
        config.rule,
        shape,
        classes,
        batch=config.batch_size,
        rule_options=config.rule_options,
        subprocess_peak=False,
    )
    return {
        "extra_params": report.total("extra_params"),
        "signal_mults": report.total("signal_mults"),
        "signal_adds": report.total("signal_adds"),
        "step_macs": report.step_macs,
        "activation_bytes": memory["activation_peak_bytes"],
    }


def markdown(rows: list[dict[str, Any]]) -> str:

    lines = [
        "| dataset | model | rule | seeds | epochs | final test acc. (%) | best test acc. over epochs (%) | "
        "extra params | signal mults / adds per sample | step MACs per sample | activations (batch) | "
        "hours |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        signal = f"{si(r['signal_mults'])} / {si(r['signal_adds'])}" if "signal_mults" in r else "-"
        memory = f"{r['activation_bytes'] / 2**20:.0f} MiB" if "activation_bytes" in r else "-"
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['rule']} | {len(r['seeds'])} | {r['epochs']} | "
            f"**{mean_std(r['final'])}** | {mean_std(r['best'])} | {si(r.get('extra_params'))} | {signal} | "
            f"{si(r.get('step_macs'))} | {memory} | {r['train_hours']:.2f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    """Test-accuracy curves of the rules side by side, and cost ratios to BP, per (dataset, model)."""
    # matplotlib takes about 0.9 s to import: only where a figure is drawn, not at every `lls` start
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_problem: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        by_problem[(r["dataset"], r["model"])].append(r)
    for (dataset, model), members in by_problem.items():
        rules = [r["rule"] for r in members]
        for r in members:  # the same rule at several budgets: say which curve is which
            r["name"] = r["rule"] + (f", {r['epochs']} epochs" if rules.count(r["rule"]) > 1 else "")
        figure, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
        for r in members:
            length = min(len(c) for c in r["curves"])
            mean = [100 * statistics.fmean(c[i] for c in r["curves"]) for i in range(length)]
            axes[0].plot(range(1, length + 1), mean, label=r["name"])
        axes[0].set(
            xlabel="epoch", ylabel="test accuracy (%, mean over seeds)", title=f"{model} on {dataset}"
        )
        axes[0].grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        bp = next((r for r in members if r["rule"] == "bp"), None)
        if bp is not None and "step_macs" in bp:
            others = [r for r in members if r is not bp]
            keys = (
                ("step_macs", "step MACs"),
                ("signal_mults", "signal multiplies"),
                ("activation_bytes", "activations"),
            )
            width = 0.8 / len(keys)
            for k, (key, name) in enumerate(keys):
                values = [max(r[key], 1) / max(bp[key], 1) for r in others]
                axes[1].bar([i + k * width for i in range(len(others))], values, width, label=name)
            axes[1].set_xticks(
                [i + width for i in range(len(others))],
                [r["name"] for r in others],
                rotation=30,
                ha="right",
                fontsize=7,
            )
            axes[1].set_yscale("log")
            axes[1].axhline(1.0, color="black", linewidth=0.8)
            axes[1].set(ylabel="ratio to BP (log scale)", title="cost per training sample, relative to BP")
            axes[1].legend(fontsize=7)
        else:
            axes[1].set_axis_off()
        stem = re.sub(r"[^A-Za-z0-9]+", "-", f"{dataset}-{model}").strip("-")  # a plain file name
        path = folder / f"{stem}.png"
        save_figure(figure, path)
        plt.close(figure)
        written.append(path)
        written.extend(plot_block_accuracy(members, folder / f"blocks-{stem}.png", f"{model} on {dataset}"))
    return written


def plot_block_accuracy(members: list[dict[str, Any]], path: Path, title: str) -> list[Path]:
    """Each block's own test accuracy over epochs (mean over seeds), one panel per rule."""
    import matplotlib.pyplot as plt

    members = [r for r in members if r["block_curves"] and r["block_curves"][0] and r["block_curves"][0][0]]
    if not members:
        return []
    columns = min(3, len(members))
    rows = -(-len(members) // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False, layout="constrained"
    )
    for ax, r in zip(axes.flat, members, strict=False):
        curves = r["block_curves"]
        epochs = min(len(c) for c in curves)
        blocks = len(curves[0][0])
        for b in range(blocks):
            mean = [100 * statistics.fmean(c[e][b] for c in curves) for e in range(epochs)]
            ax.plot(range(1, epochs + 1), mean, "o-", markersize=3, label=f"block {b}")
        network = [100 * statistics.fmean(c[e] for c in r["curves"]) for e in range(epochs)]
        ax.plot(range(1, epochs + 1), network, "k--", label="network")
        ax.set(
            title=f"{r.get('name', r['rule'])} ({r['readout']})", xlabel="epoch", ylabel="test accuracy (%)"
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(members) :]:
        ax.set_axis_off()
    figure.suptitle(f"per-block accuracy, {title}", fontsize=10)
    save_figure(figure, path)
    plt.close(figure)
    return [path]


def write_report(paths: list[Path], folder: Path, with_costs: bool = True) -> tuple[str, list[Path]]:
    """report.md, report.json and the figures of the finished runs under ``paths``, in ``folder``;
    returns the markdown table and the runs left out because they have not finished."""
    runs = collect([p for p in paths if p.exists()] or paths)
    rows = summarize(runs, with_costs=with_costs)
    if not rows:
        raise LLSError("none of the runs has finished all its epochs yet")
    if folder.exists() and not folder.is_dir():
        raise LLSError(f"--out {folder} is a file; give a folder for the report")
    folder.mkdir(parents=True, exist_ok=True)
    page_path, json_path = (check_output(folder / name) for name in ("report.md", "report.json"))
    text = markdown(rows)
    figures = plot(rows, folder)
    page = text + "\n\n" + "\n".join(f"![{f.stem}]({f.name})" for f in figures) + "\n"
    atomic_write(page_path, page.encode())
    atomic_write(json_path, json.dumps(rows, indent=1).encode())
    return text, [r.path for r in runs if not r.finished]
