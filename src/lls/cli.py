"""The ``lls`` command line."""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from . import __version__
from .data import list_datasets, load_dataset
from .errors import LLSError
from .fit import EpochRecord, Loaders, fit
from .models import create_model, list_models
from .optim import OPTIMIZERS
from .rules import RULES, create_rule, list_rules
from .trainer import Trainer

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LLSError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise LLSError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None


def rule_options(args: argparse.Namespace) -> dict[str, Any]:
    """The rule options the user gave; the run's seed also seeds a rule's fixed random tensors."""
    options = {k: v for k, v in (("basis", args.basis), ("temperature", args.temperature)) if v is not None}
    if args.reduced is not None:
        options["reduced"] = args.reduced
    fields = {f for f in RULES.get(args.rule).__dataclass_fields__}
    if "seed" in fields:
        options["seed"] = args.seed
    return options


def cmd_train(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    rule = create_rule(args.rule, **rule_options(args))
    data = load_dataset(args.dataset, args.data_dir, download=not args.no_download, quiet=args.json)
    torch.manual_seed(args.seed)
    net = create_model(
        args.model,
        in_channels=data.input_shape[0],
        input_size=data.input_shape[1:],
        num_classes=data.num_classes,
        activation=rule.activation,
    ).to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    trainer = Trainer(
        net,
        rule,
        input_shape=data.input_shape,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
    )
    loaders = Loaders.for_dataset(
        data,
        args.batch_size,
        seed=args.seed,
        device=device,
        limit=args.limit,
        channels_last=args.channels_last,
    )
    describe = ", ".join(f"{k}={v}" for k, v in rule.config().items() if k != "name")
    print(
        f"{args.model} on {args.dataset} ({len(loaders.train.labels)} train / "
        f"{len(loaders.test.labels)} test, from {data.source}) with {rule.name}({describe}), "
        f"{args.optimizer} lr {args.lr}, "
        f"batch {args.batch_size}, seed {args.seed}, {device}"
    )

    def report(record: EpochRecord) -> None:
        blocks = " ".join(f"{b:.3f}" for b in record.block_losses if not math.isnan(b))
        print(
            f"epoch {record.epoch}/{args.epochs}: train loss {record.train_loss:.4f} "
            f"acc {100 * record.train_accuracy:.2f}% | test loss {record.test_loss:.4f} "
            f"acc {100 * record.test_accuracy:.2f}% | {record.train_seconds:.1f}s train, "
            f"{record.eval_seconds:.1f}s eval" + (f" | block losses {blocks}" if blocks else ""),
            flush=True,
        )

    start = time.perf_counter()
    history = fit(trainer, loaders, args.epochs, progress=not args.quiet, on_epoch=report)
    wall = time.perf_counter() - start
    best = max(history.records, key=lambda r: r.test_accuracy)
    print(
        f"test accuracy {100 * history.final_test_accuracy:.2f}% after {args.epochs} epoch(s) "
        f"(best {100 * best.test_accuracy:.2f}% at epoch {best.epoch}); "
        f"training {history.train_seconds:.1f}s ({history.train_seconds / args.epochs:.1f}s/epoch), "
        f"{wall:.1f}s in all"
    )
    if args.json:
        summary = {
            "test_accuracy": history.final_test_accuracy,
            "best_test_accuracy": history.best_test_accuracy,
            "epochs": args.epochs,
            "train_seconds": history.train_seconds,
            "wall_seconds": wall,
            "rule": rule.name,
            "rule_config": rule.config(),
            "model": args.model,
            "dataset": args.dataset,
            "batch_size": args.batch_size,
            "optimizer": args.optimizer,
            "lr": args.lr,
            "seed": args.seed,
            "device": str(device),
            "extra_parameters": sum(trainer.extra_parameters()),
            "history": [r.as_dict() for r in history.records],
            "lls_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
        }
        print(json.dumps(summary))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    print("rules:     " + ", ".join(list_rules()))
    print("models:    " + ", ".join(list_models()))
    print("datasets:  " + ", ".join(list_datasets()))
    print("optimizers: " + ", ".join(OPTIMIZERS.names()))
    return 0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lls", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lls {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model with a learning rule")
    train.add_argument("--dataset", default="fashion-mnist", help="dataset name (see `lls list`)")
    train.add_argument("--model", default="smallconv", help="model name (see `lls list`)")
    train.add_argument("--rule", default="lls", help="learning rule (see `lls list`)")
    train.add_argument("--basis", default=None, help="LLS basis: square (default), periodic or random")
    train.add_argument("--temperature", type=positive_float, default=None, help="LLS temperature (0.5)")
    train.add_argument("--reduced", type=positive_int, default=None, help="lls-mxm: basis rows R < K")
    train.add_argument("--epochs", type=positive_int, default=1)
    train.add_argument("--batch-size", type=positive_int, default=128)
    train.add_argument("--lr", type=positive_float, default=5e-3)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--optimizer", default="adamw-sf", choices=OPTIMIZERS.names())
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--limit", type=positive_int, default=None, help="use only the first N train and test images"
    )
    train.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    train.add_argument("--data-dir", default=None, help="folder with the dataset files")
    train.add_argument("--no-download", action="store_true", help="fail instead of downloading missing files")
    train.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="channels-last memory layout (default on: faster convolutions and pooling on CPU)",
    )
    train.add_argument("--json", action="store_true", help="print a JSON summary as the last line of stdout")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    listing = commands.add_parser("list", help="list rules, models, datasets and optimizers")
    listing.set_defaults(func=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LLSError as error:
        print(f"lls: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("lls: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
