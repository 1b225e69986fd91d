"""The ``lls`` command line: train, eval, data, list."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from . import __version__
from .data import DATASET_SHAPES, DATASETS, check_dataset, fetch_dataset, list_datasets, load_dataset
from .errors import LLSError
from .fit import REFRESH_BATCHES
from .malloc import tune_malloc
from .models import list_models
from .optim import OPTIMIZERS
from .rules import FEEDBACK_KINDS, create_rule, list_rules, seeded_options
from .run import RunDir, TrainConfig, open_trained, train_run

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
RUNS_ROOT = Path("runs")

# options of `lls train` that make up a TrainConfig; all default to None so that explicit ones stand out
CONFIG_OPTIONS = (
    "holdout",
    "dataset",
    "model",
    "rule",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "optimizer",
    "seed",
    "limit",
    "augment",
    "image_size",
    "channels_last",
)
RULE_OPTIONS = ("basis", "temperature", "reduced", "feedback")


def resolve_device(name: str | None) -> torch.device:
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LLSError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise LLSError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {k: getattr(args, k) for k in CONFIG_OPTIONS if getattr(args, k) is not None}
    config = TrainConfig(**values)
    options = {k: getattr(args, k) for k in RULE_OPTIONS if getattr(args, k) is not None}
    return dataclasses.replace(config, rule_options=seeded_options(config.rule, options, config.seed))


def resumed_config(args: argparse.Namespace, saved: TrainConfig, run: RunDir) -> TrainConfig:
    """The saved config with the overrides a resume allows (more epochs); anything else is refused."""
    conflicts = []
    for name in CONFIG_OPTIONS + RULE_OPTIONS:
        value = getattr(args, name)
        if value is None:
            continue
        old = saved.rule_options.get(name) if name in RULE_OPTIONS else getattr(saved, name)
        if name not in TrainConfig.RESUMABLE and value != old:
            conflicts.append(f"--{name.replace('_', '-')} {value} (the run has {old})")
    if conflicts:
        raise LLSError(
            f"{run.path} was made with another configuration: {'; '.join(conflicts)}; "
            "resume without those options, or start a new run with --out"
        )
    return dataclasses.replace(saved, epochs=args.epochs if args.epochs is not None else saved.epochs)


def cmd_train(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    if args.resume:
        run = RunDir.open(args.resume)
        config, out = resumed_config(args, run.read_config(), run), run.path
    else:
        config = config_from_args(args)
        out = Path(args.out) if args.out else RUNS_ROOT / config.default_name()
    outcome = train_run(
        config,
        out,
        resume=bool(args.resume),
        device=device,
        data_dir=args.data_dir,
        download=not args.no_download,
        progress=not args.quiet,
        tensorboard=args.tensorboard,
        quiet_data=args.json,
        block_accuracy=args.block_accuracy,
        parallel=args.parallel,
        stages=args.stages,
        sync_bn=args.sync_bn,
        dist_timeout=args.dist_timeout,
    )
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
    history, session = outcome.history, outcome.session
    epochs = len(history.records)
    best = max(history.records, key=lambda r: r.test_accuracy)
    print(
        f"test accuracy {100 * history.final_test_accuracy:.2f}% after {epochs} epoch(s) "
        f"(best {100 * best.test_accuracy:.2f}% at epoch {best.epoch}); "
        f"training {history.train_seconds:.1f}s ({history.train_seconds / epochs:.1f}s/epoch); "
        f"{outcome.wall:.1f}s in this session; run saved in {outcome.run.path}"
    )
    if args.json:
        summary = {
            "test_accuracy": history.final_test_accuracy,
            "best_test_accuracy": history.best_test_accuracy,
            "epochs": epochs,
            "train_seconds": history.train_seconds,
            "wall_seconds": outcome.wall,
            "rule": session.rule.name,
            "rule_config": session.rule.config(),
            "model": config.model,
            "dataset": config.dataset,
            "config": config.as_dict(),
            "run_dir": str(outcome.run.path),
            "device": str(device),
            "extra_parameters": sum(session.trainer.extra_parameters()),
            "history": [r.as_dict() for r in history.records],
            "lls_version": __version__,
            "torch_version": torch.__version__,
        }
        if getattr(history, "busy_fractions", None) is not None:
            summary["stage_busy_fractions"] = history.busy_fractions
        print(json.dumps(summary))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    run, config, state, session = open_trained(
        args.run, device=device, data_dir=args.data_dir, download=not args.no_download
    )
    test = session.loaders.test
    name = config.dataset
    if args.dataset and args.dataset != config.dataset:
        other = load_dataset(
            args.dataset, args.data_dir, download=not args.no_download, quiet=True, augment="none"
        )
        if other.input_shape != session.data.input_shape or other.num_classes != session.data.num_classes:
            raise LLSError(
                f"the model takes {session.data.input_shape} images and {session.data.num_classes} classes; "
                f"{args.dataset} has {other.input_shape} and {other.num_classes}"
            )
        from .fit import Loaders

        layout = {"channels_last": config.channels_last, "device": device}
        other_loaders = Loaders.for_dataset(other, config.batch_size, limit=config.limit, **layout)
        test = other_loaders.train if args.split == "train" else other_loaders.test
        name = args.dataset
    elif args.split == "train":
        from .data import make_loader

        data = session.data
        test = make_loader(
            data.train.head(config.limit),
            250,
            mean=data.mean,
            std=data.std,
            device=device,
            memory_format=torch.channels_last if config.channels_last else torch.contiguous_format,
        )
    # At an epoch boundary the saved BatchNorm statistics are the ones refreshed for that epoch's
    # evaluation; mid-epoch (an interrupted run) they are refreshed again, as training would.
    refresh = []
    if state["progress"] is not None:
        from itertools import islice

        refresh = islice(
            session.loaders.train.epoch(state["progress"]["epoch"], stream="refresh"), REFRESH_BATCHES
        )
    result = session.trainer.evaluate(test.epoch(), refresh=refresh)
    loss, accuracy = result.loss, result.accuracy
    epoch = state["epoch"]
    print(
        f"{run.path} (epoch {epoch}) on {name} {args.split}: accuracy {100 * accuracy:.2f}%, loss {loss:.4f}"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "run_dir": str(run.path),
                    "dataset": name,
                    "split": args.split,
                    "epoch": epoch,
                    "accuracy": accuracy,
                    "loss": loss,
                }
            )
        )
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.action == "fetch":
        source = DATASETS.get(args.name)
        where = fetch_dataset(args.name, args.data_dir)
        print(f"{source.name} is ready in {where}")
        return 0
    for line in check_dataset(args.name, args.data_dir, sample=args.sample):
        print(line)
    print("ok")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    print("rules:      " + ", ".join(list_rules()))
    print("models:     " + ", ".join(list_models()))
    print("datasets:   " + ", ".join(list_datasets()))
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


def add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None, help="folder with the dataset files")
    parser.add_argument(
        "--no-download", action="store_true", help="fail instead of downloading missing files"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lls", description="Train networks with LLS and the rules it is compared to."
    )
    parser.add_argument("--version", action="version", version=f"lls {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model with a learning rule (a run directory)")
    d = TrainConfig()
    train.add_argument("--dataset", help=f"dataset name (default {d.dataset}; see `lls list`)")
    train.add_argument("--model", help=f"model name (default {d.model})")
    train.add_argument("--rule", help=f"learning rule (default {d.rule})")
    train.add_argument("--basis", help="LLS basis: square (default), periodic or random")
    train.add_argument("--temperature", type=positive_float, help="LLS temperature (default 0.5)")
    train.add_argument("--reduced", type=positive_int, help="lls-mxm: use R < K basis rows")
    train.add_argument(
        "--feedback",
        choices=FEEDBACK_KINDS,
        help="dfa / drtp feedback matrices: uniform U[0, 1e-4) (default, as specified) "
        "or centred U[-1e-4, 1e-4)",
    )
    train.add_argument("--epochs", type=positive_int, help=f"default {d.epochs}")
    train.add_argument("--batch-size", type=positive_int, help=f"default {d.batch_size}")
    train.add_argument("--lr", type=positive_float, help=f"default {d.lr}")
    train.add_argument("--weight-decay", type=float, help=f"default {d.weight_decay}")
    train.add_argument("--optimizer", choices=OPTIMIZERS.names(), help=f"default {d.optimizer}")
    train.add_argument("--seed", type=int, help=f"default {d.seed}")
    train.add_argument("--limit", type=positive_int, help="use only the first N train and test images")
    train.add_argument(
        "--augment", help="augmentation preset of the dataset (e.g. cifar10: basic, aug, none)"
    )
    train.add_argument("--image-size", type=positive_int, help="imagefolder: side of the square crops (64)")
    train.add_argument(
        "--holdout",
        type=positive_int,
        help="hold out N training images and evaluate on them instead of the test set (for tuning)",
    )
    train.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels-last memory layout (default on: faster convolutions and pooling on CPU)",
    )
    train.add_argument("--device", help="cpu, cuda, cuda:N or auto (default)")
    add_data_options(train)
    train.add_argument("--out", help="run directory (default runs/DATASET-MODEL-RULE-sSEED-TIME)")
    train.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint"
    )
    train.add_argument("--tensorboard", action="store_true", help="also log to RUN_DIR/tensorboard")
    train.add_argument(
        "--parallel",
        choices=("ddp", "pipeline"),
        help="under torchrun: data-parallel over the processes, or blocks pipelined across them",
    )
    train.add_argument(
        "--stages", help="pipeline: blocks of each stage, e.g. 0-2,3-5,6-7 (default: balanced)"
    )
    train.add_argument("--sync-bn", action="store_true", help="ddp on CUDA: synchronise BatchNorm statistics")
    train.add_argument(
        "--dist-timeout", type=positive_float, default=300.0, help="seconds before a silent peer is an error"
    )
    train.add_argument(
        "--block-accuracy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="log each block's own test accuracy every epoch (default on; never changes training)",
    )
    train.add_argument("--json", action="store_true", help="print a JSON summary as the last line of stdout")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a run's saved model")
    evaluate.add_argument("run", help="run directory")
    evaluate.add_argument("--dataset", help="evaluate on another dataset of the same shape and classes")
    evaluate.add_argument("--split", choices=("test", "train"), default="test")
    evaluate.add_argument("--device", help="cpu, cuda, cuda:N or auto (default)")
    add_data_options(evaluate)
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_eval)

    data = commands.add_parser("data", help="fetch or check datasets")
    data_actions = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    fetch = data_actions.add_parser("fetch", help="download (resumable), verify and unpack a dataset")
    fetch.add_argument("name")
    fetch.add_argument(
        "--data-dir", default=None, help="where to put it (default $LLS_DATA_DIR or ~/.cache/lls)"
    )
    check = data_actions.add_parser("check", help="verify a dataset's files, counts and shapes")
    check.add_argument("name")
    check.add_argument("--data-dir", default=None)
    check.add_argument("--sample", type=positive_int, help="decode only about N images of each split")
    data.set_defaults(func=cmd_data)

    add_cost_commands(commands)
    add_reproduce_commands(commands)
    add_diagnose_commands(commands)

    listing = commands.add_parser("list", help="list rules, models, datasets and optimizers")
    listing.set_defaults(func=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_malloc()  # the largest single speed-up on CPU; see malloc.py
    code = _run(args)
    if getattr(args, "parallel", None) and "WORLD_SIZE" in os.environ:
        # One of torchrun's processes: everything it wrote is on disk (atomically) and its process
        # group is gone, yet gloo's threads can still abort the interpreter's teardown now and then
        # (SIGABRT, "terminate called without an active exception"), turning a clean exit status
        # into -6. Leave without the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except LLSError as error:
        print(f"lls: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("lls: aborted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `lls ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


# --- lls cost / lls bench -------------------------------------------------------------------------


def parse_input(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input takes C,H,W (e.g. 3,32,32), got {text!r}") from None
    if min(c, h, w) < 1:
        raise argparse.ArgumentTypeError(f"--input sizes must be positive, got {text!r}")
    return c, h, w


def problem_shape(args: argparse.Namespace) -> tuple[tuple[int, int, int], int]:
    """(input shape, classes) from --dataset, or from --input and --classes."""
    if args.dataset:
        if args.input or args.classes:
            raise LLSError("give either --dataset or --input C,H,W with --classes K, not both")
        source = DATASETS.get(args.dataset)
        shapes = DATASET_SHAPES.get(source.name)
        if shapes is None:
            data = load_dataset(args.dataset, download=False, quiet=True)
            return data.input_shape, data.num_classes
        return shapes
    if not (args.input and args.classes):
        raise LLSError("give --dataset NAME, or --input C,H,W and --classes K")
    return args.input, args.classes


COMPARE_RULES = ("bp", "lls", "lls:basis=periodic", "lls-m", "lls-mxm", "local-classifier", "dfa", "drtp")


def problem_record(args: argparse.Namespace, shape, classes: int) -> dict:
    """What `lls cost` and `lls bench` measured on, as their JSON output starts."""
    return {"model": args.model, "input": list(shape), "classes": classes, "batch": args.batch}


def cost_of(args: argparse.Namespace, spec: str, shape, classes) -> dict:
    from .bench import parse_rule_spec
    from .cost import count_costs, measure_memory

    name, options = parse_rule_spec(spec)
    report = count_costs(args.model, create_rule(name, **options), shape, classes)
    result = report.as_dict()
    if not args.no_memory:
        result["memory"] = measure_memory(
            args.model,
            name,
            shape,
            classes,
            batch=args.batch,
            device=str(resolve_device(args.device)),
            rule_options=options,
        )
    return result


def cmd_cost(args: argparse.Namespace) -> int:
    from .report_format import mib, ratio, si, table

    shape, classes = problem_shape(args)
    where = f"{args.model}, input {'x'.join(map(str, shape))}, {classes} classes"
    if args.compare:
        specs = args.rules.split(",") if args.rules else list(COMPARE_RULES)
        results = {spec: cost_of(args, spec, shape, classes) for spec in specs}
        bp = results.get("bp")
        rows = []
        for spec, r in results.items():
            t, m = r["totals"], r.get("memory", {})
            signal_ratio = None
            if bp is not None and t["signal_mults"]:
                signal_ratio = bp["totals"]["signal_mults"] / t["signal_mults"]
            step_ratio = t["step_macs"] / bp["totals"]["step_macs"] if bp else None
            peak, bp_peak = m.get("step_peak_bytes"), (bp or {}).get("memory", {}).get("step_peak_bytes")
            act, bp_act = (
                m.get("activation_peak_bytes"),
                (bp or {}).get("memory", {}).get("activation_peak_bytes"),
            )
            rows.append(
                [
                    spec,
                    si(t["step_macs"]),
                    ratio(step_ratio),
                    si(t["signal_mults"]),
                    si(t["signal_adds"]),
                    "-"
                    if spec == "bp"
                    else (f"{signal_ratio:.0f}x fewer" if signal_ratio else "no multiplies"),
                    si(t["extra_params"]),
                    mib(act),
                    ratio(act / bp_act if act and bp_act else None),
                    mib(peak),
                    ratio(peak / bp_peak if peak and bp_peak else None),
                ]
            )
        print(f"{where}; multiply-adds per training sample; memory of one step with batch {args.batch}")
        print(
            table(
                [
                    "rule",
                    "step MACs",
                    "vs bp",
                    "signal mults",
                    "signal adds",
                    "signal vs bp",
                    "extra params",
                    "activations",
                    "vs bp",
                    "step peak",
                    "vs bp",
                ],
                rows,
            )
        )
        if args.json:
            print(json.dumps({**problem_record(args, shape, classes), "rules": results}))
        return 0
    result = cost_of(args, args.rule, shape, classes)
    rows = []
    for b in result["blocks"]:
        name = "head" if b["index"] < 0 else f"block {b['index']}"
        rows.append(
            [
                name,
                "x".join(map(str, b["output"])),
                si(b["forward"]),
                si(b["weight_grad"]),
                si(b["input_grad"]),
                si(b["signal_mults"]),
                si(b["signal_adds"]),
                si(b["params"]),
                si(b["extra_params"]),
            ]
        )
    t = result["totals"]
    rows.append(
        [
            "total",
            "",
            si(t["forward"]),
            si(t["weight_grad"]),
            si(t["input_grad"]),
            si(t["signal_mults"]),
            si(t["signal_adds"]),
            si(t["params"]),
            si(t["extra_params"]),
        ]
    )
    config = ", ".join(f"{k}={v}" for k, v in result["rule_config"].items() if k != "name")
    print(f"{where}, rule {result['rule']}({config}); multiply-adds per training sample")
    print(
        table(
            [
                "",
                "output",
                "forward",
                "weight grad",
                "input grad",
                "signal mults",
                "signal adds",
                "params",
                "extra",
            ],
            rows,
        )
    )
    print(f"step multiply-adds (forward + backward + learning signal): {si(t['step_macs'])}")
    m = result.get("memory")
    if m:
        print(
            f"memory, batch {m['batch']}: parameters {mib(m['param_bytes'])}, optimizer state "
            f"{mib(m['optimizer_bytes'])}, activations held for backward at the peak "
            f"{mib(m['activation_peak_bytes'])}, step peak {mib(m.get('step_peak_bytes'))} "
            f"({m.get('step_peak_method', 'not measured')})"
        )
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench, summarize
    from .report_format import mib, ratio, table

    shape, classes = problem_shape(args)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_bench(
        args.model,
        shape,
        classes,
        args.rules.split(","),
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        device=str(device),
        channels_last=args.channels_last,
        compile_blocks=args.compile,
        measure_peak=not args.no_memory,
    )
    summary = summarize(results)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu, {torch.get_num_threads()} threads"
    )
    print(
        f"{args.model}, input {'x'.join(map(str, shape))}, {classes} classes, batch {args.batch}, "
        f"{args.steps} interleaved steps per rule after {args.warmup} warm-up, {name}, "
        f"torch {torch.__version__}"
    )
    rows = []
    for label, r in summary.items():
        rows.append(
            [
                label,
                f"{1000 * r['step_seconds_median']:.1f} ms",
                f"{1000 * r['step_seconds_p25']:.1f}-{1000 * r['step_seconds_p75']:.1f}",
                f"{r['images_per_second']:.0f}",
                f"{r['gflops']:.1f}",
                mib(r["peak_memory_bytes"]),
                ratio(r.get("time_ratio_to_bp")),
                ratio(r.get("memory_ratio_to_bp")),
            ]
        )
    print(
        table(
            [
                "rule",
                "step (median)",
                "IQR (ms)",
                "images/s",
                "GFLOP/s",
                "step peak",
                "time vs bp",
                "memory vs bp",
            ],
            rows,
        )
    )
    if args.json:
        print(
            json.dumps(
                {
                    **problem_record(args, shape, classes),
                    "device": str(device),
                    "device_name": name,
                    "torch_version": torch.__version__,
                    "rules": summary,
                }
            )
        )
    return 0


def add_cost_commands(commands) -> None:
    def shape_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="smallconv")
        p.add_argument("--dataset", help="take the input shape and class count from a dataset")
        p.add_argument("--input", type=parse_input, help="C,H,W")
        p.add_argument("--classes", type=positive_int)
        p.add_argument("--batch", type=positive_int, default=128)
        p.add_argument("--device", help="cpu (default on machines without CUDA), cuda")
        p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
        p.add_argument("--json", action="store_true", help="print a JSON object as the last line of stdout")

    cost = commands.add_parser("cost", help="multiply-adds, parameters and memory of a training step")
    shape_options(cost)
    cost.add_argument("--rule", default="lls", help="rule, optionally with options: lls:basis=periodic")
    cost.add_argument("--compare", action="store_true", help="all rules side by side, with ratios to bp")
    cost.add_argument("--rules", help=f"rules for --compare (default {','.join(COMPARE_RULES)})")
    cost.set_defaults(func=cmd_cost)

    bench = commands.add_parser("bench", help="time training steps of several rules, interleaved")
    shape_options(bench)
    bench.add_argument("--rules", default="lls,bp", help="comma-separated rules (name[:key=value])")
    bench.add_argument("--steps", type=positive_int, default=20)
    bench.add_argument("--warmup", type=positive_int, default=3)
    bench.add_argument("--threads", type=positive_int, help="torch threads (default: all cores)")
    bench.add_argument("--compile", action="store_true", help="torch.compile every block first")
    bench.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    bench.set_defaults(func=cmd_bench)


# --- lls reproduce / lls report -------------------------------------------------------------------


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .presets import PRESETS, select, with_epochs
    from .run import RunDir

    if args.list:
        chosen = select(args.table, args.dataset, args.model, args.rule) if args.table else list(PRESETS)
        for p in chosen:
            augment = f", augment {p.augment}" if p.augment else ""
            print(f"{p.name:58s} {p.rule} {p.rule_options or ''} {p.epochs} epochs{augment}")
        return 0
    if not args.table:
        raise LLSError("name a table (table1, table2, table3, compare) or use --list")
    presets = [with_epochs(p, args.epochs) for p in select(args.table, args.dataset, args.model, args.rule)]
    seeds = [int(s) for s in args.seeds.split(",")]
    device = resolve_device(args.device)
    root = Path(args.out)
    dirs = []
    for preset in presets:
        for seed in seeds:
            out = root / preset.table / f"{preset.dataset}-{preset.model}-{preset.slug}-s{seed}"
            dirs.append(out)
            config = preset.config(seed)
            done = 0
            if (out / "config.json").exists():
                state = RunDir.open(out).load_checkpoint()
                done = state["epoch"] if state is not None and state["progress"] is None else -1
            if done >= config.epochs:
                print(f"done:    {preset.name} seed {seed} ({done} epochs in {out})")
                continue
            if args.dry_run:
                print(f"to run:  {preset.name} seed {seed} -> {out}")
                continue
            print(f"running: {preset.name} seed {seed} -> {out}", flush=True)
            outcome = train_run(
                config,
                out,
                resume=(out / "config.json").exists(),
                device=device,
                data_dir=args.data_dir,
                download=not args.no_download,
                progress=not args.quiet,
            )
            if outcome.status == "interrupted":
                print(f"lls: interrupted; run the same command again to continue from {out}", file=sys.stderr)
                return EXIT_INTERRUPTED
            if outcome.status == "diverged":
                print(f"lls: warning: {outcome.error}", file=sys.stderr)
    if args.report and not args.dry_run:
        return write_report(dirs, Path(args.out) / f"report-{args.table}", with_costs=not args.no_costs)
    return 0


def write_report(paths: list[Path], folder: Path, with_costs: bool = True) -> int:
    from .report import collect, markdown, plot, summarize

    runs = collect([p for p in paths if p.exists()] or paths)
    rows = summarize(runs, with_costs=with_costs)
    if not rows:
        raise LLSError("none of the runs has finished all its epochs yet")
    folder.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    figures = plot(rows, folder)
    text = table + "\n\n" + "\n".join(f"![{f.stem}]({f.name})" for f in figures) + "\n"
    (folder / "report.md").write_text(text)
    (folder / "report.json").write_text(json.dumps(rows, indent=1))
    unfinished = [r.path for r in runs if not r.finished]
    print(table)
    print(f"\nreport, figures and JSON written to {folder}")
    if unfinished:
        print(f"not included (unfinished): {', '.join(map(str, unfinished))}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.runs]
    return write_report(paths, Path(args.out) if args.out else Path("report"), with_costs=not args.no_costs)


def add_reproduce_commands(commands) -> None:
    reproduce = commands.add_parser("reproduce", help="run the paper's experiments (resumable sweep)")
    reproduce.add_argument("table", nargs="?", help="table1, table2, table3 or compare")
    reproduce.add_argument("--list", action="store_true", help="show the presets")
    reproduce.add_argument("--dataset")
    reproduce.add_argument("--model")
    reproduce.add_argument("--rule", help="rule name or row slug (e.g. lls-square)")
    reproduce.add_argument("--epochs", type=positive_int, help="override the paper's budget")
    reproduce.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    reproduce.add_argument("--device", help="cpu, cuda, cuda:N or auto (default)")
    reproduce.add_argument("--out", default="runs/reproduce", help="root of the run directories")
    reproduce.add_argument("--report", action="store_true", help="write the report when the sweep is done")
    reproduce.add_argument("--no-costs", action="store_true", help="report without lls cost columns")
    reproduce.add_argument("--dry-run", action="store_true", help="say what would run")
    reproduce.add_argument("--quiet", action="store_true", help="no progress bars")
    add_data_options(reproduce)
    reproduce.set_defaults(func=cmd_reproduce)

    report = commands.add_parser("report", help="collect finished runs into tables and figures")
    report.add_argument("runs", nargs="+", help="run directories, or folders holding them")
    report.add_argument("--out", help="folder for report.md, report.json and figures (default ./report)")
    report.add_argument("--no-costs", action="store_true", help="skip the lls cost columns")
    report.set_defaults(func=cmd_report)


# --- lls diagnose / lls plot ----------------------------------------------------------------------


def cmd_diagnose(args: argparse.Namespace) -> int:
    from itertools import islice

    from .diagnose import diagnose, plot_diagnosis
    from .report_format import table

    device = resolve_device(args.device)
    run, config, state, session = open_trained(
        args.run, device=device, data_dir=args.data_dir, download=not args.no_download
    )
    batches = islice(session.loaders.train.epoch(state["epoch"], stream="diagnose"), args.batches)
    results = diagnose(session.trainer, batches)
    folder = Path(args.out) if args.out else run.path / "diagnose"
    title = f"{config.model} / {config.dataset} / {session.rule.name}, epoch {state['epoch']}"
    figures = plot_diagnosis(results, folder, title)
    rows = []
    for r in results:
        margin, sync = r.sync_margin, r.sync_accuracy
        rows.append(
            [
                f"block {r.index}",
                f"{r.cosine:+.3f}",
                f"{r.norm_ratio:.3g}",
                "-" if margin is None else f"{margin:+.3f}",
                "-" if sync is None else f"{100 * sync:.0f}%",
            ]
        )
    print(f"{title}; {args.batches} training batches of {config.batch_size}")
    print(table(["", "cosine to BP", "norm ratio", "sync margin", "classes synced"], rows))
    print(f"figures: {', '.join(str(f) for f in figures)}")
    if args.json:
        print(
            json.dumps(
                {
                    "run_dir": str(run.path),
                    "epoch": state["epoch"],
                    "rule": session.rule.name,
                    "blocks": [r.as_dict() for r in results],
                }
            )
        )
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .basis import BASIS_KINDS
    from .diagnose import plot_basis

    if args.kind not in BASIS_KINDS:
        raise LLSError(f"unknown basis {args.kind!r}; known bases: {', '.join(BASIS_KINDS)}")
    path = Path(args.out or f"basis-{args.kind}-{args.classes}x{args.dim}.png")
    plot_basis(args.classes, args.dim, args.kind, path)
    print(f"wrote {path}")
    return 0


def add_diagnose_commands(commands) -> None:
    diagnose = commands.add_parser("diagnose", help="alignment with BP and synchronisation of every block")
    diagnose.add_argument("run", help="run directory")
    diagnose.add_argument("--batches", type=positive_int, default=10, help="training batches to average over")
    diagnose.add_argument("--out", help="folder for the figures (default RUN_DIR/diagnose)")
    diagnose.add_argument("--device", help="cpu, cuda, cuda:N or auto (default)")
    add_data_options(diagnose)
    diagnose.add_argument("--json", action="store_true")
    diagnose.set_defaults(func=cmd_diagnose)

    plot = commands.add_parser("plot", help="pictures")
    what = plot.add_subparsers(dest="what", required=True, metavar="WHAT")
    basis = what.add_parser("basis", help="the rows of an LLS basis")
    basis.add_argument("--classes", type=positive_int, default=10)
    basis.add_argument("--dim", type=positive_int, default=512)
    basis.add_argument("--kind", default="square", help="square, periodic or random")
    basis.add_argument("--out", help="PNG path (default basis-KIND-KxD.png)")
    basis.set_defaults(func=cmd_plot)
