"""What the command families share: exit codes, the one-line parser, devices, shapes, data options."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch

from ..data import dataset_shape, load_dataset
from ..errors import LLSError
from ..options import add_arguments, check_values, flag, options_of
from ..training.config import DEFAULTS, TrainConfig

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130  # lls.__main__ says it too, without importing this module
# Bounds of the whole-number options typed on the command line: far above any real use, low enough
# that no value allocates or loops beyond what a machine holds before it is checked.
MAX_COUNT = 10**9
MAX_CLASSES = 10**7  # a class count's upper bound; whether the step fits is checked against memory
MIN_TRAINING_BATCH = 2  # BatchNorm's batch statistics need two images in training mode


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one ``lls: error:`` line (exit status 2) like every other."""

    def error(self, message: str):
        where = "" if self.prog == "lls" else f"{self.prog.removeprefix('lls ')}: "  # "lls: error:" says lls
        raise LLSError(f"{where}{message}; see `{self.prog} --help`")


def resolve_device(name: str | None) -> torch.device:
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LLSError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LLSError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise LLSError(f"--device {name}: lls runs on cpu or cuda")
    return device


def counted(what: str, minimum: int = 1, maximum: int = MAX_COUNT, why: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number from ``minimum`` to ``maximum``; ``why`` explains the minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{what} must be at least {minimum}{why}, got {value}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"{what} must be at most {maximum}, got {value}")
        return value

    return parse


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container or taskset narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads(text: str) -> int:
    """``--threads``: at most the usable cores (more only oversubscribes; far more crashes OpenMP)."""
    value, cores = counted("--threads")(text), usable_cores()
    if value > cores:
        raise argparse.ArgumentTypeError(
            f"{value} is more than the {cores} cores this process may use; give {cores} or fewer"
        )
    return value


def number_list(text: str) -> list[int]:
    """``0,1,2`` -> [0, 1, 2] (seeds)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"takes comma-separated whole numbers like 0,1,2, got {text!r}"
        ) from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"takes numbers >= 0, got {text!r}")
    return values


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: cuda when there is one)")


def add_block_accuracy(parser) -> None:
    """``--block-accuracy / --no-block-accuracy``: each block's own test accuracy, logged every epoch
    (a readout that never changes training)."""
    parser.add_argument(
        "--block-accuracy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="log each block's own test accuracy every epoch (default on; never changes training)",
    )


def add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None, help="folder holding the dataset's files")
    parser.add_argument(
        "--no-download", action="store_true", help="fail instead of downloading missing files"
    )


def input_shape(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input takes C,H,W (e.g. 3,32,32), got {text!r}") from None
    if min(c, h, w) < 1:
        raise argparse.ArgumentTypeError(f"--input sizes must be positive, got {text!r}")
    return c, h, w


def add_problem(parser: argparse.ArgumentParser, min_batch: int = MIN_TRAINING_BATCH) -> None:
    """--model and the shape it is measured on: a dataset's, or --input with --classes. A command
    that takes batches under ``MIN_TRAINING_BATCH`` (``min_batch``) checks them itself."""
    parser.add_argument("--model", default="smallconv", help="model to measure (default smallconv)")
    parser.add_argument("--dataset", help="take the input shape and class count from this dataset")
    parser.add_argument("--input", type=input_shape, help="input shape C,H,W (with --classes), e.g. 3,32,32")
    parser.add_argument(
        "--classes", type=counted("--classes", 2, MAX_CLASSES), help="number of classes (with --input)"
    )
    batch = counted("--batch", min_batch, why=" (BatchNorm needs 2 images per batch in training)")
    default = DEFAULTS.batch_size
    parser.add_argument("--batch", type=batch, default=default, help=f"batch size (default {default})")


def problem_shape(args: argparse.Namespace) -> tuple[tuple[int, int, int], int]:
    """(input shape, classes) from --dataset, or from --input and --classes."""
    if args.dataset:
        if args.input or args.classes:
            raise LLSError("give either --dataset or --input C,H,W with --classes K, not both")
        known = dataset_shape(args.dataset)
        if known is None:
            data = load_dataset(args.dataset, download=False, quiet=True)
            return data.input_shape, data.num_classes
        return known
    if not (args.input and args.classes):
        raise LLSError("give --dataset NAME, or --input C,H,W and --classes K")
    return args.input, args.classes


def add_config_options(parser: argparse.ArgumentParser, *names: str) -> None:
    """``lls train``'s flags ``names`` (TrainConfig's declarations: help, choices, checks), for a
    command that measures a step; :func:`config_value` reads them with the run's defaults."""
    add_arguments(parser, [f for f in options_of(TrainConfig) if f.name in names], lambda field: TrainConfig)


def config_value(args: argparse.Namespace, name: str):
    """A run option given on the command line, else its default (checked either way)."""
    value = getattr(args, name)
    value = getattr(DEFAULTS, name) if value is None else value
    check_values(TrainConfig, {name: value}, name=flag)
    return value
