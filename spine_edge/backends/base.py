"""The backend interface, in the style of Polygraphy's runners.

A backend runs one graph. Public methods check state and delegate to ``_activate``, ``_infer`` and
``_deactivate``; the heavy library (onnxruntime, tensorrt) is imported inside ``_activate`` so that
``import spine_edge`` stays cheap and works without it.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np

from spine_edge.bundle import Role, TensorSpec
from spine_edge.errors import BackendError, SpineEdgeError

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchRange:
    """Batch sizes of an optimisation profile: the engine accepts ``min``…``max``, tuned for ``opt``.

    Used by ``build-engines`` for native TensorRT plans and by ONNX Runtime's TensorRT provider, so
    both build engines for the same batches.
    """

    min: int = 1
    opt: int = 1
    max: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch range needs 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")

    def capped(self, max_batch: int) -> BatchRange:
        """The same range with its largest batch set to ``max_batch`` (``min``/``opt`` lowered to fit)."""
        return BatchRange(min(self.min, max_batch), min(self.opt, max_batch), max_batch)


#: Default profiles: the cascade batches classifier images; the detector sees only gate-positive ones.
DEFAULT_BATCH: dict[Role, BatchRange] = {"classifier": BatchRange(1, 4, 8), "detector": BatchRange(1, 1, 4)}


class Backend(abc.ABC):
    """One graph, loaded by an inference library.

    Use as a context manager; ``infer`` is valid only inside ``with backend:``.

    Example:
        >>> with OnnxRuntimeBackend("runs/bundle/classifier.fp32.onnx") as b:  # doctest: +SKIP
        ...     out = b.infer({"image": batch})
    """

    #: Short name of the library, recorded in results (``onnxruntime``, ``tensorrt``).
    kind: str = ""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._active = False

    @property
    def is_active(self) -> bool:
        """Whether the graph is loaded."""
        return self._active

    def activate(self) -> Self:
        """Load the graph (idempotent)."""
        if not self._active:
            self._activate()
            self._active = True
        return self

    def deactivate(self) -> None:
        """Release the graph and its buffers (idempotent)."""
        if self._active:
            self._active = False
            self._deactivate()

    def __enter__(self) -> Self:
        return self.activate()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.deactivate()
            return
        try:
            self.deactivate()
        except SpineEdgeError as teardown:
            # The error that ended the block is the one to act on; a failed release after it is a consequence.
            log.warning("%s: releasing after an error also failed: %s", self.path.name, teardown)

    def input_specs(self) -> dict[str, TensorSpec]:
        """Input tensors by name; dynamic axes are strings."""
        self._require_active("input_specs")
        return self._input_specs()

    @property
    def output_names(self) -> tuple[str, ...]:
        """Output tensor names, in graph order."""
        self._require_active("output_names")
        return self._output_names()

    @property
    def provider(self) -> str:
        """What actually executes the graph (e.g. ``CPUExecutionProvider``, ``NVIDIA GeForce RTX 3050``)."""
        self._require_active("provider")
        return self._provider()

    @property
    def max_batch(self) -> int | None:
        """Largest batch the graph accepts, or None when the batch axis is unbounded."""
        self._require_active("max_batch")
        return self._max_batch()

    def describe(self) -> str:
        """``kind/provider``, as recorded in results."""
        return f"{self.kind}/{self.provider}"

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch. Call only inside ``with backend:``.

        Args:
            feeds: One array per graph input, with the graph's dtype.

        Returns:
            One array per graph output, owned by the caller.

        Raises:
            BackendError: Missing or mistyped inputs, or the library failed to run.
        """
        self._require_active("infer")
        specs = self._input_specs()
        missing = sorted(set(specs) - set(feeds))
        if missing:
            raise BackendError(f"{self.path.name}: missing inputs {missing}; the graph expects {sorted(specs)}")
        for name, spec in specs.items():
            array = feeds[name]
            if array.dtype != np.dtype(spec.dtype):
                raise BackendError(
                    f"{self.path.name}: input {name!r} has dtype {array.dtype}, the graph expects {spec.dtype}"
                )
            if array.ndim != len(spec.shape):
                raise BackendError(
                    f"{self.path.name}: input {name!r} has shape {array.shape}, the graph expects rank {len(spec.shape)}"
                )
        limit = self._max_batch()
        batch = next(iter(feeds.values())).shape[0]
        if limit is not None and batch > limit:
            raise BackendError(f"{self.path.name}: batch {batch} exceeds the graph's maximum batch {limit}")
        return self._infer({name: feeds[name] for name in specs})

    def _require_active(self, what: str) -> None:
        if not self._active:
            raise BackendError(f"{type(self).__name__}.{what}() needs an active backend: use `with backend:`")

    @abc.abstractmethod
    def _activate(self) -> None: ...

    @abc.abstractmethod
    def _input_specs(self) -> dict[str, TensorSpec]: ...

    @abc.abstractmethod
    def _output_names(self) -> tuple[str, ...]: ...

    @abc.abstractmethod
    def _provider(self) -> str: ...

    @abc.abstractmethod
    def _max_batch(self) -> int | None: ...

    @abc.abstractmethod
    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def _deactivate(self) -> None: ...
