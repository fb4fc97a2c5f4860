"""Peak GPU memory through NVML (``nvidia-ml-py``), sampled in a thread while a block runs.

NVML answers in microseconds from the driver, without spawning ``nvidia-smi`` per sample, and can
attribute memory to this process (``nvmlDeviceGetComputeRunningProcesses``), which the device-wide
figure cannot: on a shared box other processes' allocations land in it. In some containers NVML
sees no processes; the process figure is then None and the device-wide rise is what is left.

``pynvml`` is imported lazily; without it, or without an NVIDIA driver, the sampler is inactive and
reports None, so callers on a CPU box need no special case.

Example:
    >>> with GpuMemorySampler(device=0) as memory:  # doctest: +SKIP
    ...     run_the_model()
    >>> memory.report().peak_process_mib  # doctest: +SKIP
    812.0
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from spine_edge.errors import MissingDependencyError
from spine_edge.support import import_optional

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

_MIB = float(1 << 20)


def load_nvml() -> Any:
    """pynvml, initialised (call ``nvmlShutdown`` when done), or None without it or an NVIDIA driver."""
    try:
        nvml = import_optional("pynvml", "gpu", "GPU memory measurement")
    except MissingDependencyError as exc:
        log.debug("%s", exc)
        return None
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        log.debug("NVML did not start (%s): no GPU memory figures", exc)
        return None
    return nvml


@dataclass(frozen=True)
class GpuMemoryReport:
    """What a :class:`GpuMemorySampler` saw.

    Attributes:
        device: GPU index sampled.
        name: GPU name, or empty when NVML was unavailable.
        total_mib: The GPU's memory.
        baseline_mib: Device-wide used memory when sampling started.
        peak_mib: Largest device-wide used memory seen.
        peak_rise_mib: ``peak_mib - baseline_mib`` (what the block added, if nothing else ran).
        peak_process_mib: Largest memory NVML attributed to the sampled process (None: not attributable).
        samples: Samples taken.
    """

    device: int
    name: str = ""
    total_mib: float | None = None
    baseline_mib: float | None = None
    peak_mib: float | None = None
    peak_rise_mib: float | None = None
    peak_process_mib: float | None = None
    samples: int = 0

    @property
    def available(self) -> bool:
        """Whether NVML answered at all."""
        return self.peak_mib is not None


class GpuMemorySampler:
    """Samples one GPU's used memory (device-wide and this process's) in a thread while active.

    Args:
        device: GPU index (NVML order, which matches CUDA's with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``).
        interval_s: Seconds between samples.
        pid: Process whose memory is attributed (default: this one).
    """

    def __init__(self, device: int = 0, interval_s: float = 0.02, pid: int | None = None) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.device = device
        self.interval_s = interval_s
        self.pid = os.getpid() if pid is None else pid
        self._nvml: Any = None
        self._handle: Any = None
        self._name = ""
        self._total: float | None = None
        self._baseline: float | None = None
        self._peak: float | None = None
        self._peak_process: float | None = None
        self._samples = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self._nvml = load_nvml()
        if self._nvml is None:
            return self
        try:
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(self.device)
            name = self._nvml.nvmlDeviceGetName(self._handle)
            self._name = name.decode() if isinstance(name, bytes) else str(name)
            info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        except self._nvml.NVMLError as exc:
            log.warning("NVML cannot read GPU %d (%s): no GPU memory figures", self.device, exc)
            self._shutdown()
            return self
        self._total, self._baseline = info.total / _MIB, info.used / _MIB
        self.sample()
        self._thread = threading.Thread(target=self._poll, name="spine-edge-nvml", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._nvml is not None:
            self.sample()
            self._shutdown()

    def _shutdown(self) -> None:
        nvml, self._nvml, self._handle = self._nvml, None, None
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError as exc:
            log.debug("nvmlShutdown failed: %s", exc)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        """Take one sample now (also done at start, every ``interval_s`` and at exit)."""
        nvml, handle = self._nvml, self._handle
        if nvml is None or handle is None:
            return
        try:
            used = nvml.nvmlDeviceGetMemoryInfo(handle).used / _MIB
            mine = [p.usedGpuMemory for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid == self.pid]
        except nvml.NVMLError as exc:
            log.debug("NVML sample failed: %s", exc)
            return
        # usedGpuMemory is None where the driver cannot attribute memory (some containers, WDDM).
        process = sum(m for m in mine if m is not None) / _MIB if any(m is not None for m in mine) else None
        with self._lock:
            self._samples += 1
            self._peak = used if self._peak is None else max(self._peak, used)
            if process is not None:
                self._peak_process = process if self._peak_process is None else max(self._peak_process, process)

    def report(self) -> GpuMemoryReport:
        """What was seen so far (complete after the ``with`` block)."""
        with self._lock:
            rise = None if self._peak is None or self._baseline is None else max(0.0, self._peak - self._baseline)
            return GpuMemoryReport(
                device=self.device,
                name=self._name,
                total_mib=self._total,
                baseline_mib=self._baseline,
                peak_mib=self._peak,
                peak_rise_mib=rise,
                peak_process_mib=self._peak_process,
                samples=self._samples,
            )
