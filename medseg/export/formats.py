"""What ``medseg export`` writes, without importing torch (the command line's choices)."""

from __future__ import annotations

# Network formats written by ``medseg.export.networks``, with the weights-file suffix each
# gets in the exported model folder (``medseg.model`` loads a folder by that suffix).
NETWORK_FORMATS: dict[str, str] = {"torchscript": ".ts", "onnx": ".onnx"}

# Every ``medseg export --format``: the network formats and a MONAI bundle (``medseg.export.bundle``).
EXPORT_FORMATS: tuple[str, ...] = (*NETWORK_FORMATS, "bundle")
