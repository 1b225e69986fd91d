"""Throughput of one process, a 2-stage LLS pipeline and 2-rank data parallelism, and a model of
S-stage pipelines for LLS against BP with pipeline parallelism.

    python benchmarks/scaling.py measure [--limit 20000] [--epochs 1]
    python benchmarks/scaling.py model

``measure`` starts the processes the way torchrun does (one thread each) on Fashion-MNIST with
SmallConv and LLS, and prints training images/s (evaluation excluded) and, for the pipeline, the
fraction of time each stage spent computing rather than waiting. ``model`` prints the throughput
model of docs/scaling.md from ``lls cost``'s per-block multiply-adds.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

from lls.measure.cost import count_costs
from lls.training.pipeline import balance_stages

COMMON = [
    "train",
    "--dataset",
    "fashion-mnist",
    "--model",
    "smallconv",
    "--rule",
    "lls",
    "--quiet",
    "--json",
    "--no-block-accuracy",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, parallel: str | None, extra: list[str]) -> dict:
    out = tempfile.mkdtemp(prefix="lls-scaling-")
    argv = [sys.executable, "-m", "lls", *COMMON, *extra, "--out", os.path.join(out, "run")]
    if parallel:
        argv += ["--parallel", parallel]
    port, procs = free_port(), []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if parallel:
            env.update(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                WORLD_SIZE=str(world),
                RANK=str(rank),
                LOCAL_RANK=str(rank),
            )
        procs.append(
            subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outputs = [p.communicate() for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"{parallel or 'single'} failed: {outputs[0][1][-2000:]}")
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def measure(args: argparse.Namespace) -> None:
    extra = ["--epochs", str(args.epochs), "--limit", str(args.limit)]
    print(
        f"SmallConv, LLS (square), Fashion-MNIST first {args.limit} images, batch 128, "
        f"{args.epochs} epoch(s), 1 thread per process, gloo on localhost"
    )
    base = None
    for label, world, parallel in (
        ("1 process", 1, None),
        ("2-stage pipeline", 2, "pipeline"),
        ("2-rank data parallel", 2, "ddp"),
    ):
        summary = run(world, parallel, extra)
        images = args.limit * summary["epochs"]
        rate = images / summary["train_seconds"]
        base = base or rate
        busy = summary.get("stage_busy_fractions")
        busy_text = f", stage busy fractions {', '.join(f'{b:.2f}' for b in busy)}" if busy else ""
        print(
            f"{label:22s} {rate:7.0f} images/s ({rate / base:.2f}x), test accuracy "
            f"{100 * summary['test_accuracy']:.2f}%{busy_text}"
        )


def pipeline_model(model: str, shape, classes: int, stages: int, micro_batches: int) -> dict:
    """Steady-state throughput relative to one device, from per-block multiply-adds.

    LLS: a stage costs forward + weight gradients + signal of its blocks; sends overlap compute and
    nothing goes back, so a batch leaves the pipeline every max-stage time: speed-up
    sum / max. BP (GPipe-style, M micro-batches): a stage costs forward + weight + input gradients;
    a batch takes (M + S - 1) micro-batch slots of the slowest stage, so speed-up
    sum / max * M / (M + S - 1); activation gradients travel back over every stage boundary.
    """
    lls = count_costs(model, "lls", shape, classes)
    bp = count_costs(model, "bp", shape, classes)
    lls_costs = [b.forward + b.weight_grad + b.signal_mults for b in lls.blocks[:-1]]
    bp_costs = [b.forward + b.weight_grad + b.input_grad for b in bp.blocks[:-1]]
    lls_costs[-1] += lls.blocks[-1].forward + lls.blocks[-1].weight_grad
    bp_costs[-1] += bp.blocks[-1].forward + bp.blocks[-1].weight_grad + bp.blocks[-1].input_grad
    if stages > len(lls_costs):
        return {}
    lls_layout = balance_stages(lls_costs, stages)
    bp_layout = balance_stages(bp_costs, stages)
    lls_max = max(sum(lls_costs[i] for i in r) for r in lls_layout)
    bp_max = max(sum(bp_costs[i] for i in r) for r in bp_layout)
    lls_speedup = sum(lls_costs) / lls_max
    bp_speedup = sum(bp_costs) / bp_max * micro_batches / (micro_batches + stages - 1)
    # per sample: LLS step time on one device relative to BP's is sum(lls)/sum(bp)
    lls_vs_bp = (bp_max * (micro_batches + stages - 1) / micro_batches) / lls_max
    return {
        "lls_stages": [f"{r.start}-{r.stop - 1}" for r in lls_layout],
        "lls_speedup": lls_speedup,
        "bp_speedup": bp_speedup,
        "lls_throughput_vs_bp": lls_vs_bp,
        "bubble": (stages - 1) / (micro_batches + stages - 1),
    }


def model(args: argparse.Namespace) -> None:
    for name, shape, classes in (("vgg8", (3, 32, 32), 10), ("mobilenetv1", (3, 128, 128), 10)):
        print(f"\n{name}, input {'x'.join(map(str, shape))}; BP pipeline with M = 4 micro-batches per stage")
        print(
            "| S | LLS stages (blocks) | LLS speed-up vs 1 device | BP speed-up vs 1 device | BP bubble | "
            "LLS throughput / BP throughput |"
        )
        print("|---|---|---|---|---|---|")
        for s in (1, 2, 4, 8):
            m = pipeline_model(name, shape, classes, s, 4 * s)
            if not m:
                continue
            print(
                f"| {s} | {' / '.join(m['lls_stages'])} | {m['lls_speedup']:.2f}x | {m['bp_speedup']:.2f}x | "
                f"{100 * m['bubble']:.0f} % | {m['lls_throughput_vs_bp']:.2f}x |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    m = commands.add_parser("measure")
    m.add_argument("--limit", type=int, default=20000)
    m.add_argument("--epochs", type=int, default=1)
    m.set_defaults(func=measure)
    commands.add_parser("model").set_defaults(func=model)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
