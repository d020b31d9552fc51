"""How to run the network (device, batch size, precision), without importing torch.

The command line validates its options against these names while parsing, before any
model loads; torch is imported only when a device is resolved.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ENGINES = ("auto", "torch", "openvino", "onnxruntime")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

# Called with (slices done, slices in the volume) after each batch.
Progress = Callable[[int, int], None]


def check_device(name: str) -> str:
    """``name`` if it names a device medseg can use ("auto", "cpu", "cuda", "cuda:N")."""
    if not isinstance(name, str) or not DEVICE_PATTERN.match(name):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return name


@dataclass(frozen=True)
class InferenceOptions:
    """How to run the network: ``device`` "auto" picks CUDA when present; ``batch_size`` is
    slices (or sliding windows) per network call, None to size batches by pixel count;
    ``overlap`` is the sliding-window overlap; ``precision`` "bf16"/"fp16" run the network
    in that arithmetic, "fp32" exactly, "auto" decides per machine (:func:`resolve_precision`);
    ``engine`` runs the network with PyTorch, OpenVINO or ONNX Runtime, "auto" picks per
    device (``medseg.inference.engines``)."""

    device: str = "auto"
    batch_size: int | None = None
    overlap: float = 0.25
    precision: str = "auto"
    engine: str = "auto"

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.batch_size is not None and (
            isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")


def resolve_device(name: str) -> torch.device:
    """The device ``name`` stands for, with its index: "auto" -> the current CUDA GPU when
    there is one, else the CPU; "cuda" -> the current GPU ("cuda:0" on most machines), so
    reports say which GPU ran. A GPU that is not there raises ValueError saying what is."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not name.startswith("cuda"):
        return torch.device(name)
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for but PyTorch sees no CUDA GPU; use --device cpu")
    count = torch.cuda.device_count()
    device = torch.device(name)
    if device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.index >= count:
        raise ValueError(
            f"--device {name} was asked for but PyTorch sees {count} GPU(s), cuda:0 to cuda:{count - 1}; "
            "use one of those (CUDA_VISIBLE_DEVICES changes which are seen)"
        )
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), read at run time.

    Where it does not, PyTorch emulates bf16 and runs ~10x slower than fp32 (measured on an
    avx2-only CPU, benchmarks/RESULTS.md), so "auto" must never pick it there.
    """
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    """The arithmetic "auto" stands for on ``device``: bf16 on CPUs with native bf16, fp32 on
    other CPUs; on GPUs bf16 where supported (no overflow risk), else fp16. Others unchanged."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


DEFAULT_INFERENCE = InferenceOptions()
