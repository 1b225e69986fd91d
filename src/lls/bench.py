"""``lls bench``: training-step time of several rules, interleaved in one process.

Rules run one step each in turn (a b c a b c ...) after a warm-up, so that slow and fast periods of
a shared machine hit every rule alike; the figures are medians with their interquartile range.
Achieved GFLOP/s use the step's multiply-adds from ``lls cost`` (2 FLOPs each). With ``memory``
settings besides ``None``, every rule also runs in the low-memory step (``lowmem.py``), interleaved
with the rest, and is compared with its own ordinary step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .cost import build_trainer, count_costs, example_batch, measure_memory
from .rules import RULES, create_rule


def parse_rule_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``lls:basis=periodic`` -> ("lls", {"basis": "periodic"}); values parsed as int/float if they can be."""
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        options[key] = value
    create_rule(name, **options)  # validate now, with the registry's error messages
    return name, options


@dataclass
class BenchResult:
    label: str
    seconds: list[float]
    batch: int
    step_macs: int
    peak_memory_bytes: int | None
    rule: str = ""  # the rule spec
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
    batch: int = 128,
    steps: int = 20,
    warmup: int = 3,
    device: str = "cpu",
    channels_last: bool = True,
    compile_blocks: bool = False,
    measure_peak: bool = True,
    memory: Sequence[str | int | None] = (None,),
) -> list[BenchResult]:
    """Interleaved step times of every rule spec under every ``memory`` setting (``None``: the
    ordinary step; ``"low"`` or a budget in bytes: the low-memory step, for local rules only: BP
    takes the ordinary step alone), and their step peaks."""
    dev = torch.device(device)
    trainers, costs, runs = {}, {}, {}
    for spec in rules:
        name, options = parse_rule_spec(spec)
        cost = count_costs(model, create_rule(name, **options), input_shape, classes).step_macs
        for setting in memory:
            if setting is not None and RULES.get(name).timing == "end-to-end":
                continue
            label = bench_label(spec, setting)
            trainer = build_trainer(model, name, input_shape, classes, dev, channels_last, options, setting)
            if compile_blocks:
                for block in trainer.net.blocks:
                    block.compile()
            trainers[label], costs[label], runs[label] = trainer, cost, (spec, name, options, setting)
    x, y = example_batch(input_shape, classes, batch, dev, channels_last)
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
    results = []
    for label, (spec, name, options, setting) in runs.items():
        peak = None
        if measure_peak:
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
            )
            peak = measured.get("step_peak_bytes")
        results.append(BenchResult(label, seconds[label], batch, costs[label], peak, spec, setting))
    return results


def summarize(results: list[BenchResult]) -> dict[str, dict[str, Any]]:
    base = next((r for r in results if r.label == "bp"), None)
    ordinary = {r.rule: r for r in results if r.memory is None}
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
        }
        if base is not None and r is not base:
            row["time_ratio_to_bp"] = r.median / base.median
            if r.peak_memory_bytes is not None and base.peak_memory_bytes:
                row["memory_ratio_to_bp"] = r.peak_memory_bytes / base.peak_memory_bytes
            else:
                row["memory_ratio_to_bp"] = None
        normal = ordinary.get(r.rule)
        if r.memory is not None and normal is not None:  # the low-memory step against the ordinary one
            row["time_ratio_to_normal"] = r.median / normal.median
            if r.peak_memory_bytes is not None and normal.peak_memory_bytes:
                row["memory_ratio_to_normal"] = r.peak_memory_bytes / normal.peak_memory_bytes
        table[r.label] = row
    return table
