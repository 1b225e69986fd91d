"""``lls bench``: training-step time of several rules, interleaved in one process.

Rules run one step each in turn (a b c a b c ...) after a warm-up, so that slow and fast periods of
a shared machine hit every rule alike; the figures are medians with their interquartile range.
Achieved GFLOP/s use the step's multiply-adds from ``lls cost`` (2 FLOPs each).

Each entry may name its step engine after an ``@`` (``lls@graph,bp@eager,bp@graph``; engine.py), so
that LLS can be set against BP as people run it and against BP issued the same way. Without one,
an entry uses the run's ``engine``. Ratios are to ``bp`` on the eager engine (``time_ratio_to_bp``)
and to ``bp`` on the entry's own engine (``time_ratio_to_bp_same_engine``) where both were run.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from .cost import count_costs, example_batch, measure_memory
from .engine import WARMUP_STEPS
from .optim import OptimizerFactory
from .report_format import mib, ratio, table
from .rules import create_rule, parse_rule_spec
from .trainer import build_trainer


def split_engine(spec: str) -> tuple[str, str | None]:
    """``lls:basis=periodic@graph`` -> ("lls:basis=periodic", "graph"); no ``@``: (spec, None)."""
    rule, at, engine = spec.partition("@")
    return rule, (engine if at else None)


@dataclass
class BenchResult:
    label: str
    seconds: list[float]
    batch: int
    step_macs: int
    peak_memory_bytes: int | None
    rule: str = ""
    engine: str = "eager"

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def quartiles(self) -> tuple[float, float]:
        q = statistics.quantiles(self.seconds, n=4) if len(self.seconds) > 1 else [self.median] * 3
        return q[0], q[2]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(
    model: str,
    input_shape: tuple[int, int, int],
    classes: int,
    rules: list[str],
    *,
    batch: int = 128,
    steps: int = 20,
    warmup: int = 3,
    device: str = "cpu",
    channels_last: bool = True,
    compile_blocks: bool = False,
    measure_peak: bool = True,
    engine: str = "eager",
    optimizer: str | OptimizerFactory = "adamw-sf",
) -> list[BenchResult]:
    """Time ``rules`` (``name[:key=value,...][@engine]``) interleaved; ``optimizer`` for every
    trainer (a capturable one for the graph engine). Peak memory is measured for eager entries
    only (a captured graph keeps its own memory pool; not measured here)."""
    dev = torch.device(device)
    trainers, costs, engines = {}, {}, {}
    for spec in rules:
        name, options = parse_rule_spec(split_engine(spec)[0])
        engines[spec] = split_engine(spec)[1] or engine
        trainer = build_trainer(
            model,
            name,
            input_shape,
            classes,
            rule_options=options,
            device=dev,
            channels_last=channels_last,
            optimizer=optimizer,
            engine=engines[spec],
        )
        engines[spec] = "eager" if trainer.engine is None else "graph"
        if compile_blocks:
            for block in trainer.net.blocks:
                block.compile()
        trainers[spec] = trainer
        costs[spec] = count_costs(model, create_rule(name, **options), input_shape, classes).step_macs
    x, y = example_batch(input_shape, classes, batch, dev, channels_last)
    warmup += max(WARMUP_STEPS + 1 if e == "graph" else 0 for e in engines.values())  # capture first
    for _ in range(warmup):
        for trainer in trainers.values():
            trainer.train_step(x, y)
    _sync(dev)
    seconds: dict[str, list[float]] = {spec: [] for spec in trainers}
    for _ in range(steps):
        for spec, trainer in trainers.items():
            start = time.perf_counter()
            trainer.train_step(x, y)
            _sync(dev)
            seconds[spec].append(time.perf_counter() - start)
    results = []
    for spec in trainers:
        name, options = parse_rule_spec(split_engine(spec)[0])
        peak = None
        if measure_peak and engines[spec] == "eager":
            memory = measure_memory(
                model,
                name,
                input_shape,
                classes,
                batch=batch,
                device=device,
                channels_last=channels_last,
                rule_options=options,
            )
            peak = memory.get("step_peak_bytes")
        results.append(BenchResult(spec, seconds[spec], batch, costs[spec], peak, name, engines[spec]))
    return results


def summarize(results: list[BenchResult]) -> dict[str, dict[str, Any]]:
    def bp_on(engine: str) -> BenchResult | None:
        return next((r for r in results if (r.rule or r.label) == "bp" and r.engine == engine), None)

    base = bp_on("eager")
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
    if any("time_ratio_to_bp_same_engine" in r for r in summary.values()):  # engines compared
        header.append("time vs bp, same engine")
        for row, r in zip(rows, summary.values(), strict=True):
            row.append(ratio(r.get("time_ratio_to_bp_same_engine")))
    return heading + "\n" + table(header, rows)
