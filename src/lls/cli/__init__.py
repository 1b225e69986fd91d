"""The ``lls`` command line.

Each module of this package holds one family of commands and adds them with ``add(commands)``:

- ``train``: ``lls train`` (options generated from ``TrainConfig`` and the rules) and ``lls eval``;
- ``model``: ``lls predict`` and ``lls export`` (the trained model out of a run);
- ``edge``: ``lls edge train|check`` (a training program in ExecuTorch's runtime);
- ``data``: ``lls data fetch|check`` and ``lls list``;
- ``measure``: ``lls cost`` and ``lls bench``;
- ``experiments``: ``lls reproduce`` and ``lls report``;
- ``inspect``: ``lls diagnose`` and ``lls plot``.

:func:`main` is the one error boundary: a user-facing failure (an :class:`~lls.errors.LLSError`, a
bad option, a filesystem error, running out of memory) ends with exit status 2 and one line that
names the problem and the fix; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence

import torch

from .. import __version__
from ..errors import LLSError
from ..files import describe_os_error
from ..malloc import tune_malloc
from . import data, edge, experiments, inspect, measure, model, train
from .common import EXIT_INTERRUPTED, EXIT_USER_ERROR, Parser

FAMILIES = (train, model, edge, data, measure, experiments, inspect)


def build_parser() -> Parser:
    parser = Parser(prog="lls", description="Train networks with LLS and the rules it is compared to.")
    parser.add_argument("--version", action="version", version=f"lls {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for family in FAMILIES:
        family.add(commands)
    return parser


def run_command(args) -> int:
    """The command, with library warnings held back: shown after it succeeds, dropped when it
    fails (its one error line then stands alone on stderr)."""
    with warnings.catch_warnings(record=True) as caught:
        code = args.func(args)
    for warning in caught:
        warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    tune_malloc()  # the largest single speed-up on CPU; see malloc.py
    args = None
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        files = [a for a in extra if not a.startswith("-")]
        if extra and hasattr(args, "files") and files == extra:
            args.files += files  # `lls predict RUN --json a.png`: files after an option are files too
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        code = run_command(args)
    except LLSError as error:
        print(f"lls: error: {error}", file=sys.stderr)
        code = EXIT_USER_ERROR
    except OSError as error:
        if isinstance(error, BrokenPipeError):  # `lls ... | head`: the reader left; not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        print(f"lls: error: {describe_os_error(error, error.filename or 'a file')}", file=sys.stderr)
        code = EXIT_USER_ERROR
    except (MemoryError, torch.OutOfMemoryError):
        print("lls: error: out of memory; lower --batch-size (or use a smaller model)", file=sys.stderr)
        code = EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("lls: aborted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    if getattr(args, "parallel", None) and "WORLD_SIZE" in os.environ:
        # One of torchrun's processes: everything it wrote is on disk (atomically) and its process
        # group is gone, yet gloo's threads can still abort the interpreter's teardown now and then
        # (SIGABRT, "terminate called without an active exception"), turning a clean exit status
        # into -6. Leave without the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


__all__ = ["build_parser", "main"]
