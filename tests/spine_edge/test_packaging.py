"""The wheel carries every package of the tree: a new subpackage is never left out of pyproject."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomllib

ROOT = Path(__file__).resolve().parents[2]
#: The folders whose packages the wheel installs (each under a ``spine_edge`` import name).
SOURCE_FOLDERS = ("spine_edge", "export", "training", "benchmarks")


def _setuptools() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        config: dict[str, Any] = tomllib.load(f)["tool"]["setuptools"]
    return config


def test_every_package_folder_is_listed_in_pyproject() -> None:
    config = _setuptools()
    assert set(SOURCE_FOLDERS) <= set(config["package-dir"].values())
    found = set()
    # Each import prefix maps onto a folder (spine_edge.export -> export/); a package is any folder
    # below it with an __init__.py, named by the prefix plus its relative path.
    for prefix, folder in config["package-dir"].items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            relative = init.parent.relative_to(base).parts
            found.add(".".join((prefix, *relative)))
    listed = set(config["packages"])
    missing = sorted(found - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml, or the wheel leaves them out"
    stale = sorted(listed - found)
    assert not stale, f"pyproject lists {stale}, which have no __init__.py: remove them"
