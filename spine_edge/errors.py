"""The project's exception types.

Every message names the thing that is wrong (a file, a bundle, a setting), what is wrong with it,
and what to do about it, so that a clinic's IT person can act on one line of output.
"""

from __future__ import annotations

from pathlib import Path


class SpineEdgeError(Exception):
    """Base class of every error spine-edge raises on purpose."""


class ImageReadError(SpineEdgeError):
    """An input image could not be read.

    Attributes:
        path: The file that failed.
        reason: What is wrong with it (one short sentence).
        hint: What the user can do, or an empty string.
    """

    def __init__(self, path: str | Path, reason: str, hint: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.hint = hint
        message = f"{self.path}: {reason}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class DatasetError(SpineEdgeError):
    """A dataset folder does not have the expected VinDr-SpineXR layout or content."""


class BundleError(SpineEdgeError):
    """A bundle is missing, corrupt, or does not match this machine."""


class BackendError(SpineEdgeError):
    """An inference backend could not be created or failed to run."""


class MissingDependencyError(SpineEdgeError):
    """An optional dependency is not installed.

    Args:
        package: The import name that failed.
        extra: The spine-edge extra that provides it.
        purpose: What it is needed for.
    """

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(
            f"{purpose} needs the Python package '{package}', which is not installed: "
            f"run pip install 'spine-edge[{extra}]'"
        )
