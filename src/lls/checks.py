"""The public API checks its arguments at the call: :func:`checked` compares each argument with its
annotation and raises :class:`~lls.errors.LLSError` in one line naming the function, the argument,
what it got and what it takes, rather than a TypeError or AttributeError from deep inside.

Only types are checked here (what the annotations say); the values' own rules (a positive lr, a
known name) stay with the code that owns them.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from .errors import LLSError

F = TypeVar("F", bound=Callable[..., Any])
ELEMENTS_CHECKED = 64  # a sequence's first elements are checked against its element type
UNKNOWN = object()
SCALARS = (int, float, str, bool)  # element types a sequence's elements are checked against
BUILTIN_VALUES = (
    int,
    float,
    complex,
    str,
    bytes,
    bool,
    type(None),
    list,
    tuple,
    dict,
    set,
)  # an annotation that does not resolve at run time: not checked


def shown(value: Any) -> str:
    """``value`` for a message: its repr, cut short, and its type."""
    text = " ".join(repr(value).split())
    text = text if len(text) <= 60 else text[:45] + "..." + text[-10:]
    return f"{text} ({type(value).__name__})"


def _resolve(function: Callable, annotation: Any) -> Any:
    if not isinstance(annotation, str):
        return annotation
    namespace = dict(vars(inspect.getmodule(function) or object()))
    try:
        return eval(annotation, namespace)
    except Exception:
        return UNKNOWN


def matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` is what ``hint`` (a resolved annotation) describes, as far as can be told."""
    if hint is UNKNOWN or hint is Any or isinstance(hint, TypeVar):
        return True
    if hint is None or hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or isinstance(hint, types.UnionType):
        return any(matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is collections.abc.Callable or hint is collections.abc.Callable:
        return callable(value)
    if origin is type:
        if not isinstance(value, type):
            return False
        return not args or not isinstance(args[0], type) or issubclass(value, args[0])
    if origin in (collections.abc.Sequence, list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, origin):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args, strict=True))
        if not args or args[0] not in SCALARS:  # elements of lls' own kinds are duck-typed
            return True
        return all(matches(v, args[0]) for v in list(value)[:ELEMENTS_CHECKED])
    if origin is not None:
        return isinstance(origin, type) and isinstance(value, origin)
    if not isinstance(hint, type) or getattr(hint, "_is_protocol", False):
        return True
    if hint.__module__.startswith("lls.") and not isinstance(value, BUILTIN_VALUES):
        return True  # lls' own classes are duck-typed (a test's scripted trainer); plain values are not
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def describe(hint: Any, written: str) -> str:
    """What ``hint`` takes, in words a message can show (``written``: the annotation as typed)."""
    if hint is UNKNOWN:
        return written
    if hint is None or hint is type(None):
        return "None"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or isinstance(hint, types.UnionType):
        return " | ".join(describe(a, written) for a in args)
    if origin is collections.abc.Callable or hint is collections.abc.Callable:
        return "a function"
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join('...' if a is Ellipsis else describe(a, written) for a in args)}]"
    return getattr(hint, "__name__", str(hint))


def checked(function: F) -> F:
    """Check every argument of ``function`` against its annotation on each call (an ``__init__``
    is named by its class)."""
    signature = inspect.signature(function)
    name = function.__qualname__.removesuffix(".__init__")
    hints: dict[str, Any] = {}

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as error:
            raise LLSError(f"{name}: {error}") from None
        if not hints:
            hints.update({p: _resolve(function, q.annotation) for p, q in signature.parameters.items()})
        for key, value in bound.arguments.items():
            parameter = signature.parameters[key]
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD) or key == "self":
                continue
            if parameter.annotation is inspect.Parameter.empty or matches(value, hints[key]):
                continue
            takes = describe(hints[key], str(parameter.annotation))
            raise LLSError(f"{name}: {key} must be {takes}, got {shown(value)}")
        return function(*args, **kwargs)

    return typing.cast(F, wrapper)


def device_of(value: torch.device | str, name: str = "device") -> torch.device:
    """``value`` as a device this build can use: cpu, or cuda when a CUDA device is there."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise LLSError(f"{name} {value!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type not in ("cpu", "cuda"):
        raise LLSError(f"{name} {value!r}: lls runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LLSError(f"{name} {value!r}: no CUDA device is available to this torch build; use 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise LLSError(f"{name} {value!r}: there are {torch.cuda.device_count()} CUDA devices")
    return device


@functools.cache
def _field_hint(cls: type, name: str, annotation: Any) -> Any:
    return _resolve(cls, annotation)


def check_fields(obj: Any) -> None:
    """Check every field of a dataclass instance against its annotation (from ``__post_init__``)."""
    cls = type(obj)
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if not matches(value, _field_hint(cls, field.name, field.type)):
            takes = describe(_field_hint(cls, field.name, field.type), str(field.type))
            raise LLSError(f"{cls.__name__}: {field.name} must be {takes}, got {shown(value)}")
