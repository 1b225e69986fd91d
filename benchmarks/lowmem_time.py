"""Step time of the low-memory step against the ordinary one, interleaved in one process.

    python benchmarks/lowmem_time.py --model vgg8 --shape 3,32,32 --rules lls --memory low --steps 25

Each rule runs the ordinary step and the low-memory step in turn (a b a b ...) after a warm-up, so
that slow and fast periods of the machine hit both alike (``lls.measure.bench.run_bench``); prints medians,
interquartile ranges, the ratio low-memory / ordinary and both step peaks. Time it on a quiet
machine: on a shared one the ratio drifts with the neighbours' load.
"""

from __future__ import annotations

import argparse

import torch

import lls
from lls.measure.bench import run_bench, summarize
from lls.step.lowmem import parse_memory


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vgg8")
    parser.add_argument("--shape", default="3,32,32", help="input C,H,W")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--rules", default="lls")
    parser.add_argument(
        "--memory", default="low", help="'low' or a budget such as 256MiB (comma-separated for several)"
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--no-memory", dest="measure_peak", action="store_false", help="skip the step peaks")
    args = parser.parse_args()
    lls.tune_malloc()  # as the lls command does
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.shape.split(","))
    memories = [None, *(parse_memory(m) for m in args.memory.split(","))]
    results = run_bench(
        args.model,
        shape,
        args.classes,
        args.rules.split(","),
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        measure_peak=args.measure_peak,
        memory=memories,
    )
    where = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"cpu, {torch.get_num_threads()} threads"
    )
    print(
        f"{args.model}, input {'x'.join(map(str, shape))}, batch {args.batch}, {args.steps} interleaved "
        f"steps after {args.warmup} warm-up, {where}, torch {torch.__version__}"
    )
    columns = ("median", "IQR (ms)", "vs ordinary", "step peak", "vs ordinary")
    print(f"{'step':24} " + " ".join(f"{c:>{w}}" for c, w in zip(columns, (10, 17, 11, 10, 11), strict=True)))
    for label, row in summarize(results).items():
        peak = row["peak_memory_bytes"]
        print(
            f"{label:24} {1000 * row['step_seconds_median']:8.1f}ms "
            f"{1000 * row['step_seconds_p25']:8.1f}-{1000 * row['step_seconds_p75']:<8.1f} "
            f"{row.get('time_ratio_to_normal', 1.0):10.2f}x "
            f"{'-' if peak is None else f'{peak / 2**20:.1f} MiB':>10} "
            f"{row.get('memory_ratio_to_normal', 1.0):10.2f}x"
        )


if __name__ == "__main__":
    main()
