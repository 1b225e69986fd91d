"""Options defined once, as dataclass fields: the field is the option.

A rule's options and a run's configuration are dataclasses whose fields are declared with
:func:`option`. From that one declaration come the command-line flag and its help text
(:func:`add_arguments`), the key in ``config.json`` (the field name), the check of a value however
it arrived (:func:`check`: from the command line, a preset, a hand-edited file) and, for a run,
whether it sets one row of a report apart from another. Adding an option to a rule touches the
rule and nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .errors import LLSError
from .registry import Registry

Choices = Sequence[str] | Registry | Callable[[], Sequence[str]]


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    choices: Choices | None = None,
    known: str = "",
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
    cli: bool = True,
    resumable: bool = False,
    distinguishing: bool = True,
) -> Any:
    """A dataclass field that is also an option.

    ``choices``: the allowed values (a tuple, a registry, or a function returning names), named in
    errors as ``known`` ("bases", ...; a registry names its own). ``minimum`` / ``maximum`` bound a
    number (inclusive), ``positive`` asks for > 0; numbers must be finite. ``cli``: offered on the
    command line. ``resumable``: may change when a run is resumed. ``distinguishing``: runs that
    differ in it are different rows of a report.
    """
    metadata = {
        "help": help,
        "choices": choices,
        "known": known,
        "minimum": minimum,
        "maximum": maximum,
        "positive": positive,
        "cli": cli,
        "resumable": resumable,
        "distinguishing": distinguishing,
    }
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def options_of(cls: type) -> list[dataclasses.Field]:
    """The fields of a dataclass declared with :func:`option`."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


@functools.cache
def value_type(cls: type, name: str) -> type:
    """The type of field ``name`` of ``cls``, without ``| None``: int, float, str, bool or dict."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def allows_none(cls: type, name: str) -> bool:
    hint = typing.get_type_hints(cls)[name]
    return type(None) in typing.get_args(hint)


def choices_of(field: dataclasses.Field) -> list[str] | None:
    choices = field.metadata.get("choices")
    if choices is None:
        return None
    if isinstance(choices, Registry):
        return choices.names()
    return list(choices() if callable(choices) else choices)


def check(obj: Any, where: str = "") -> None:
    """Raise :class:`LLSError` for the first field of ``obj`` whose value breaks its declaration.

    ``where`` prefixes the message (e.g. the file a value was read from). Integers given for a
    float field are converted in place.
    """
    cls = type(obj)
    check_values(cls, {f.name: getattr(obj, f.name) for f in options_of(cls)}, where)
    for field in options_of(cls):
        value = getattr(obj, field.name)
        if value_type(cls, field.name) is float and type(value) is int:
            object.__setattr__(obj, field.name, float(value))


def check_values(cls: type, values: dict[str, Any], where: str = "", name=lambda n: n) -> None:
    """Check ``values`` (field name -> value) against the fields of ``cls`` they name; ``name``
    spells a field in the message (e.g. as its command-line flag)."""
    fields = {f.name: f for f in options_of(cls)}
    for key, value in values.items():
        problem = _problem(cls, fields[key], value, name(key))
        if problem is not None:
            raise LLSError(f"{where}{problem}")


def _problem(cls: type, field: dataclasses.Field, value: Any, name: str) -> str | None:
    meta = field.metadata
    if value is None:
        return None if allows_none(cls, field.name) else f"{name} must be given, got null"
    kind = value_type(cls, field.name)
    numeric = kind in (int, float) and not isinstance(value, bool)
    if kind is float and not (numeric and isinstance(value, (int, float))):
        return f"{name} must be a number, got {value!r}"
    if kind is int and not (numeric and isinstance(value, int)):
        return f"{name} must be a whole number, got {value!r}"
    if kind in (str, bool, dict) and not isinstance(value, kind):
        return f"{name} must be a {kind.__name__}, got {value!r}"
    if numeric:
        if not math.isfinite(value):
            return f"{name} must be a finite number, got {value}"
        if meta["positive"] and not value > 0:
            return f"{name} must be > 0, got {value}"
        if meta["minimum"] is not None and value < meta["minimum"]:
            return f"{name} must be >= {meta['minimum']}, got {value}"
        if meta["maximum"] is not None and value > meta["maximum"]:
            return f"{name} must be <= {meta['maximum']}, got {value}"
    choices = meta.get("choices")
    if isinstance(choices, Registry):
        try:
            choices.get(value)
        except LLSError as error:
            return str(error)
    elif choices is not None and value not in choices_of(field):
        known = meta["known"] or f"{field.name}s"
        return f"unknown {field.name} {value!r}; known {known}: {', '.join(choices_of(field))}"
    return None


# --- the command line -------------------------------------------------------------------------


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(
    parser: argparse.ArgumentParser, fields: Iterable[dataclasses.Field], cls_of: Callable, note=None
) -> None:
    """One ``--flag`` per field (default None, so that what a user typed can be told apart).

    ``cls_of(field)`` is the dataclass the field belongs to (for its type); ``note(field)`` may add
    a sentence to the help (e.g. which rules take the option).
    """
    for field in fields:
        if not field.metadata.get("cli", True):
            continue
        cls = cls_of(field)
        kind = value_type(cls, field.name)
        help_text = field.metadata["help"]
        default = field.default if field.default is not dataclasses.MISSING else None
        choices = choices_of(field)
        if choices:
            help_text += f": {', '.join(choices)}"
        if isinstance(default, bool):
            help_text += f" (default {'on' if default else 'off'})"
        elif default is not None:
            help_text += f" (default {default})"
        if note is not None:
            help_text += note(field)
        if kind is bool:
            parser.add_argument(
                flag(field.name), action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            metavar = field.name.upper() if choices is None else None
            parser.add_argument(flag(field.name), type=_parser(kind), metavar=metavar, help=help_text)


def _parser(kind: type) -> Callable[[str], Any]:
    """Text to a value of ``kind``; ranges are checked later by :func:`check`, in one place."""
    if kind is int:
        return int
    if kind is float:
        return float
    return str


def given(args: argparse.Namespace, fields: Iterable[dataclasses.Field]) -> dict[str, Any]:
    """The options the user typed (those not left at None)."""
    values = {}
    for field in fields:
        value = getattr(args, field.name, None)
        if value is not None:
            values[field.name] = value
    return values
