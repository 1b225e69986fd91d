"""``lls train`` and ``lls eval``.

``lls train``'s options that define a run are generated from :class:`~lls.training.config.TrainConfig` and
from the options of every registered rule: a new field there is a new flag here, with its help.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .. import __version__
from ..errors import LLSError
from ..method.net import ModelOptions
from ..method.rules import rule_options
from ..options import add_arguments, given, options_of
from ..training.config import CONFIG_OPTIONS, TrainConfig, config_from_options
from ..training.distributed import STRATEGIES
from ..training.run import RunOptions, create_strategy, open_trained, tensorboard_writer, train_run
from ..training.rundir import RunDir
from ..training.trained import batches, dataset_inputs, evaluation_refresh
from .common import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    add_block_accuracy,
    add_data_options,
    add_device,
    counted,
    resolve_device,
)

RUNS_ROOT = Path("runs")


def rule_fields():
    """The rules' options a user types (a rule's seed is the run's --seed, not a flag of its own)."""
    return [field for field, _, _ in rule_options().values() if field.metadata.get("cli", True)]


def add(commands) -> None:
    train = commands.add_parser(
        "train",
        help="train a model with a learning rule (writes a run directory)",
        description="Train a model with a learning rule; the run is a directory (see README).",
    )
    run_options = train.add_argument_group("what the run is (recorded in config.json)")
    add_arguments(run_options, CONFIG_OPTIONS, lambda field: TrainConfig)
    owners = {name: (cls, rules) for name, (_, cls, rules) in rule_options().items()}
    rules = train.add_argument_group("the rule's options (each applies to the rules named)")
    add_arguments(
        rules,
        rule_fields(),
        lambda field: owners[field.name][0],
        note=lambda field: f" [{', '.join(owners[field.name][1])}]",
    )
    model = train.add_argument_group(
        "the model's options (where the authors' code and the paper's text differ; docs/method.md)"
    )
    add_arguments(model, options_of(ModelOptions), lambda field: ModelOptions)
    add_how_it_runs(train.add_argument_group("how it runs (not part of the run's definition)"))
    train.set_defaults(func=cmd_train)
    add_eval(commands)


def add_how_it_runs(how) -> None:
    add_device(how)
    add_data_options(how)
    how.add_argument("--out", help="run directory (default runs/DATASET-MODEL-RULE-sSEED-TIME)")
    how.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint"
    )
    how.add_argument("--tensorboard", action="store_true", help="also log to RUN_DIR/tensorboard")
    how.add_argument(
        "--parallel",
        choices=STRATEGIES.names(),
        help="under torchrun: ddp splits every batch over the processes; pipeline splits the blocks",
    )
    how.add_argument(
        "--stages", help="--parallel pipeline: blocks of each stage, e.g. 0-2,3-5,6-7 (default: balanced)"
    )
    how.add_argument(
        "--sync-bn", action="store_true", help="--parallel ddp on CUDA: synchronise BatchNorm statistics"
    )
    how.add_argument(
        "--dist-timeout",
        type=counted("--dist-timeout"),
        default=300,
        help="seconds before a silent peer is an error (default 300)",
    )
    add_block_accuracy(how)
    how.add_argument("--json", action="store_true", help="print a JSON summary as the last line of stdout")
    how.add_argument("--quiet", action="store_true", help="no progress bar")


def add_eval(commands) -> None:
    evaluation = commands.add_parser(
        "eval", help="evaluate a run's saved model", description="Evaluate a run's saved model."
    )
    evaluation.add_argument("run", help="run directory")
    evaluation.add_argument("--dataset", help="evaluate on another dataset of the same shape and classes")
    evaluation.add_argument("--split", choices=("test", "train"), default="test", help="split (default test)")
    add_device(evaluation)
    add_data_options(evaluation)
    evaluation.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    evaluation.set_defaults(func=cmd_eval)


def run_config(args: argparse.Namespace) -> tuple[TrainConfig, Path]:
    """The run's config and directory: a new one from the options, or the saved one of --resume
    with the changes a resume allows."""
    options, rule = given(args, CONFIG_OPTIONS), given(args, rule_fields())
    model = given(args, options_of(ModelOptions))
    if args.resume is None:
        config = config_from_options(options, rule, model)
        return config, Path(args.out) if args.out else RUNS_ROOT / config.default_name()
    if args.out:
        raise LLSError("--resume already names the run directory; drop --out")
    run = RunDir.open(args.resume)
    return run.read_config().resumed(options, rule, str(run.path), model), run.path


