"""The graph engine on one H100/H200, in one run: the step engine's GPU tests, timings and agreement checks.

Prepare the carry folder once (ignored by git; see benchmarks/gpu_carry.sh), then, on the device
machine, from the repository root::

    pip install --no-deps --target /tmp/site .gpu/wheels/schedulefree-*.whl
    PYTHONPATH=/tmp/site:src python3 benchmarks/gpu_engine.py --data .gpu/fashion-mnist --out $OUT

It writes ``gpu_engine.json`` (every number), ``gpu_engine.md`` (the tables for docs/cost.md) and
``pytest.txt`` under ``--out``, and prints the tables last. Stages, in order, each timed and each
allowed to fail without stopping the others (a failure is recorded with its traceback):

1. ``tests``: pytest on tests/test_engine.py (its CUDA tests run here, and the CPU ones).
2. ``steps``: interleaved step-time medians (each trainer one step in turn, a device sync after
   every step) for VGG8 3x32x32 batch 128, SmallConv 1x28x28 batch 128 and MobileNetV1 3x128x128
   batch 64, of LLS and BP eager (the schedule-free AdamW people run) and on the graph engine,
   with the graph engine's parts switched off one by one (one stream; the autograd signal) to
   show what each bought; plus the graph engine's pipelined time (steps issued back to back).
3. ``kernels``: kernels per step from torch.profiler, eager and graph, LLS and BP.
4. ``agreement``: per-step losses of eager and graph training over the first 100 steps of
   SmallConv on Fashion-MNIST (TF32 off, same optimizer, same batches), fused signal and not.
5. ``epochs``: SmallConv Fashion-MNIST, 3 epochs of LLS eager and graph with the same seed and the
   paper's evaluation after each (accuracies within 0.3 points?), full-epoch times (data,
   augmentation, training; evaluation apart) of LLS/BP eager with host draws (today's path) and
   graph with device draws, and evaluation times.
6. ``paper_run`` (only if the time left allows): the paper's 100-epoch SmallConv Fashion-MNIST LLS
   run with evaluation after every epoch, on the graph engine, wall clock.

The optimizer: schedule-free AdamW throughout (lr 5e-3, the paper's). Graph runs, and the eager
runs compared with them step for step, use its capturable implementation (lls.sfadamw); the eager
baselines "as people run them" use the registry's eager ``adamw-sf`` (the schedulefree package).

``--dry-run`` runs every stage on the CPU at tiny sizes with the eager engine (graph entries are
skipped there): it checks the script's code paths, not any figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import torch

import lls
from lls.data import make_loader
from lls.measure.memory import example_batch
from lls.step.engine import WARMUP_STEPS, GraphEngine
from lls.step.factory import build_trainer
from lls.step.optim import create_optimizer
from lls.step.trainer import Trainer
from lls.training.fit import (
    BATCHNORM_MIN_BATCH,
    EVAL_BATCH_SIZE,
    REFRESH_BATCHES,
    Loaders,
    evaluate,
    train_epoch,
)

BUDGET_SECONDS = 470  # the whole run; stages check the time left (the device tool allows 600)
PAPER_RUN_SECONDS = 150  # the 100-epoch run starts only with this much left
ACCURACY_POINTS = 0.3  # graph and eager 3-epoch accuracies must end this close (percentage points)
LOSS_TOLERANCE = 1e-3  # per-step loss agreement over 100 steps, relative (a judgment; see the report)


def capturable_sf(params, lr, weight_decay):
    """lls.step.sfadamw's schedule-free AdamW, the one the graph engine runs."""
    return create_optimizer("adamw-sf", params, lr, weight_decay, capturable=True)


def pick_optimizer(device: torch.device) -> tuple[Callable, str]:
    """The optimizer of graph runs, and of the eager runs compared with them step for step."""
    probe = capturable_sf([torch.nn.Parameter(torch.zeros(1, device=device))], 1e-3, 0.0)
    return capturable_sf, f"adamw-sf, capturable ({type(probe).__module__}.{type(probe).__name__})"


