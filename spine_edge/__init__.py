"""spine-edge: edge deployment of a spine X-ray triage + lesion-detection cascade.

The runtime (this package) needs numpy, OpenCV, pydicom and an inference backend (ONNX Runtime or
TensorRT); it never imports torch, timm or ultralytics.
"""

from __future__ import annotations

__version__ = "0.1.0"