def cmd_train(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    config, out = run_config(args)
    if args.stages and args.parallel != "pipeline":
        raise LLSError("--stages goes with --parallel pipeline")
    if args.sync_bn and args.parallel != "ddp":
        raise LLSError("--sync-bn goes with --parallel ddp")
    if args.tensorboard:
        tensorboard_writer(None)  # fails now, before any run starts, if the package is missing
    strategy = create_strategy(
        args.parallel, device, timeout=args.dist_timeout, stages=args.stages, sync_bn=args.sync_bn
    )
    options = RunOptions(
        device,
        data_dir=args.data_dir,
        download=not args.no_download,
        progress=not args.quiet,
        tensorboard=args.tensorboard,
        block_accuracy=args.block_accuracy,
        quiet_data=args.json,
    )
    outcome = train_run(config, out, options, resume=args.resume is not None, strategy=strategy)
    if outcome.run is None:  # a rank other than 0 of a parallel run: rank 0 reports
        return {"finished": 0, "interrupted": EXIT_INTERRUPTED}.get(outcome.status, EXIT_DIVERGED)
    if outcome.status == "interrupted":
        print(
            f"lls: interrupted; checkpoint saved, continue with `lls train --resume {outcome.run.path}`",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if outcome.status == "diverged":
        print(f"lls: error: {outcome.error}", file=sys.stderr)
        return EXIT_DIVERGED
    history = outcome.history
    epochs = len(history.records)
    best = max(history.records, key=lambda r: r.test_accuracy)
    print(
        f"test accuracy {100 * history.final_test_accuracy:.2f}% after {epochs} epoch(s) "
        f"(best {100 * best.test_accuracy:.2f}% at epoch {best.epoch}); "
        f"training {history.train_seconds:.1f}s ({history.train_seconds / epochs:.1f}s/epoch); "
        f"{outcome.wall:.1f}s in this session; run saved in {outcome.run.path}"
    )
    if args.json:
        print(json.dumps(json_summary(config, outcome)))
    return 0


def json_summary(config, outcome) -> dict:
    """``lls train --json``'s last line: the run's outcome, its configuration and every epoch."""
    history, trainer = outcome.history, outcome.session.trainer
    summary = {
        "test_accuracy": history.final_test_accuracy,
        "best_test_accuracy": history.best_test_accuracy,
        "epochs": len(history.records),
        "train_seconds": history.train_seconds,
        "wall_seconds": outcome.wall,
        "rule": config.rule,
        "rule_config": config.rule_config(),
        "model": config.model,
        "dataset": config.dataset,
        "config": config.as_dict(),
        "run_dir": str(outcome.run.path),
        "device": str(next(trainer.net.parameters()).device),
        "extra_parameters": sum(trainer.extra_parameters()),
        "history": [r.as_dict() for r in history.records],
        "lls_version": __version__,
        "torch_version": torch.__version__,
    }
    if history.records[-1].stage_busy:
        summary["stage_busy_fractions"] = history.records[-1].stage_busy
    return summary


def cmd_eval(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    run, state, session = open_trained(
        args.run, device=device, data_dir=args.data_dir, download=not args.no_download
    )
    inputs = dataset_inputs(
        session, args.dataset, args.split, data_dir=args.data_dir, download=not args.no_download
    )
    # the run's last evaluation: its BatchNorm statistics, or the same refresh mid-epoch
    refresh = evaluation_refresh(session, state)
    result = session.trainer.evaluate(batches(session, inputs, device), refresh=refresh)
    epoch, name = state["epoch"], args.dataset or session.config.dataset
    print(
        f"{run.path} (epoch {epoch}) on {name} {args.split}: accuracy {100 * result.accuracy:.2f}%, "
        f"loss {result.loss:.4f}"
    )
    if args.json:
        record = {"run_dir": str(run.path), "dataset": name, "split": args.split, "epoch": epoch}
        print(json.dumps({**record, "accuracy": result.accuracy, "loss": result.loss}))
    return 0
