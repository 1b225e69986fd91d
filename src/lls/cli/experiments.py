"""``lls reproduce`` (the paper's experiments as a resumable sweep) and ``lls report``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import LLSError
from ..files import check_folder
from ..training.presets import PRESETS, TABLES, select, with_epochs
from ..training.report import write_report
from ..training.reproduce import plan, sweep
from ..training.run import RunOptions
from .common import EXIT_INTERRUPTED, add_data_options, add_device, counted, number_list, resolve_device


def add(commands) -> None:
    reproduce = commands.add_parser(
        "reproduce",
        help="run the paper's experiments (a resumable sweep)",
        description="Run the rows of the paper's tables as presets; finished rows are skipped.",
    )
    reproduce.add_argument("table", nargs="?", help=f"which experiments: {', '.join(TABLES)}")
    reproduce.add_argument("--list", action="store_true", help="show the presets (of TABLE, or all)")
    reproduce.add_argument("--dataset", help="only this dataset's rows")
    reproduce.add_argument("--model", help="only this model's rows")
    reproduce.add_argument(
        "--rule", help="only this rule's rows (a rule name or a row slug, e.g. lls-square)"
    )
    reproduce.add_argument("--epochs", type=counted("--epochs"), help="override the paper's budget")
    reproduce.add_argument("--seeds", type=number_list, default=[0], help="comma-separated seeds (default 0)")
    add_device(reproduce)
    reproduce.add_argument(
        "--out", default="runs/reproduce", help="root of the run directories (default runs/reproduce)"
    )
    reproduce.add_argument("--report", action="store_true", help="write the report when the sweep is done")
    reproduce.add_argument("--no-costs", action="store_true", help="report without lls cost columns")
    reproduce.add_argument("--dry-run", action="store_true", help="say what would run")
    reproduce.add_argument("--quiet", action="store_true", help="no progress bars")
    add_data_options(reproduce)
    reproduce.set_defaults(func=cmd_reproduce)

    report = commands.add_parser(
        "report",
        help="collect finished runs into tables and figures",
        description="Collect finished runs into a markdown table, JSON and figures (seeds in one row).",
    )
    report.add_argument("runs", nargs="+", help="run directories, or folders holding them")
    report.add_argument("--out", help="folder for report.md, report.json and figures (default ./report)")
    report.add_argument("--no-costs", action="store_true", help="skip the lls cost columns")
    report.set_defaults(func=cmd_report)


def cmd_reproduce(args: argparse.Namespace) -> int:
    if args.list:
        chosen = select(args.table, args.dataset, args.model, args.rule) if args.table else list(PRESETS)
        for p in chosen:
            augment = f", augment {p.augment}" if p.augment else ""
            print(f"{p.name:58s} {p.rule} {p.rule_options or ''} {p.epochs} epochs{augment}")
        return 0
    if not args.table:
        raise LLSError(f"name the experiments ({', '.join(TABLES)}) or use --list")
    presets = [with_epochs(p, args.epochs) for p in select(args.table, args.dataset, args.model, args.rule)]
    rows = plan(presets, args.seeds, Path(args.out))
    options = RunOptions(
        resolve_device(args.device),
        data_dir=args.data_dir,
        download=not args.no_download,
        progress=not args.quiet,
    )
    status = sweep(rows, options, dry_run=args.dry_run, say=lambda line: print(line, flush=True))
    if status == "interrupted":
        print("lls: interrupted; run the same command again to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.report and not args.dry_run:
        return print_report([r.out for r in rows], Path(args.out) / f"report-{args.table}", not args.no_costs)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    paths = [check_folder(p, "run folder") for p in args.runs]  # "" is not "."
    return print_report(paths, Path(args.out) if args.out else Path("report"), not args.no_costs)


def print_report(paths: list[Path], folder: Path, with_costs: bool) -> int:
    text, unfinished = write_report(paths, folder, with_costs=with_costs)
    print(text)
    print(f"\nreport, figures and JSON written to {folder}")
    if unfinished:
        print(f"not included (unfinished): {', '.join(map(str, unfinished))}")
    return 0
