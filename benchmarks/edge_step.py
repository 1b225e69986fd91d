"""Training-step time in ExecuTorch's runtime against PyTorch's, interleaved in one process.

    python benchmarks/edge_step.py --model smallconv --shape 1,28,28 --classes 10 --batch 32 --rules lls,bp

For each rule: one trainer (SGD, lls's momentum 0.9), its training program (``lls.edge.programs``:
a method per block and the head, or BP's one method) loaded in the runtime
(``lls.edge.runtime.ProgramRunner``, portable kernels, no delegate), and the same batch stepped by
both in turn (a b a b ...) after a warm-up, so that the load of a shared machine hits both alike.
Prints medians, the ratio runtime / PyTorch and the threads each used: the portable kernels run
on one thread, so PyTorch is timed on one thread too (``--threads``), and on its default as well.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from lls.edge.programs import build_program
from lls.edge.runtime import ProgramRunner
from lls.method.rules import create_rule
from lls.step.factory import build_trainer

LR = 0.01


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def program_arguments(doc: str, batch: int) -> argparse.ArgumentParser:
    """The options saying which programs to build: model, input shape, classes, width, rules, batch."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smallconv")
    parser.add_argument("--shape", default="1,28,28", help="input C,H,W")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--width", type=float, default=1.0, help="the model's width multiplier")
    parser.add_argument("--rules", default="lls,bp")
    parser.add_argument("--batch", type=int, default=batch)
    return parser


def main() -> None:
    parser = program_arguments(__doc__, batch=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="PyTorch's threads beside the runtime's one")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    shape = tuple(int(v) for v in args.shape.split(","))
    default_threads = torch.get_num_threads()
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, *shape), torch.randint(args.classes, (args.batch,))
    print(
        f"{args.model} (width {args.width}), input {'x'.join(map(str, shape))}, {args.classes} classes, "
        f"batch {args.batch}; {args.steps} interleaved steps after {args.warmup}; torch {torch.__version__}"
    )
    print(
        f"rule  executorch (1 thread)  pytorch ({args.threads} thread(s))  pytorch ({default_threads})"
        "  ratio (1 thread)"
    )
    for rule in args.rules.split(","):
        make = dict(model_options={"width": args.width}, optimizer="sgd", lr=LR, channels_last=False)
        trainer = build_trainer(args.model, create_rule(rule), shape, args.classes, **make)
        trainer.train_step(x, y)  # builds the optimizers; the program starts from this state
        runner = ProgramRunner(build_program(trainer, args.batch, lr=LR).buffer)
        times: dict[str, list[float]] = {"runtime": [], "torch": [], "torch-default": []}
        for i in range(args.warmup + args.steps):
            torch.set_num_threads(args.threads)
            t_runtime = timed(lambda r=runner: r.step(x, y))
            t_torch = timed(lambda t=trainer: t.train_step(x, y))
            torch.set_num_threads(default_threads)
            t_default = timed(lambda t=trainer: t.train_step(x, y))
            if i >= args.warmup:
                times["runtime"].append(t_runtime)
                times["torch"].append(t_torch)
                times["torch-default"].append(t_default)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(
            f"{rule:4s}  {med['runtime']:10.1f} ms  {med['torch']:18.1f} ms  {med['torch-default']:10.1f} ms"
            f"  {med['runtime'] / med['torch']:8.1f}x"
        )


if __name__ == "__main__":
    main()
