"""``lls diagnose`` (alignment with BP, synchronisation) and ``lls plot``."""

from __future__ import annotations

import argparse
import json
from itertools import islice
from pathlib import Path

import torch

from ..errors import LLSError
from ..measure.diagnose import diagnose, diagnosis_text, plot_basis, plot_basis_bytes, plot_diagnosis
from ..measure.fits import check_fits
from ..measure.plots import FIGURE_FORMATS, figure_format
from ..method.basis import BASIS_KINDS
from ..method.rules import LLS
from ..training.files import check_output
from ..training.run import describe_rule, open_trained
from .common import add_data_options, add_device, counted, resolve_device


def add(commands) -> None:
    diagnosis = commands.add_parser(
        "diagnose",
        help="alignment with BP and synchronisation of every block",
        description="Per block: cosine between the rule's update and BP's gradient; LLS synchronisation.",
    )
    diagnosis.add_argument("run", help="run directory")
    diagnosis.add_argument(
        "--batches",
        type=counted("--batches"),
        default=10,
        help="training batches to average over (default 10)",
    )
    diagnosis.add_argument("--out", help="folder for the figures (default RUN_DIR/diagnose)")
    add_device(diagnosis)
    add_data_options(diagnosis)
    diagnosis.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    diagnosis.set_defaults(func=cmd_diagnose)

    plot = commands.add_parser("plot", help="pictures (an LLS basis)", description="Pictures.")
    what = plot.add_subparsers(dest="what", required=True, metavar="WHAT", parser_class=type(plot))
    basis = what.add_parser("basis", help="the rows of an LLS basis (any registered kind)")
    basis.add_argument("--classes", type=counted("--classes", 2), default=10, help="rows (default 10)")
    basis.add_argument("--dim", type=counted("--dim"), default=512, help="length d of each row (default 512)")
    default = LLS().basis
    basis.add_argument("--kind", choices=BASIS_KINDS, default=default, help=f"the basis (default {default})")
    basis.add_argument("--out", help=f"picture ({', '.join(FIGURE_FORMATS)}; default basis-KIND-KxD.png)")
    basis.set_defaults(func=cmd_plot)


def cmd_diagnose(args: argparse.Namespace) -> int:
    run, state, session = open_trained(
        args.run, device=resolve_device(args.device), data_dir=args.data_dir, download=not args.no_download
    )
    folder = Path(args.out) if args.out else run.path / "diagnose"
    if folder.exists() and not folder.is_dir():
        raise LLSError(f"--out {folder} is a file; give a folder for the figures")
    config = session.config
    batches = islice(session.loaders.train.epoch(state["epoch"], stream="diagnose"), args.batches)
    results = diagnose(session.trainer, batches)
    title = f"{config.model} / {config.dataset} / {describe_rule(config)}, epoch {state['epoch']}"
    figures = plot_diagnosis(results, folder, title)
    print(f"{title}; {args.batches} training batches of {config.batch_size}")
    print(diagnosis_text(results))
    if all(r.sync is None for r in results):
        print(f"synchronisation: not measured; {config.rule}'s block signals have no fixed class basis")
    print(f"figures: {', '.join(str(f) for f in figures)}")
    if args.json:
        blocks = [r.as_dict() for r in results]
        print(
            json.dumps(
                {"run_dir": str(run.path), "epoch": state["epoch"], "rule": config.rule, "blocks": blocks}
            )
        )
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    path = Path(args.out or f"basis-{args.kind}-{args.classes}x{args.dim}.png")
    figure_format(path)  # an unknown suffix is refused before anything is computed
    check_output(path)  # and so is a path no command may write (a run's file, a FIFO, a link)
    what = f"a picture of a {args.classes} x {args.dim} basis"
    check_fits(
        plot_basis_bytes(args.classes, args.dim), torch.device("cpu"), what, "lower --dim or --classes"
    )
    plot_basis(args.classes, args.dim, args.kind, path)
    print(f"wrote {path}")
    return 0
