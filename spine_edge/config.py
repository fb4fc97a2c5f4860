"""Helpers that let a command line take its defaults and choices from the config dataclasses.

A setting's default lives once, on its ``*Config`` field, and its allowed values once, in its
``Literal`` type; CLI options read both from there instead of repeating them.

Example:
    >>> @dataclasses.dataclass(frozen=True)
    ... class RunConfig:
    ...     batch_size: int = 4
    >>> field_default(RunConfig, "batch_size")
    4
    >>> literal_values(typing.Literal["auto"] | typing.Literal["fp32", "fp16"])
    ('auto', 'fp32', 'fp16')
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


def field_default(cls: type[Any], name: str) -> Any:
    """The default of a dataclass field (calling its ``default_factory`` if it has one).

    Args:
        cls: A dataclass.
        name: One of its field names.

    Raises:
        TypeError: ``cls`` is not a dataclass, or the field is unknown or has no default (a CLI
            option needs one, so this is a programming error caught at import time).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    for spec in dataclasses.fields(cls):
        if spec.name != name:
            continue
        if spec.default is not dataclasses.MISSING:
            return spec.default
        if spec.default_factory is not dataclasses.MISSING:
            return spec.default_factory()
        raise TypeError(f"{cls.__name__}.{name} has no default")
    raise TypeError(f"{cls.__name__} has no field {name!r}")


def literal_values(tp: Any) -> tuple[str, ...]:
    """The values of a ``Literal`` type, flattening unions and nested literals, in declaration order.

    Raises:
        TypeError: ``tp`` is not built only from ``Literal`` types of strings.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return tuple(dict.fromkeys(value for arg in typing.get_args(tp) for value in literal_values(arg)))
    if origin is not typing.Literal:
        raise TypeError(f"{tp!r} is not a Literal type (or a union of them)")
    # typing flattens nested Literals (Literal["auto", Precision]) itself, so every arg is a value.
    values = typing.get_args(tp)
    if not all(isinstance(value, str) for value in values):
        raise TypeError(f"{tp!r} has non-string values; a CLI choice needs strings")
    return values
