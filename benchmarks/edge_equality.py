"""How far ExecuTorch's runtime steps from lls's own trainer, on the zoo's models at full width.

    python benchmarks/edge_equality.py --model vgg8 --shape 3,32,32 --rules lls,bp --steps 20 --batch 8

What `lls edge check` prints for a run, without needing the run's dataset: for each rule, a trainer
(SGD with lls's momentum 0.9, float32, BatchNorm running statistics drawn away from 0 / 1 as a
trained run's), its training program (a method per block and the head; BP's one method) in the
runtime, and the same ``--steps`` batches (N(0, 1) inputs, uniform labels) stepped by both, and by
the trainer's float64 twin. Printed per rule: the largest relative difference max|a - b| / max|b|
of any parameter or statistic between runtime and lls after the steps (and the tensor), the same
for lls in float64 against float32 (float32's own rounding over those steps), and the largest loss
difference. The last line is a JSON list of the rows.
"""

from __future__ import annotations

import json
import time
import warnings

import torch
from edge_step import program_arguments  # the benchmarks folder is the script path
from torch import nn

from lls.edge.programs import build_program
from lls.edge.runtime import ProgramRunner
from lls.edge.session import check_program
from lls.step.factory import build_trainer

LR = 0.01


def trainer_for(model: str, rule: str, shape: tuple[int, ...], classes: int, width: float):
    trainer = build_trainer(
        model,
        rule,
        shape,
        classes,
        model_options={"width": width} if width != 1 else None,
        optimizer="sgd",
        lr=LR,
        channels_last=False,
        engine="eager",
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # statistics away from their initial 0 / 1, as a trained run's
        for module in trainer.net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=g) * 2 - 1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) * 1.5 + 0.5)
    return trainer


def main() -> None:
    parser = program_arguments(__doc__, batch=8)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    shape = tuple(int(v) for v in args.shape.split(","))
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(args.batch, *shape, generator=g),
            torch.randint(args.classes, (args.batch,), generator=g),
        )
        for _ in range(args.steps)
    ]
    print(
        f"{args.model} (width {args.width}), input {'x'.join(map(str, shape))}, {args.classes} classes, "
        f"batch {args.batch}, {args.steps} SGD steps (lr {LR}, momentum 0.9); torch {torch.__version__}"
    )
    rows = []
    for rule in args.rules.split(","):
        trainer = trainer_for(args.model, rule, shape, args.classes, args.width)
        start = time.perf_counter()
        built = build_program(trainer, args.batch, lr=LR)
        exported = time.perf_counter() - start
        result = check_program(ProgramRunner(built.buffer), trainer, batches, args.steps).as_dict()
        result.pop("after")
        row = {"model": args.model, "rule": rule, "methods": len(built.layout.methods), **result}
        row["export_seconds"] = round(exported, 1)
        rows.append(row)
        print(
            f"{rule:<16} {row['methods']:>2} methods  runtime vs lls {row['largest']:.1e} "
            f"({row['where']})  lls float32 vs float64 {row['float64']:.1e}  losses {row['losses']:.1e}"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
