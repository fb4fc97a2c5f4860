"""Watch folder: process radiographs as they are dropped into a folder, each exactly once.

A drop folder is polled (every ``interval`` seconds) rather than watched with inotify: polling works
the same on local disks and on the SMB/NFS shares modalities often write to, where inotify does not
see remote writes, and one scan of a drop folder a second costs nothing next to one inference.

Life of a file ``IN/a/IM1.dcm``:

1. **complete**: seen with the same size and modification time for ``settle`` seconds (a file
   still being copied keeps changing). Hidden files and ``*.part``/``*.tmp``/``*.partial``/
   ``*.crdownload`` names, which copy tools use while writing, are never taken.
2. **taken**: moved to ``OUT/watched/a/IM1.dcm`` (a rename on the same disk; across disks a copy
   that is renamed into place, then the original removed). The drop folder therefore only ever
   holds files not yet taken; a later file with the same name gets ``IM1~1.dcm``.
3. **processed**: submitted to the :class:`~spine_edge.service.worker.InferenceWorker`, whose record
   (``source`` = the taken path, ``origin`` = ``watch``) lands in ``OUT/results.jsonl``.

Restarts: files under ``OUT/watched`` without a record in results.jsonl (taken, then the process
stopped or was killed) are submitted again first; a file with a record is never submitted again,
whatever its status, so no input ever gets two records. Remove it from ``OUT/watched`` and drop it
in again to retry one that failed.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from spine_edge.errors import SpineEdgeError
from spine_edge.infer import JSONL_NAME
from spine_edge.results import read_jsonl
from spine_edge.service.worker import InferenceWorker, QueueFull, WorkerNotRunning

log = logging.getLogger(__name__)

#: Folder under the output folder that holds taken inputs.
WATCHED_DIR = "watched"
#: Name endings copy tools use for files still being written.
_PARTIAL_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload", ".filepart")


@dataclass(frozen=True)
class WatchConfig:
    """How to watch a drop folder.

    Attributes:
        folder: The drop folder (scanned recursively).
        interval: Seconds between scans.
        settle: Seconds a file's size and modification time must stay unchanged before it is taken.
    """

    folder: Path
    interval: float = 1.0
    settle: float = 2.0

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.settle < 0:
            raise ValueError(f"interval must be positive and settle non-negative, got {self.interval}, {self.settle}")


def _candidate(name: str) -> bool:
    return not name.startswith(".") and not name.lower().endswith(_PARTIAL_SUFFIXES)


class FolderWatcher:
    """Feeds complete files of a drop folder to a running worker; see the module docstring.

    Args:
        config: The folder and timings.
        worker: A started worker; taken files go under its output folder.
    """

    def __init__(self, config: WatchConfig, worker: InferenceWorker) -> None:
        self.config = config
        self.folder = config.folder.absolute()
        self.worker = worker
        self.taken_dir = worker.out / WATCHED_DIR
        self._seen: dict[Path, tuple[int, int, float]] = {}
        self._backlog: list[Path] = []
        if self.worker.out.is_relative_to(self.folder) or self.folder.is_relative_to(self.worker.out):
            raise SpineEdgeError(
                f"the output folder {self.worker.out} and the drop folder {self.folder} overlap; "
                "keep them apart so results are never taken as inputs"
            )

    def recover(self) -> int:
        """Queue again the taken files that have no record (the last run stopped first); returns how many."""
        recorded = {record["source"] for record in read_jsonl(self.worker.out / JSONL_NAME)}
        pending = (
            sorted(
                path
                for path in self.taken_dir.rglob("*")
                if path.is_file() and _candidate(path.name) and str(path) not in recorded
            )
            if self.taken_dir.is_dir()
            else []
        )
        self._backlog.extend(pending)
        if pending:
            log.info(
                "%d taken files have no record yet (the last run stopped early); processing them first", len(pending)
            )
        return len(pending)

    def scan_once(self, now: float | None = None) -> int:
        """Submit the backlog, then take and submit the files that became complete; returns files submitted."""
        submitted = self._submit_backlog()
        if self._backlog:
            return submitted  # the queue is full: leave new files in the drop folder for now
        now = time.monotonic() if now is None else now
        for path in self._complete_files(now):
            if self.worker.stats().queued >= self.worker.config.queue_size:
                break
            taken = self._take(path)
            if taken is not None:
                self._backlog.append(taken)
                submitted += self._submit_backlog()
        return submitted

    def run(self, stop: threading.Event) -> None:
        """Recover, then scan every ``interval`` seconds until ``stop`` is set."""
        self.recover()
        log.info(
            "watching %s every %g s (files complete after %g s unchanged)",
            self.folder,
            self.config.interval,
            self.config.settle,
        )
        while not stop.is_set():
            try:
                self.scan_once()
            except WorkerNotRunning:
                return  # the service is stopping
            except OSError as exc:  # a share that went away must not end the watch
                log.warning("cannot scan %s (%s); trying again", self.folder, exc.strerror or exc)
            stop.wait(self.config.interval)

    def _submit_backlog(self) -> int:
        count = 0
        while self._backlog:
            try:
                self.worker.submit(
                    self._backlog[0],
                    origin="watch",
                    meta={"relative": self._backlog[0].relative_to(self.taken_dir).as_posix()},
                )
            except QueueFull:
                break
            self._backlog.pop(0)
            count += 1
        return count

    def _complete_files(self, now: float) -> list[Path]:
        """Files whose size and mtime have not changed for ``settle`` seconds, oldest observation first."""
        present: dict[Path, tuple[int, int]] = {}
        for root, dirs, files in os.walk(self.folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if not _candidate(name):
                    continue
                path = Path(root) / name
                try:
                    info = path.stat()
                except FileNotFoundError:
                    continue
                if os.path.isfile(path):
                    present[path] = (info.st_size, info.st_mtime_ns)
        ready = []
        for path, (size, mtime) in present.items():
            previous = self._seen.get(path)
            if previous is None or previous[:2] != (size, mtime):
                self._seen[path] = (size, mtime, now)
            elif now - previous[2] >= self.config.settle:
                ready.append(path)
        for path in set(self._seen) - set(present):
            del self._seen[path]
        return ready

    def _take(self, path: Path) -> Path | None:
        """Move a complete file under ``OUT/watched``; None if it vanished or cannot be moved."""
        target = self.taken_dir / path.relative_to(self.folder)
        try:
            info = path.stat()
        except FileNotFoundError:
            return None
        if target.is_file() and (target.stat().st_size, target.stat().st_mtime_ns) == (info.st_size, info.st_mtime_ns):
            # A cross-disk take that stopped between the copy and removing the original.
            path.unlink(missing_ok=True)
            self._seen.pop(path, None)
            return None
        target = _free_name(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            try:
                os.rename(path, target)
            except OSError as exc:
                if exc.errno != errno.EXDEV:  # another disk; anything else is a real failure
                    raise
                partial = target.with_name(f".{target.name}.part")
                shutil.copy2(path, partial)
                os.replace(partial, target)
                path.unlink()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot take a file from the drop folder (%s); it stays there", exc.strerror or exc)
            return None
        finally:
            self._seen.pop(path, None)
        return target


def _free_name(target: Path) -> Path:
    """``target``, or ``stem~N.suffix`` for the first N that is free."""
    if not target.exists():
        return target
    for n in range(1, 100_000):
        candidate = target.with_name(f"{target.stem}~{n}{target.suffix}")
        if not candidate.exists():
            return candidate
    raise SpineEdgeError(f"{target.parent}: too many files named {target.name}; empty the watched folder")
