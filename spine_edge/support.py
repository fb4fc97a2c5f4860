"""Small helpers every stage shares: optional imports, JSON-safe values, package versions.

Each exists once here so that the runtime, export, training and benchmarks explain a missing
extra, write strict JSON and record their environment the same way.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import importlib.metadata
import math
from collections.abc import Iterable, Mapping
from pathlib import PurePath
from types import ModuleType
from typing import Any

import numpy as np

from spine_edge.errors import MissingDependencyError


def import_optional(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``, or raise the project's error naming the extra that provides it.

    Args:
        module: Dotted module name, e.g. ``"onnxruntime"`` or ``"spine_edge.export.pipeline"``.
        extra: The ``spine-edge[...]`` extra to install, e.g. ``"cpu"`` or ``"train"``.
        purpose: What needed it, for the message (``"The ONNX Runtime backend"``).

    Raises:
        MissingDependencyError: The module, or a package it imports, is not installed. The
            missing package's own name is reported (``exc.name``), not only ``module``.

    Example:
        >>> import_optional("math", "cpu", "Arithmetic").sqrt(4.0)
        2.0
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(exc.name or module, extra, purpose) from exc


def json_safe(value: Any) -> Any:
    """A copy of ``value`` that strict JSON accepts (``allow_nan=False``).

    NaN and infinities become None; numpy scalars and arrays become Python numbers and lists;
    tuples become lists; paths and enums become strings; dataclasses become dicts. Mapping keys
    become strings.

    Example:
        >>> json_safe({"a": float("nan"), "b": (np.float32(0.5), 2)})
        {'a': None, 'b': [0.5, 2]}
    """
    if isinstance(value, enum.Enum):
        return json_safe(value.value)
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value))
    return value


def package_versions(packages: Iterable[str], *, missing: str | None = None) -> dict[str, str]:
    """Installed versions of distributions, by distribution name.

    Args:
        packages: Distribution names as pip knows them (``"onnxruntime"``, ``"spine-edge"``).
        missing: Value recorded for a package that is not installed; None leaves it out.

    Example:
        >>> "numpy" in package_versions(["numpy"])
        True
    """
    found: dict[str, str] = {}
    for package in packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            if missing is not None:
                found[package] = missing
    return found
