"""``lls bench``: training-step time of several rules, interleaved in one process.

Rules run one step each in turn (a b c a b c ...) after a warm-up, so that slow and fast periods of
a shared machine hit every rule alike; the figures are medians with their interquartile range.
Achieved GFLOP/s use the step's multiply-adds from ``lls cost`` (2 FLOPs each).

Each entry may name its step engine after an ``@`` (``lls@graph,bp@eager,bp@graph``; engine.py), so
that LLS can be set against BP as people run it and against BP issued the same way. Without one,
an entry uses the run's ``engine``. Ratios are to ``bp`` on the eager engine (``time_ratio_to_bp``)
and to ``bp`` on the entry's own engine (``time_ratio_to_bp_same_engine``) where both were run.
With ``memory`` settings besides ``None``, every local rule also runs in the low-memory step
(``lowmem.py``), interleaved with the rest, and is compared with its own ordinary step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import LLSError
from ..method.rules import RULES, create_rule, parse_rule_spec
from ..step.config import BATCH_SIZE, CHANNELS_LAST, StepConfig, step_config
from ..step.engine import ENGINES, WARMUP_STEPS
from ..step.factory import build_trainer
from .cost import count_costs
from .memory import example_batch, measure_memory
from .report_format import mib, ratio, table


def split_rules(text: str) -> list[str]:
    """``lls:basis=periodic,temperature=0.25,bp@eager`` -> ["lls:basis=periodic,temperature=0.25",
    "bp@eager"]: a comma separates entries and also a rule's options, so a ``key=value`` item
    without a colon of its own continues the entry before it."""
    entries: list[str] = []
    for item in text.split(","):
        if entries and ":" in entries[-1] and "=" in item and ":" not in item:
            entries[-1] += "," + item
        else:
            entries.append(item)
    return entries


def split_engine(spec: str) -> tuple[str, str | None]:
    """``lls:basis=periodic@graph`` -> ("lls:basis=periodic", "graph"); no ``@``: (spec, None)."""
    rule, at, engine = spec.partition("@")
    if at and engine not in ENGINES:
        raise LLSError(f"{spec}: unknown engine {engine!r}; known engines: {', '.join(ENGINES)}")
    return rule, (engine if at else None)


@dataclass
class BenchResult:
    label: str
    seconds: list[float]
    batch: int
    step_macs: int
    peak_memory_bytes: int | None
    rule: str = ""  # the rule's name
    engine: str = "eager"
    spec: str = ""  # the entry as given (rule, options, engine)
    memory: str | int | None = None  # the low-memory setting, None for the ordinary step

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def quartiles(self) -> tuple[float, float]:
        q = statistics.quantiles(self.seconds, n=4) if len(self.seconds) > 1 else [self.median] * 3
        return q[0], q[2]


def bench_label(spec: str, memory: str | int | None) -> str:
    """``lls`` for the ordinary step, ``lls memory=low`` / ``lls memory=256MiB`` for the low-memory one."""
    if memory is None:
        return spec
    size = f"{memory / 2**20:g}MiB" if isinstance(memory, int) else memory
    return f"{spec} memory={size}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(
    model: str,
    input_shape: tuple[int, int, int],
    classes: int,
    rules: list[str],
    *,
    batch: int = BATCH_SIZE,
    steps: int = 20,
    warmup: int = 3,
    device: str = "cpu",
    channels_last: bool = CHANNELS_LAST,
    compile_blocks: bool = False,
    measure_peak: bool = True,
    memory: Sequence[str | int | None] = (None,),
    model_options: dict[str, Any] | None = None,
    config: StepConfig | None = None,
    **options: Any,
) -> list[BenchResult]:
    """Time ``rules`` (``name[:key=value,...][@engine]``) interleaved, each under every ``memory``
    setting (``None``: the ordinary step; ``"low"`` or a budget in bytes: the low-memory step, for
    local rules only), every trainer stepping as ``config`` says (:class:`~lls.step.config.StepConfig`,
    its fields also as keywords, e.g. ``engine="eager"``; a rule's ``@engine`` overrides the engine).
    Peak memory is measured for eager entries only (a captured graph keeps its own memory pool)."""
    config = step_config(config, **options)
    dev = torch.device(device)
    trainers, costs, runs = _bench_trainers(
        model, input_shape, classes, rules, dev, channels_last, compile_blocks, memory, model_options, config
    )
    x, y = example_batch(input_shape, classes, batch, dev, channels_last)
    if any(run[4] == "graph" for run in runs.values()):
        warmup += WARMUP_STEPS + 1  # the graph engine captures after its warm-up steps
    seconds = _interleaved_seconds(trainers, x, y, warmup, steps, dev)
    results = []
    for label, (spec, name, options, setting, issued) in runs.items():
        peak = None
        if measure_peak and issued == "eager":
            measured = measure_memory(
                model,
                name,
                input_shape,
                classes,
                batch=batch,
                device=device,
                channels_last=channels_last,
                rule_options=options,
                memory=setting,
                model_options=model_options,
            )
            peak = measured.get("step_peak_bytes")
        results.append(
            BenchResult(label, seconds[label], batch, costs[label], peak, name, issued, spec, setting)
        )
    return results


def _bench_trainers(
    model, input_shape, classes, rules, dev, channels_last, compile_blocks, memory, model_options, config
) -> tuple[dict, dict, dict]:
    """One trainer per rule and memory setting, by label: (trainers, step costs, what each runs)."""
    trainers, costs, runs = {}, {}, {}
    for spec in rules:
        rule_spec, asked = split_engine(spec)
        name, options = parse_rule_spec(rule_spec)
        rule = create_rule(name, **options)
        cost = count_costs(model, rule, input_shape, classes, model_options=model_options).step_macs
        for setting in memory:
            if setting is not None and RULES.get(name).timing == "end-to-end":
                continue
            label = bench_label(spec, setting)
            trainer = build_trainer(
                model,
                name,
                input_shape,
                classes,
                rule_options=options,
                model_options=model_options,
                device=dev,
                channels_last=channels_last,
                config=config,
                engine=asked or config.engine,
                memory=setting,
            )
            if compile_blocks:
                for block in trainer.net.blocks:
                    block.compile()
            issued = "eager" if trainer.engine is None else "graph"
            trainers[label], costs[label], runs[label] = trainer, cost, (spec, name, options, setting, issued)
    return trainers, costs, runs


def _interleaved_seconds(trainers: dict, x, y, warmup: int, steps: int, dev: torch.device) -> dict:
    """Each trainer's step times, the trainers stepped in turn (so that slow and fast periods of the
    machine hit them alike), after ``warmup`` untimed rounds."""
    for _ in range(warmup):
        for trainer in trainers.values():
            trainer.train_step(x, y)
    _sync(dev)
    seconds: dict[str, list[float]] = {label: [] for label in trainers}
    for _ in range(steps):
        for label, trainer in trainers.items():
            start = time.perf_counter()
            trainer.train_step(x, y)
            _sync(dev)
            seconds[label].append(time.perf_counter() - start)
    return seconds


def summarize(results: list[BenchResult]) -> dict[str, dict[str, Any]]:
    def bp_on(engine: str) -> BenchResult | None:
        return next((r for r in results if r.rule == "bp" and r.engine == engine), None)

    base = bp_on("eager")
    ordinary = {r.spec: r for r in results if r.memory is None}
    table = {}
    for r in results:
        q1, q3 = r.quartiles()
        row = {
            "step_seconds_median": r.median,
            "step_seconds_p25": q1,
            "step_seconds_p75": q3,
            "steps": len(r.seconds),
            "images_per_second": r.batch / r.median,
            "gflops": 2 * r.step_macs * r.batch / r.median / 1e9,
            "step_macs_per_sample": r.step_macs,
            "peak_memory_bytes": r.peak_memory_bytes,
            "engine": r.engine,
        }
        if base is not None and r is not base:
            row["time_ratio_to_bp"] = r.median / base.median
            if r.peak_memory_bytes is not None and base.peak_memory_bytes:
                row["memory_ratio_to_bp"] = r.peak_memory_bytes / base.peak_memory_bytes
            else:
                row["memory_ratio_to_bp"] = None
        same = bp_on(r.engine)
        if same is not None and r is not same and r.engine != "eager":
            row["time_ratio_to_bp_same_engine"] = r.median / same.median
        normal = ordinary.get(r.spec)
        if r.memory is not None and normal is not None:  # the low-memory step against the ordinary one
            row["time_ratio_to_normal"] = r.median / normal.median
            if r.peak_memory_bytes is not None and normal.peak_memory_bytes:
                row["memory_ratio_to_normal"] = r.peak_memory_bytes / normal.peak_memory_bytes
        table[r.label] = row
    return table


def bench_text(summary: dict[str, dict[str, Any]], heading: str) -> str:
    """``lls bench``'s table: medians, spread, throughput and ratios to BP."""
    rows = []
    for label, r in summary.items():
        rows.append(
            [
                label,
                f"{1000 * r['step_seconds_median']:.1f} ms",
                f"{1000 * r['step_seconds_p25']:.1f}-{1000 * r['step_seconds_p75']:.1f}",
                f"{r['images_per_second']:.0f}",
                f"{r['gflops']:.1f}",
                mib(r["peak_memory_bytes"]),
                ratio(r.get("time_ratio_to_bp")),
                ratio(r.get("memory_ratio_to_bp")),
            ]
        )
    header = ["rule", "step (median)", "IQR (ms)", "images/s", "GFLOP/s", "step peak", "time vs bp"]
    header.append("memory vs bp")
    extra = {
        "time_ratio_to_bp_same_engine": "time vs bp, same engine",  # engines compared
        "time_ratio_to_normal": "time vs ordinary step",  # low memory compared
        "memory_ratio_to_normal": "memory vs ordinary step",
    }
    for key, title in extra.items():
        if any(key in r for r in summary.values()):
            header.append(title)
            for row, r in zip(rows, summary.values(), strict=True):
                row.append(ratio(r.get(key)))
    return heading + "\n" + table(header, rows)