class Run:
    """Budget, results and the device of one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.start = args, time.perf_counter()
        self.device = torch.device("cpu" if args.dry_run else "cuda")
        self.graph = not args.dry_run  # the graph engine needs CUDA
        self.optimizer, self.optimizer_name = pick_optimizer(self.device)
        self.results: dict = {"stages": {}, "environment": environment(self.device), "dry_run": args.dry_run}
        self.results["environment"]["optimizer_for_graph_runs"] = self.optimizer_name
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.start)

    def stage(self, name: str, fn: Callable[[], dict]) -> None:
        began = time.perf_counter()
        print(f"== {name} ({self.left():.0f} s left)", flush=True)
        try:
            record = fn()
            record["ok"] = record.get("ok", True)
        except Exception:  # record the failure, go on with the next stage
            record = {"ok": False, "error": traceback.format_exc()}
            print(record["error"], file=sys.stderr, flush=True)
        record["stage_seconds"] = time.perf_counter() - began
        self.results["stages"][name] = record
        self.save()

    def save(self) -> None:
        (self.out / "gpu_engine.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "tf32_conv": torch.backends.cudnn.allow_tf32,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }
    try:
        env["commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        env["commit"] = None
    return env


# --- trainers --------------------------------------------------------------------------------------


def capturable_sgd(params, lr, weight_decay):
    """SGD with momentum (no host-side scalar in its step, so capturable): the agreement check's
    control, whose update keeps a rounding difference a rounding difference (Adam's does not)."""
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    for group in optimizer.param_groups:
        group["capturable"] = True
    return optimizer


def make_trainer(
    run: Run, model: str, rule: str, shape, classes: int, variant: str, seed: int = 0, optimizer=None
) -> Trainer:
    """A trainer in one of the configurations compared:

    - ``eager-sf``: eager with the registry's adamw-sf (what `lls train` runs today);
    - ``eager``: eager with the graph runs' optimizer;
    - ``graph``: the graph engine (streams + fused signal);
    - ``graph-serial``: graph, everything on one stream (no block overlap);
    - ``graph-serial-chain``: graph, one stream, autograd's signal (capture alone).
    """
    optimizer = optimizer or ("adamw-sf" if variant == "eager-sf" else run.optimizer)
    graph = variant.startswith("graph")
    trainer = build_trainer(
        model,
        rule,
        shape,
        classes,
        seed=seed,
        device=run.device,
        channels_last=True,
        optimizer=optimizer,
        engine="graph" if graph else "eager",
    )
    if graph and variant != "graph":  # the engine with one of its parts switched off
        trainer.engine = GraphEngine(
            trainer.step, trainer.input_shape, streams=False, fused=not variant.endswith("chain"), strict=True
        )
    return trainer


# --- stage 1: tests --------------------------------------------------------------------------------


def stage_tests(run: Run) -> dict:
    command = [sys.executable, "-m", "pytest", "tests/test_engine.py", "-q", "-rs", "-p", "no:cacheprovider"]
    if run.args.dry_run:  # the CUDA tests only: on a CPU they skip, with their reason
        command += ["-k", "cuda or graph_engine_trains or recaptures or streams_without or refuses_data"]
    timeout = max(30.0, min(240.0, run.left() - 200))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        output, code = f"pytest timed out after {timeout:.0f} s\n{expired.stdout or ''}", -1
    (run.out / "pytest.txt").write_text(output)
    lines = [line for line in output.splitlines() if line.strip()]
    return {"ok": code == 0, "returncode": code, "summary": lines[-1] if lines else "no output"}


# --- stage 2: step times ---------------------------------------------------------------------------

STEP_JOBS = [  # (label, model, input shape, classes, batch)
    ("VGG8 3x32x32 b128", "vgg8", (3, 32, 32), 10, 128),
    ("SmallConv 1x28x28 b128", "smallconv", (1, 28, 28), 10, 128),
    ("MobileNetV1 3x128x128 b64", "mobilenetv1", (3, 128, 128), 10, 64),
]
DRY_STEP_JOBS = [
    ("VGG8 3x16x16 b8 (dry)", "vgg8", (3, 16, 16), 10, 8),
    ("SmallConv 1x28x28 b8 (dry)", "smallconv", (1, 28, 28), 10, 8),
    ("MobileNetV1 3x32x32 b4 (dry)", "mobilenetv1", (3, 32, 32), 10, 4),
]
VARIANTS = [  # (label, rule, variant)
    ("lls eager (adamw-sf)", "lls", "eager-sf"),
    ("bp eager (adamw-sf)", "bp", "eager-sf"),
    ("lls eager", "lls", "eager"),
    ("lls graph, one stream, autograd signal", "lls", "graph-serial-chain"),
    ("lls graph, one stream", "lls", "graph-serial"),
    ("lls graph", "lls", "graph"),
    ("bp graph", "bp", "graph-serial"),
]


def interleaved(
    run: Run, trainers: dict[str, Trainer], x, y, steps: int, warmup: int
) -> dict[str, list[float]]:
    for _ in range(warmup):
        for trainer in trainers.values():
            trainer.train_step(x, y)
    run.sync()
    seconds: dict[str, list[float]] = {label: [] for label in trainers}
    for _ in range(steps):
        for label, trainer in trainers.items():
            start = time.perf_counter()
            trainer.train_step(x, y)
            run.sync()
            seconds[label].append(time.perf_counter() - start)
    return seconds


def pipelined(run: Run, trainer: Trainer, x, y, steps: int) -> float:
    """Seconds per step with steps issued back to back and one sync at the end."""
    run.sync()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(x, y)
    run.sync()
    return (time.perf_counter() - start) / steps


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def stage_steps(run: Run) -> dict:
    jobs = DRY_STEP_JOBS if run.args.dry_run else STEP_JOBS
    steps, warmup = (3, 1) if run.args.dry_run else (run.args.steps, 3)
    record = {}
    for label, model, shape, classes, batch in jobs:
        if run.left() < 120:
            record[label] = {"skipped": "time budget"}
            continue
        trainers = {}
        for name, rule, variant in VARIANTS:
            if variant.startswith("graph") and not run.graph:
                continue
            trainers[name] = make_trainer(run, model, rule, shape, classes, variant)
        x, y = example_batch(shape, classes, batch, run.device, channels_last=True)
        seconds = interleaved(run, trainers, x, y, steps, warmup + (WARMUP_STEPS + 1 if run.graph else 0))
        rows = {}
        for name, values in seconds.items():
            q1, median, q3 = quartiles(values)
            rows[name] = {
                "median_ms": 1e3 * median,
                "p25_ms": 1e3 * q1,
                "p75_ms": 1e3 * q3,
                "steps": len(values),
            }
            if name.startswith(("lls graph", "bp graph")):
                rows[name]["pipelined_ms"] = 1e3 * pipelined(run, trainers[name], x, y, steps)
        bp_eager = rows["bp eager (adamw-sf)"]["median_ms"]
        for name, row in rows.items():
            row["ratio_to_bp_eager"] = row["median_ms"] / bp_eager
            if "bp graph" in rows and name.startswith("lls graph"):
                row["ratio_to_bp_graph"] = row["median_ms"] / rows["bp graph"]["median_ms"]
        record[label] = {"batch": batch, "rows": rows}
        del trainers
        gc.collect()  # a trainer and its engine refer to each other: free their graphs' memory now
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    return record


# --- stage 3: kernel counts ------------------------------------------------------------------------


def count_kernels(run: Run, trainer: Trainer, x, y) -> dict:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(WARMUP_STEPS + 2):  # past warm-up and capture
        trainer.train_step(x, y)
    run.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        trainer.train_step(x, y)
        run.sync()
    events = prof.events()
    device_kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
    launch_calls = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
    launches = [e for e in events if e.name in launch_calls]
    graph_launches = [e for e in events if e.name in ("cudaGraphLaunch", "cuGraphLaunch")]
    aten = [e for e in events if e.name.startswith("aten::")]
    return {
        "device_kernels": len(device_kernels),
        "host_kernel_launches": len(launches),
        "graph_launches": len(graph_launches),
        "aten_ops": len(aten),
    }


def stage_kernels(run: Run) -> dict:
    label, model, shape, classes, batch = (DRY_STEP_JOBS if run.args.dry_run else STEP_JOBS)[0]
    x, y = example_batch(shape, classes, batch, run.device, channels_last=True)
    record = {"job": label}
    for name, rule, variant in VARIANTS:
        if variant.startswith("graph") and not run.graph:
            continue
        record[name] = count_kernels(run, make_trainer(run, model, rule, shape, classes, variant), x, y)
    return record


# --- fashion-mnist ---------------------------------------------------------------------------------


def load_data(run: Run):
    if run.args.dry_run and run.args.data is None:
        data = lls.load_dataset("digits")
    else:
        data = lls.load_dataset("fashion-mnist", run.args.data, download=False, quiet=True)
    if run.args.dry_run:
        from lls.data.base import Split

        data.train = Split(data.train.images[:600], data.train.labels[:600])
        data.test = Split(data.test.images[:300], data.test.labels[:300])
    return data


def loaders_for(run: Run, data, draws: str) -> Loaders:
    common = {"mean": data.mean, "std": data.std, "device": run.device, "memory_format": torch.channels_last}
    train = make_loader(data.train, 128, augment=data.augment, shuffle=True, seed=0, draws=draws, **common)
    train.min_batch = BATCHNORM_MIN_BATCH  # as Loaders.for_dataset
    return Loaders(
        train=train,
        test=make_loader(data.test, EVAL_BATCH_SIZE, draws=draws, **common),
        probe=make_loader(data.train.head(2048), EVAL_BATCH_SIZE, draws=draws, **common),
    )


def data_trainer(run: Run, data, rule: str, variant: str, optimizer=None) -> Trainer:
    return make_trainer(
        run, "smallconv", rule, data.input_shape, data.num_classes, variant, optimizer=optimizer
    )


# --- stage 4: per-step agreement ---------------------------------------------------------------------


def stage_agreement(run: Run, data) -> dict:
    if not run.graph:
        return {"skipped": "no graph engine on this device", "ok": True}
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        loaders = loaders_for(run, data, "device")
        batches = list(islice(loaders.train.epoch(0), 100))
        record = {}
        # eager vs eager: the GPU's own run-to-run difference (cuDNN's backward kernels may sum in
        # another order), the floor any engine comparison sits on; SGD: the same without Adam's
        # amplification of rounding in near-zero gradients.
        pairs = {
            "graph": ("graph", None),
            "graph-serial-chain": ("graph-serial-chain", None),
            "eager (second run)": ("eager", None),
            "graph, sgd": ("graph", capturable_sgd),
            "eager (second run), sgd": ("eager", capturable_sgd),
        }
        for name, (variant, optimizer) in pairs.items():
            eager = data_trainer(run, data, "lls", "eager", optimizer)
            graph = data_trainer(run, data, "lls", variant, optimizer)
            worst_head = worst_block = 0.0
            first_bad = None
            for step, (x, y) in enumerate(batches, start=1):
                a, b = eager.train_step(x, y), graph.train_step(x, y)
                head = float((a.loss - b.loss).abs() / a.loss.abs().clamp_min(1.0))
                block = float(
                    ((a.block_losses - b.block_losses).abs() / a.block_losses.abs().clamp_min(1.0)).max()
                )
                worst_head, worst_block = max(worst_head, head), max(worst_block, block)
                if first_bad is None and max(head, block) > LOSS_TOLERANCE:
                    first_bad = step
            record[name] = {
                "steps": len(batches),
                "max_relative_head_loss_difference": worst_head,
                "max_relative_block_loss_difference": worst_block,
                "first_step_over_tolerance": first_bad,
            }
        record["tolerance"] = LOSS_TOLERANCE
        record["ok"] = all(
            r["first_step_over_tolerance"] is None for r in record.values() if isinstance(r, dict)
        )
        return record
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# --- stage 5: epochs -------------------------------------------------------------------------------


def timed_evaluation(run: Run, trainer: Trainer, loaders: Loaders, epoch: int, blocks: bool):
    run.sync()
    result, seconds = evaluate(trainer, loaders, epoch, blocks=blocks)
    return result, seconds


def stage_epochs(run: Run, data) -> dict:
    epochs = 1 if run.args.dry_run else 3
    record: dict = {"epochs": epochs}
    host, device = loaders_for(run, data, "host"), loaders_for(run, data, "device")
    # 3 epochs, same seed: eager vs graph accuracy (same optimizer, same device draws)
    runs = {"lls eager": ("lls", "eager", device)}
    if run.graph:
        runs["lls graph"] = ("lls", "graph", device)
    curves = {}
    for label, (rule, variant, loaders) in runs.items():
        trainer = data_trainer(run, data, rule, variant)
        rows = []
        for epoch in range(epochs):
            done = train_epoch(trainer, loaders.train, epoch, progress=False)
            result, eval_seconds = timed_evaluation(run, trainer, loaders, epoch, blocks=False)
            rows.append(
                {
                    "epoch": epoch + 1,
                    "train_seconds": done.seconds,
                    "eval_seconds": eval_seconds,
                    "test_accuracy": result.accuracy,
                    "train_loss": done.loss_sum / done.seen,
                }
            )
            print(
                f"   {label} epoch {epoch + 1}: {done.seconds:.2f} s, eval {eval_seconds:.2f} s, "
                f"test {100 * result.accuracy:.2f}%",
                flush=True,
            )
        curves[label] = rows
    record["accuracy_runs"] = curves
    if "lls graph" in curves:
        final = {k: 100 * v[-1]["test_accuracy"] for k, v in curves.items()}
        record["final_accuracy_points"] = final
        record["accuracy_difference_points"] = abs(final["lls graph"] - final["lls eager"])
        record["ok"] = record["accuracy_difference_points"] <= ACCURACY_POINTS
    # full-epoch times of today's path (eager, host draws, adamw-sf) against the graph engine
    timing = {
        "lls eager, host draws (adamw-sf)": ("lls", "eager-sf", host, 1),
        "bp eager, host draws (adamw-sf)": ("bp", "eager-sf", host, 1),
        "lls eager, device draws (adamw-sf)": ("lls", "eager-sf", device, 1),
    }
    if run.graph:
        timing["lls graph, host draws"] = ("lls", "graph", host, 2)
        timing["lls graph, device draws"] = ("lls", "graph", device, 3)
        timing["bp graph, device draws"] = ("bp", "graph-serial", device, 3)
    times = {}
    for label, (rule, variant, loaders, count) in timing.items():
        if run.left() < 60:
            times[label] = {"skipped": "time budget"}
            continue
        trainer = data_trainer(run, data, rule, variant)
        seconds = [train_epoch(trainer, loaders.train, e, progress=False).seconds for e in range(count)]
        _, eval_plain = timed_evaluation(run, trainer, loaders, count, blocks=False)
        _, eval_blocks = timed_evaluation(run, trainer, loaders, count, blocks=True)
        times[label] = {
            "epoch_seconds": seconds,
            "steady_epoch_seconds": seconds[-1],  # the first graph epoch includes warm-up and capture
            "eval_seconds": eval_plain,
            "eval_seconds_with_block_accuracy": eval_blocks,
        }
        print(
            f"   {label}: epochs {', '.join(f'{s:.2f}' for s in seconds)} s, eval {eval_plain:.2f} s",
            flush=True,
        )
    record["epoch_times"] = times
    record["refresh_batches"] = REFRESH_BATCHES
    return record


# --- stage 6: the paper's run ----------------------------------------------------------------------


def stage_paper_run(run: Run, data) -> dict:
    epochs = 2 if run.args.dry_run else 100
    if not run.args.dry_run and run.left() < PAPER_RUN_SECONDS:
        return {"skipped": f"{run.left():.0f} s left, {PAPER_RUN_SECONDS} needed", "ok": True}
    variant = "graph" if run.graph else "eager"
    loaders = loaders_for(run, data, "device")
    trainer = data_trainer(run, data, "lls", variant)
    run.sync()
    start = time.perf_counter()
    best, done_epochs = 0.0, 0
    for epoch in range(epochs):
        if time.perf_counter() - start > PAPER_RUN_SECONDS - 10:
            break
        train_epoch(trainer, loaders.train, epoch, progress=False)
        result, _ = evaluate(trainer, loaders, epoch, blocks=True)
        best, done_epochs = max(best, result.accuracy), epoch + 1
    run.sync()
    wall = time.perf_counter() - start
    return {
        "engine": variant,
        "epochs_done": done_epochs,
        "epochs_asked": epochs,
        "wall_seconds": wall,
        "best_test_accuracy": best,
        "complete": done_epochs == epochs,
        "ok": True,
    }


# --- the summary -----------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    env, stages = results["environment"], results["stages"]
    lines = [
        f"# Step engine on {env['device']} (torch {env['torch']}, commit {env.get('commit') or '?'})",
        "",
        f"Optimizer of graph runs: {env['optimizer_for_graph_runs']}. "
        f"{'DRY RUN on the CPU: code paths only, no figure.' if results['dry_run'] else ''}",
        "",
    ]
    tests = stages.get("tests", {})
    lines += [f"Tests: {tests.get('summary', tests.get('error', '?'))}", ""]
    steps = stages.get("steps", {})
    for job, rec in steps.items():
        if not isinstance(rec, dict) or "rows" not in rec:
            continue
        lines += [
            f"## {job}",
            "",
            "| configuration | step median (ms) | IQR (ms) | pipelined (ms) | / BP eager | / BP graph |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in rec["rows"].items():
            pipe = f"{row['pipelined_ms']:.2f}" if "pipelined_ms" in row else ""
            to_graph = f"{row['ratio_to_bp_graph']:.2f}x" if "ratio_to_bp_graph" in row else ""
            lines.append(
                f"| {name} | {row['median_ms']:.2f} | {row['p25_ms']:.2f}-{row['p75_ms']:.2f} | {pipe} | "
                f"{row['ratio_to_bp_eager']:.2f}x | {to_graph} |"
            )
        lines.append("")
    kernels = stages.get("kernels", {})
    if "job" in kernels:
        lines += [
            f"## Kernels per step ({kernels['job']})",
            "",
            "| configuration | device kernels | host kernel launches | graph launches | aten ops |",
            "|---|---|---|---|---|",
        ]
        for name, row in kernels.items():
            if isinstance(row, dict) and "device_kernels" in row:
                lines.append(
                    f"| {name} | {row['device_kernels']} | {row['host_kernel_launches']} | "
                    f"{row['graph_launches']} | {row['aten_ops']} |"
                )
        lines.append("")
    agreement = stages.get("agreement", {})
    for variant, a in agreement.items():
        if isinstance(a, dict):
            lines.append(
                f"Agreement, {variant} vs eager, {a['steps']} steps (TF32 off): max relative difference of "
                f"the head's loss {a['max_relative_head_loss_difference']:.2e}, of block losses "
                f"{a['max_relative_block_loss_difference']:.2e} (tolerance {agreement['tolerance']:g})."
            )
    epochs = stages.get("epochs", {})
    if "final_accuracy_points" in epochs:
        f = epochs["final_accuracy_points"]
        lines += [
            "",
            f"3-epoch test accuracy: eager {f['lls eager']:.2f}%, graph {f['lls graph']:.2f}% "
            f"(difference {epochs['accuracy_difference_points']:.2f} points, at most {ACCURACY_POINTS}).",
        ]
    if "epoch_times" in epochs:
        lines += [
            "",
            "## SmallConv Fashion-MNIST full epochs (data, augmentation, training)",
            "",
            "| configuration | epochs (s) | steady epoch (s) | evaluation (s) | with block accuracy (s) |",
            "|---|---|---|---|---|",
        ]
        for name, row in epochs["epoch_times"].items():
            if "epoch_seconds" in row:
                lines.append(
                    f"| {name} | {', '.join(f'{s:.2f}' for s in row['epoch_seconds'])} | "
                    f"{row['steady_epoch_seconds']:.2f} | {row['eval_seconds']:.2f} | "
                    f"{row['eval_seconds_with_block_accuracy']:.2f} |"
                )
    paper = stages.get("paper_run", {})
    if "wall_seconds" in paper:
        lines += [
            "",
            f"Paper's run ({paper['engine']} engine): {paper['epochs_done']}/{paper['epochs_asked']} "
            f"epochs with evaluation in {paper['wall_seconds']:.1f} s, best test accuracy "
            f"{100 * paper['best_test_accuracy']:.2f}%.",
        ]
    failed = [name for name, rec in stages.items() if not rec.get("ok", False)]
    lines += ["", f"Stages not ok: {', '.join(failed) if failed else 'none'}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="folder holding the Fashion-MNIST .gz files")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_engine_out"))
    parser.add_argument("--steps", type=int, default=40, help="timed steps per configuration")
    parser.add_argument("--budget", type=float, default=BUDGET_SECONDS, help="seconds for the whole run")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, eager engine only")
    parser.add_argument("--skip", default="", help="comma-separated stages to skip")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to check the code paths on a CPU", file=sys.stderr)
        return 2
    if not args.dry_run and args.data is None:
        print("give --data FOLDER with the Fashion-MNIST .gz files", file=sys.stderr)
        return 2
    if args.dry_run:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    run = Run(args)
    skip = set(filter(None, args.skip.split(",")))
    data = None
    stages = {
        "tests": lambda: stage_tests(run),
        "steps": lambda: stage_steps(run),
        "kernels": lambda: stage_kernels(run),
        "agreement": lambda: stage_agreement(run, data),
        "epochs": lambda: stage_epochs(run, data),
        "paper_run": lambda: stage_paper_run(run, data),
    }
    for name, fn in stages.items():
        if name in skip:
            continue
        if name in ("agreement", "epochs", "paper_run") and data is None:
            data = load_data(run)
        run.stage(name, fn)
    summary = markdown(run.results)
    (run.out / "gpu_engine.md").write_text(summary)
    run.results["total_seconds"] = time.perf_counter() - run.start
    run.save()
    print(summary)
    return 0 if all(rec.get("ok", False) for rec in run.results["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
