"""Progress bars of the benchmark's phases, on stderr."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


@contextmanager
def progress_bar(enabled: bool, total: int, desc: str) -> Iterator[tqdm]:
    """A progress bar for one phase; log lines are printed above it instead of through it.

    Args:
        enabled: False gives a disabled bar (``update`` does nothing), so callers need no branch.
        total: Expected number of images.
        desc: What the phase is, e.g. ``fp16 latency``.
    """
    with (
        logging_redirect_tqdm(),
        tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True, leave=False) as bar,
    ):
        yield bar
