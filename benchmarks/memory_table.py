"""Step peak of BP, LLS and LLS low-memory: at the paper's batch, and the largest batch a budget allows.

    python benchmarks/memory_table.py --models vgg8,smallconvl,mobilenetv1 --json memory.json

Every figure is the step peak that ``lls cost`` measures (CPU: peak resident memory of one step in a
fresh process whose allocator returns freed blocks; CUDA: the allocator's peak), one measurement at
a time. Two tables:

1. each rule's step peak at the paper's batch (128), ordinary and with ``memory="low"``;
2. the largest batch whose step peak stays within each budget (256 MiB, 512 MiB, 1 GiB). BP and
   LLS: the step peak is nearly linear in the batch, so two measurements place the line; the batch
   it predicts is measured, and taken when it fits with less than one sample's worth (the line's
   slope) to spare, else moved by one and measured again. LLS low-memory with the budget
   as its ``memory`` setting: the largest batch its slice plan accepts (above it the plan refuses,
   as ``lls train --memory`` would), with the step peak measured there to show it holds.

Measurements are memoised in the JSON file, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
from pathlib import Path

import torch

import lls
from lls.measure.memory import cpu_step_peak, measure_memory
from lls.step.lowmem import LowMemory, memory_plan

MIB = 2**20
PAPER_BATCH = 128  # the paper's batch (docs/method.md, "The presets")
SHAPES = {"vgg8": (3, 32, 32), "smallconvl": (3, 32, 32), "mobilenetv1": (3, 128, 128)}
CLASSES = 10
BUDGETS = (256 * MIB, 512 * MIB, 1024 * MIB)
# LLS-M, LLS-MxM and local classifiers hold what LLS holds (docs/cost.md): --rules adds them
RULES = ("bp", "lls", "dfa", "drtp")


class Meter:
    """Step peaks, measured once each and kept in a JSON file."""

    def __init__(self, path: Path | None, device: str) -> None:
        self.path, self.device = path, device
        self.done: dict[str, dict] = json.loads(path.read_text()) if path and path.exists() else {}

    def peak(self, model: str, rule: str, batch: int, memory: str | int | None = None) -> int:
        key = f"{model} {rule} {batch} {memory}"
        if key not in self.done:
            shape = SHAPES[model]
            if self.device == "cpu":
                result = cpu_step_peak(model, rule, shape, CLASSES, batch, True, {}, memory)
            else:
                result = measure_memory(
                    model, rule, shape, CLASSES, batch=batch, device=self.device, memory=memory
                )
            if result.get("step_peak_bytes") is None:
                raise RuntimeError(f"{key}: {result.get('step_peak_method')}")
            self.done[key] = {"step_peak_bytes": result["step_peak_bytes"]}
            if memory is not None:
                plan = plan_for(model, memory, rule)
                self.done[key].update(slices=plan.slices(batch), estimated=plan.estimated_peak(batch))
            print(f"  {key}: {result['step_peak_bytes'] / MIB:.1f} MiB", flush=True)
            if self.path:
                self.path.write_text(json.dumps(self.done, indent=1))
        return self.done[key]["step_peak_bytes"]


def plan_for(model: str, memory: str | int, rule: str = "lls") -> LowMemory:
    """The slice plan a trainer of ``rule`` on ``model`` makes for ``memory`` (no training)."""
    shape = SHAPES[model]
    net = lls.create_model(model, in_channels=shape[0], input_size=shape[1:], num_classes=CLASSES)
    timing = lls.create_rule(rule).timing
    return LowMemory(memory_plan(memory), net, shape, recompute_all=timing == "head")


def largest_batch_linear(meter: Meter, model: str, rule: str, budget: int) -> int:
    """The largest batch whose measured step peak is within ``budget`` (0 if not even 1)."""
    a, b = PAPER_BATCH, PAPER_BATCH // 2
    pa, pb = meter.peak(model, rule, a), meter.peak(model, rule, b)
    slope = (pa - pb) / (a - b)
    n = max(1, math.floor((budget - (pa - slope * a)) / slope))
    while n > 1 and meter.peak(model, rule, n) > budget:
        n -= 1
    if meter.peak(model, rule, n) > budget:
        return 0
    while budget - meter.peak(model, rule, n) >= slope:  # room for one sample more, by the line
        if meter.peak(model, rule, n + 1) > budget:
            break
        n += 1
    return n


def largest_batch_low(meter: Meter, model: str, budget: int, verify: bool = True) -> int:
    """The largest batch the low-memory plan accepts for ``budget``, checked by a measurement
    unless ``verify`` is off (a step of several hundred images, recomputed, takes minutes on a CPU)."""
    plan = plan_for(model, budget)

    def accepted(n: int) -> bool:
        try:
            plan.slice_samples(n)
        except lls.LLSError:
            return False
        return True

    lo, hi = 0, 1
    while accepted(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if accepted(mid) else (lo, mid)
    if verify and lo and meter.peak(model, "lls", lo, budget) > budget:
        print(f"  warning: {model} at batch {lo} exceeds its {budget / MIB:.0f} MiB budget")
    return lo


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="vgg8,smallconvl,mobilenetv1")
    parser.add_argument("--rules", default=",".join(RULES), help="rules of the paper-batch table")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="memoised measurements (read and written)")
    parser.add_argument("--skip-largest", action="store_true", help="only the paper-batch table")
    parser.add_argument(
        "--no-verify", action="store_true", help="take the low-memory plan's largest batch unmeasured"
    )
    args = parser.parse_args()
    lls.tune_malloc()
    meter = Meter(args.json, args.device)
    models = args.models.split(",")
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cpus, device {args.device}")

    print(f"\nStep peak at batch {PAPER_BATCH} (MiB), ordinary and memory=low; low / ordinary; low / BP")
    for model in models:
        bp = meter.peak(model, "bp", PAPER_BATCH)
        print(f"\n{model} {'x'.join(map(str, SHAPES[model]))}, batch {PAPER_BATCH}")
        columns = f"{'ordinary':>9} {'low':>9} {'estimate':>9} {'low/ord':>8} {'low/bp':>7}"
        print(f"{'rule':18} {columns}  slices per block")
        for rule in args.rules.split(","):
            normal = meter.peak(model, rule, PAPER_BATCH)
            if rule == "bp":
                print(f"{rule:18} {normal / MIB:9.1f} {'-':>9} {'-':>9} {'-':>8} {'-':>7}")
                continue
            low = meter.peak(model, rule, PAPER_BATCH, "low")
            done = meter.done[f"{model} {rule} {PAPER_BATCH} low"]
            print(
                f"{rule:18} {normal / MIB:9.1f} {low / MIB:9.1f} {done['estimated'] / MIB:9.1f} "
                f"{low / normal:8.2f} {low / bp:7.2f}  {done['slices']}"
            )
    if args.skip_largest:
        return
    print("\nLargest batch whose step peak fits (LLS low-memory: --memory set to the budget)")
    head = " ".join(f"{b // MIB:>5} MiB" for b in BUDGETS)
    print(f"{'model':12} {'rule':14} {head}")
    for model in models:
        for rule in ("bp", "lls"):
            sizes = [largest_batch_linear(meter, model, rule, b) for b in BUDGETS]
            print(f"{model:12} {rule:14} " + " ".join(f"{n:>9}" for n in sizes), flush=True)
        sizes = [largest_batch_low(meter, model, b, verify=not args.no_verify) for b in BUDGETS]
        print(f"{model:12} {'lls low-mem':14} " + " ".join(f"{n:>9}" for n in sizes), flush=True)


if __name__ == "__main__":
    main()
