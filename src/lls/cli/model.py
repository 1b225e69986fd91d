"""``lls predict`` and ``lls export``: the trained model out of a run (see ``training/trained.py``)."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys

import torch

from ..data.inputs import read_images
from ..errors import LLSError
from ..files import check_output
from ..training.export import EXECUTORCH_MAX_BATCH, FORMATS, check_format, export_model, run_metadata
from ..training.run import open_trained
from ..training.trained import Inputs, batches, dataset_inputs, evaluated_model
from .common import add_data_options, add_device, counted, resolve_device

PROBABILITY_DIGITS = 6  # significant digits of the probabilities in CSV


def add(commands) -> None:
    predict = commands.add_parser(
        "predict",
        help="classify images with a run's trained model",
        description="Classify image files (any size: resized and cropped as the run's dataset) or a "
        "split of a dataset with the model a run evaluated; one row per image: its class and the "
        "probability of every class.",
    )
    predict.add_argument("run", help="run directory")
    predict.add_argument("files", nargs="*", metavar="FILE", help="image files to classify")
    predict.add_argument("--dataset", help="classify a split of this dataset instead of files")
    predict.add_argument("--split", choices=("test", "train"), default="test", help="with --dataset (test)")
    predict.add_argument("--json", action="store_true", help="one JSON object instead of CSV")
    add_device(predict)
    add_data_options(predict)
    predict.set_defaults(func=cmd_predict)

    export = commands.add_parser(
        "export",
        help="write a run's trained model as ONNX, TorchScript or an ExecuTorch program",
        description="Write the model a run evaluated to a file: ONNX (input 'input' with a dynamic "
        "batch dimension, output 'logits'; needs pip install 'lls[export]'), TorchScript (traced) or "
        "an ExecuTorch inference program (.pte: method 'forward', batches of 1 to "
        f"{EXECUTORCH_MAX_BATCH}, with the input normalisation and class names as constant methods; "
        "needs executorch, see docs/edge.md).",
    )
    export.add_argument("run", help="run directory")
    export.add_argument("--format", required=True, choices=FORMATS.names(), help="file format")
    export.add_argument("--out", required=True, help="file to write")
    training = export.add_argument_group(
        "training programs (--format executorch --training: one method per block; see docs/edge.md)"
    )
    training.add_argument(
        "--training",
        action="store_true",
        help="write the run's state as a training program for ExecuTorch's runtime (lls edge train)",
    )
    training.add_argument(
        "--batch-size", type=counted("--batch-size", 2), help="the program's fixed batch (default: the run's)"
    )
    training.add_argument(
        "--optimizer", help="the runtime's optimizer: sgd, the only one it has (default: the run's)"
    )
    training.add_argument("--lr", type=float, help="the runtime SGD's learning rate (default: the run's)")
    training.add_argument(
        "--max-memory",
        help="fit training in this size (e.g. 256KiB, 4MiB): a local rule's blocks that do not fit "
        "run in slices of the batch; a program that still does not fit is refused",
    )
    add_data_options(export)
    export.set_defaults(func=cmd_export)


def cmd_predict(args: argparse.Namespace) -> int:
    if bool(args.files) == bool(args.dataset):
        raise LLSError("give image files or --dataset (one of the two)")
    device = resolve_device(args.device)
    download = not args.no_download
    _, state, session = open_trained(args.run, device=device, data_dir=args.data_dir, download=download)
    if args.dataset:
        inputs = dataset_inputs(session, args.dataset, args.split, data_dir=args.data_dir, download=download)
    else:
        split = read_images(args.files, session.data)
        inputs = Inputs("files", session.data, split, [str(f) for f in args.files])
    model = evaluated_model(session, state)
    probabilities = []
    with torch.no_grad():
        for x, _ in batches(session, inputs, device):
            probabilities.append(torch.softmax(model(x).float(), dim=1).cpu())
    probs = torch.cat(probabilities)
    names = class_names(inputs)
    labels = inputs.split.labels.tolist()
    rows = []
    for name, label, p in zip(inputs.names, labels, probs.tolist(), strict=True):
        predicted = max(range(len(p)), key=p.__getitem__)
        row = {"input": name, "class": predicted, "name": names[predicted], "probabilities": p}
        rows.append({**row, **({"label": label} if label >= 0 else {})})
    if args.json:
        print(json.dumps({"run_dir": args.run, "inputs": inputs.name, "classes": names, "predictions": rows}))
        return 0
    writer = csv.writer(sys.stdout, lineterminator="\n")
    has_labels = any("label" in row for row in rows)
    writer.writerow(
        ["input", *(["label"] if has_labels else []), "class", "name", *(f"p_{k}" for k in range(len(names)))]
    )
    for row in rows:
        label = [row["label"]] if has_labels else []
        p = [f"{v:.{PROBABILITY_DIGITS}g}" for v in row["probabilities"]]
        writer.writerow([row["input"], *label, row["class"], row["name"], *p])
    return 0


def class_names(inputs: Inputs) -> list[str]:
    classes = list(inputs.data.classes)
    count = inputs.data.num_classes
    return classes if len(classes) == count else [str(k) for k in range(count)]


def cmd_export(args: argparse.Namespace) -> int:
    if args.training:
        return cmd_export_training(args)
    for name in ("batch_size", "optimizer", "lr", "max_memory"):
        if getattr(args, name) is not None:
            raise LLSError(f"--{name.replace('_', '-')} goes with --training")
    check_format(args.format)  # before the run is read: a missing package is said at once
    check_output(args.out)  # before the model is loaded: a path that may not be written is said at once
    device = torch.device("cpu")
    run, state, session = open_trained(
        args.run, device=device, data_dir=args.data_dir, download=not args.no_download
    )
    model = evaluated_model(session, state).to(memory_format=torch.contiguous_format)
    inputs = [run.checkpoint_path, run.config_path]
    out = export_model(
        model, session.data.input_shape, args.out, args.format, session_metadata(session), inputs=inputs
    )
    print(
        f"wrote {out} ({args.format}): input (N, {', '.join(map(str, session.data.input_shape))}), "
        f"{session.data.num_classes} logits"
    )
    return 0


def cmd_export_training(args: argparse.Namespace) -> int:
    from ..edge.session import check_optimizer, export_training
    from ..step.lowmem import parse_memory, size_text

    if args.format != "executorch":
        raise LLSError(f"--training writes ExecuTorch programs: use --format executorch, not {args.format}")
    check_format(args.format)  # before the run is read: a missing package is said at once
    if args.optimizer is not None:
        check_optimizer(args.optimizer)
    if args.lr is not None and not 0 < args.lr < math.inf:
        raise LLSError(f"--lr must be a positive finite number, got {args.lr}")
    max_memory = None
    if args.max_memory is not None:
        max_memory = parse_memory(args.max_memory)
        if not isinstance(max_memory, int):
            raise LLSError(f"--max-memory takes a size such as 256KiB or 4MiB, got {args.max_memory!r}")
    built = export_training(
        args.run,
        args.out,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        max_memory=max_memory,
        data_dir=args.data_dir,
        download=not args.no_download,
    )
    layout, sgd = built.layout, built.layout.optimizer
    names = ", ".join(
        m.name + (f" (in {m.sliced['slices']} slices)" if m.sliced else "") for m in layout.methods
    )
    print(
        f"wrote {args.out} (ExecuTorch training program, {size_text(len(built.buffer))}): methods {names}; "
        f"batches of {layout.batch_size}, SGD lr {sgd['lr']} momentum {sgd['momentum']}"
    )
    return 0


def session_metadata(session) -> dict[str, str]:
    """What an exported file records of the run it comes from (``run_metadata``)."""
    data, config = session.data, session.config
    return run_metadata(
        rule=config.rule_config(),
        mean=data.mean,
        std=data.std,
        input_shape=data.input_shape,
        classes=list(data.classes),
        num_classes=data.num_classes,
        model=config.model,
        dataset=config.dataset,
    )
