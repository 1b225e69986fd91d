"""``lls data fetch|check`` and ``lls list``."""

from __future__ import annotations

import argparse

from ..data import DATASETS, check_dataset, fetch_dataset, list_datasets
from ..method.basis import BASIS_KINDS
from ..method.models import list_models
from ..method.rules import list_rules
from ..step.optim import OPTIMIZERS
from .common import counted


def add(commands) -> None:
    data = commands.add_parser("data", help="fetch or check datasets", description="Fetch or check datasets.")
    actions = data.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=type(data))
    fetch = actions.add_parser("fetch", help="download (resumable), verify and unpack a dataset")
    fetch.add_argument("name", help="dataset (see `lls list`)")
    fetch.add_argument(
        "--data-dir", default=None, help="where to put it (default $LLS_DATA_DIR or ~/.cache/lls)"
    )
    check = actions.add_parser("check", help="verify a dataset's files, counts, shapes and labels")
    check.add_argument("name", help="dataset (see `lls list`)")
    check.add_argument("--data-dir", default=None, help="folder holding the dataset's files")
    check.add_argument("--sample", type=counted("--sample"), help="decode only about N images of each split")
    data.set_defaults(func=cmd_data)

    listing = commands.add_parser(
        "list", help="list rules, models, datasets and optimizers", description="List what can be named."
    )
    listing.set_defaults(func=cmd_list)


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
    print("bases:      " + ", ".join(BASIS_KINDS))
    print("models:     " + ", ".join(list_models()))
    print("datasets:   " + ", ".join(list_datasets()))
    print("optimizers: " + ", ".join(OPTIMIZERS.names()))
    return 0
