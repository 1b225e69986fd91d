"""``lls edge train`` and ``lls edge check``: a training program (``lls export --training``) in
ExecuTorch's runtime (see ``lls/edge``)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from .. import __version__
from ..errors import LLSError
from ..training.config import MAX_EPOCHS, MAX_IMAGES
from .common import add_block_accuracy, add_data_options, counted


def add(commands) -> None:
    edge = commands.add_parser(
        "edge",
        help="train a program exported with `lls export --training` in ExecuTorch's runtime",
        description="On-device learning: run a training program (one ExecuTorch method per block) in "
        "ExecuTorch's runtime, as an app on a device would (see docs/edge.md).",
    )
    sub = edge.add_subparsers(dest="edge_command", required=True, metavar="COMMAND", parser_class=type(edge))
    train = sub.add_parser(
        "train",
        help="train a program in ExecuTorch's runtime (block after block, the runtime's SGD)",
        description="Train a training program in ExecuTorch's runtime on a dataset's batches, block "
        "after block with the runtime's SGD; --out writes a run directory with the device-trained "
        "weights that `lls eval`, `predict` and `export` read.",
    )
    train.add_argument("program", help="training program (.pte) from `lls export --training`")
    add_common(train)
    length = train.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=counted("--epochs", maximum=MAX_EPOCHS), help="epochs (default 1)")
    length.add_argument("--steps", type=counted("--steps"), help="train this many batches instead")
    train.add_argument("--out", help="write a run directory with the trained weights here")
    add_block_accuracy(train)
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    check = sub.add_parser(
        "check",
        help="run the same steps in ExecuTorch's runtime and in lls; print the largest difference",
        description="Run the same training steps, from the program's state and on the same batches, "
        "in ExecuTorch's runtime and in lls's own trainer (SGD with the program's settings), and "
        "print the largest relative difference max|a - b| / max|b| of any parameter or BatchNorm "
        "statistic, beside the same figure for lls in float32 against float64 (float32's own "
        "rounding on those steps).",
    )
    check.add_argument("program", help="training program (.pte) from `lls export --training`")
    add_common(check)
    check.add_argument("--steps", type=counted("--steps"), default=20, help="steps to compare (default 20)")
    check.set_defaults(func=cmd_check)


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", help="dataset of the batches (default: the program's run's)")
    parser.add_argument(
        "--limit", type=counted("--limit", maximum=MAX_IMAGES), help="use only the first N images"
    )
    parser.add_argument("--lr", type=float, help="the runtime SGD's learning rate (default: the program's)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line of stdout")
    add_data_options(parser)


def open_program(args: argparse.Namespace, epochs: int = 1):
    """(runner, session): the program in the runtime, and lls's data, loaders and trainer at the
    program's state, for the program's run configuration with the options given."""
    from ..edge.runtime import ProgramRunner
    from ..edge.session import initial_state, load_state, program_config
    from ..training.run import build_session

    if args.lr is not None and not (0 < args.lr < math.inf):
        raise LLSError(f"--lr must be a positive finite number, got {args.lr}")
    path = Path(args.program)
    if not path.is_file():
        raise LLSError(f"{path} is not a file; give a training program from `lls export --training`")
    runner = ProgramRunner(path, lr=args.lr)
    config = program_config(
        runner, dataset=args.dataset, limit=args.limit, epochs=epochs, batch_size=runner.batch_size
    )
    session = build_session(
        config,
        device=torch.device("cpu"),
        data_dir=args.data_dir,
        download=not args.no_download,
        quiet=args.json,
    )
    data, layout = session.data, runner.layout
    if (list(data.input_shape), data.num_classes) != (layout.input_shape, layout.num_classes):
        raise LLSError(
            f"the program trains on {tuple(layout.input_shape)} images of {layout.num_classes} classes; "
            f"{config.dataset} has {tuple(data.input_shape)} and {data.num_classes}"
        )
    load_state(session.trainer, initial_state(runner))
    return runner, session


def cmd_train(args: argparse.Namespace) -> int:
    from ..edge.session import RuntimeStrategy, full_batches
    from ..training.fit import History, fit
    from ..training.run import describe_rule, epoch_line
    from ..training.rundir import RunDir, checkpoint_state, environment

    epochs = args.epochs or 1
    runner, session = open_program(args, epochs)
    per_epoch = sum(1 for _ in full_batches(session.loaders.train.epoch(0), runner.batch_size))
    if per_epoch == 0:
        raise LLSError(
            f"the training set has no full batch of {runner.batch_size} (the program's fixed batch); "
            "use more images or export with a smaller --batch-size"
        )
    if args.steps is not None:
        epochs = -(-args.steps // per_epoch)
        session = _with_epochs(session, epochs)
    config, trainer = session.config, session.trainer
    run = None
    if args.out:  # everything that can be refused has been: now the run directory
        run = RunDir.create(
            args.out, config, {**environment(), "device": "executorch", "program": args.program}
        )
    strategy = RuntimeStrategy(runner, args.steps)
    history = History()

    def on_epoch(record) -> None:
        if run is not None:
            run.save_checkpoint(checkpoint_state(config, trainer.state_dict(), history, record.epoch, None))
            run.write_metrics(
                history, f"{config.model} / {config.dataset} / {describe_rule(config)} (ExecuTorch)"
            )
        print(epoch_line(record, epochs), flush=True)

    o = runner.optimizer
    print(
        f"{args.program}: {config.model} with {describe_rule(config)} in ExecuTorch's runtime on "
        f"{config.dataset} ({per_epoch * runner.batch_size} train images in full batches of "
        f"{runner.batch_size} / {len(session.loaders.test.labels)} test), {len(runner.layout.methods)} "
        f"methods, SGD lr {o['lr']} momentum {o['momentum']}" + (f", run {run.path}" if run else ""),
        flush=True,
    )
    try:
        fit(
            trainer,
            session.loaders,
            epochs,
            strategy=strategy,
            history=history,
            progress=not args.quiet and not args.json,
            on_epoch=on_epoch,
            block_accuracy=args.block_accuracy,
        )
    finally:
        if run is not None:
            run.unlock()
    best = max(history.records, key=lambda r: r.test_accuracy)
    print(
        f"test accuracy {100 * history.final_test_accuracy:.2f}% after {len(history.records)} epoch(s) "
        f"and {strategy.done} steps in ExecuTorch (best {100 * best.test_accuracy:.2f}% at epoch "
        f"{best.epoch}); training {history.train_seconds:.1f}s"
        + (f"; run saved in {run.path}" if run else "")
    )
    if args.json:
        summary = {
            "test_accuracy": history.final_test_accuracy,
            "best_test_accuracy": history.best_test_accuracy,
            "epochs": len(history.records),
            "steps": strategy.done,
            "train_seconds": history.train_seconds,
            "rule": config.rule,
            "model": config.model,
            "dataset": config.dataset,
            "batch_size": runner.batch_size,
            "optimizer": runner.optimizer,
            "run_dir": str(run.path) if run else None,
            "program": args.program,
            "history": [r.as_dict() for r in history.records],
            "lls_version": __version__,
        }
        print(json.dumps(summary))
    return 0


def _with_epochs(session, epochs: int):
    import dataclasses

    return dataclasses.replace(session, config=dataclasses.replace(session.config, epochs=epochs))


def cmd_check(args: argparse.Namespace) -> int:
    from ..edge.session import check_program

    runner, session = open_program(args, 1)
    loader = session.loaders.train
    epochs = math.ceil(args.steps * runner.batch_size / max(1, len(loader.labels))) + 1
    batches = (batch for epoch in range(epochs) for batch in loader.epoch(epoch))
    result = check_program(runner, session.trainer, batches, args.steps)
    config = session.config
    shown = sorted({s for s in (1, 5, 10) if s < result.steps} | {result.steps})
    figures = "; ".join(
        f"{a['step']}: {a['largest']:.1e} ({a['float64']:.1e})" for a in result.after if a["step"] in shown
    )
    print(
        f"{args.program}: {result.steps} steps of {runner.batch_size} {config.dataset} images, "
        f"{config.model} with {config.rule}, SGD lr {runner.optimizer['lr']}\n"
        f"largest relative difference of any parameter or statistic, runtime vs lls (lls float32 vs "
        f"float64) after step {figures}\n"
        f"after the last step: {result.largest:.2e} in {result.where} ({result.float64:.2e} in "
        f"{result.float64_where}); losses within {result.losses:.1e}"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "program": args.program,
                    "model": config.model,
                    "rule": config.rule,
                    "rule_options": config.rule_options,
                    "dataset": config.dataset,
                    "batch_size": runner.batch_size,
                    "optimizer": runner.optimizer,
                    **result.as_dict(),
                }
            )
        )
    return 0


__all__ = ["add"]
