"""What runs the network on slice batches: an *engine* (PyTorch, OpenVINO, ONNX Runtime).

An engine is made once per model (``load_engine``) and then called on slice batches:
(N, C, H, W) float32 on the predictor's device -> (N, classes, H, W) logits as a torch tensor
on that device (float32, or the engine's reduced precision; the predictor casts). It owns
everything about *how* the network runs (precision, memory format, folded BatchNorm, a
converted graph), so the predictor only decides *what* goes through it. ``engine.name`` and
``engine.precision`` say what actually runs.

OpenVINO and ONNX Runtime engines convert the PyTorch network on first use and keep the
result in a cache folder (``medseg.inference.engines.cache``), so later runs start in a
fraction of the time.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from medseg.errors import ConfigError, ModelError
from medseg.inference.engines.torch_engine import TorchEngine, fold_batch_norm
from medseg.inference.options import ENGINES, cpu_has_native_bf16, resolve_precision
from medseg.model import Model

logger = logging.getLogger(__name__)


class Engine(Protocol):
    """(N, C, H, W) float32 -> (N, classes, H, W) logits, on the predictor's device."""

    name: str  # "torch", "openvino" or "onnxruntime": what runs the network
    precision: str  # "fp32", "bf16" or "fp16": the arithmetic it runs in

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def load_engine(model: Model, device: torch.device, precision: str = "auto", engine: str = "auto") -> Engine:
    """The engine that runs ``model``'s network (one model, not an ensemble) on ``device``.

    ``precision`` "auto" is resolved for the device (:func:`resolve_precision`). ``engine``
    "auto" takes the first engine of :func:`auto_engines` that is installed and converts the
    network faithfully, falling back to the next (logged) and finally to PyTorch. A named
    engine that is not installed raises ConfigError naming the extra to install.

    An ONNX model folder is always run by onnxruntime (or OpenVINO when asked for): "torch"
    runs it as ``medseg segment`` always has, through ``OnnxNetwork``.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if model.network is None:
        raise ValueError(f"{model.folder}: an ensemble has one engine per member, not one of its own")
    if engine != "auto":
        made = _make(engine, model, device, precision)
    else:
        made = None
        for name in auto_engines(model, device, precision):
            try:
                made = _make(name, model, device, precision)
                break
            except ConfigError as err:  # not installed: expected, so quiet
                logger.debug("engine auto: %s is not available (%s); trying the next", name, err)
            except ModelError as err:  # a conversion that failed or disagreed: worth knowing
                logger.warning("engine auto: %s; running with the next engine instead", err)
        if made is None:
            made = _make("torch", model, device, precision)
    logger.info("%s: %s engine, %s on %s", model.folder, made.name, made.precision, device)
    return made


def auto_engines(model: Model, device: torch.device, precision: str = "auto") -> tuple[str, ...]:
    """The engines "auto" tries for ``model`` on ``device``, fastest first (torch always last).

    The rule, from ``benchmarks/engines.py`` (RESULTS.md, "Engines"):
    - CUDA: torch. OpenVINO's and ONNX Runtime's CPU builds do not run on NVIDIA GPUs, and
      torch with cuDNN and autocast is what GPUs are fast with.
    - CPU, fp32 (CPUs without native bf16): OpenVINO, then ONNX Runtime, then torch.
      2-core avx2 EPYC (torch with BatchNorm folded and channels-last = 1): the bundled
      ensemble, 4 members x 40 slices of 64x48, OpenVINO 2.12x, onnxruntime 1.91x; base 16
      on one 512x512 slice 1.75x / 1.55x; base 32 1.30x / 1.18x. Labels on the bundled
      model's 40 validation cases: identical to torch fp32 for both.
    - CPU with native bf16 (AVX512-BF16/AMX), precision bf16: OpenVINO bf16 0.26 s against
      torch bf16 autocast 0.31 s (issue 12, base 32, 512x512, 99.94% argmax agreement with
      fp32), then torch; ONNX Runtime has no bf16 and its fp32 is slower than torch's bf16
      there (OpenVINO f32 0.50 s).
    - Any other precision on a CPU (bf16 without native support, fp16): torch, the only
      engine that runs that arithmetic there.
    - A network built in memory rather than loaded from a model folder (no weights file
      digest: training's validation, the MONAI bundle inferer): torch. Its weights change
      between calls, so each would pay a conversion (seconds) and leave a cache entry.
    """
    from medseg.networks.onnx_runtime import OnnxNetwork

    if isinstance(model.network, OnnxNetwork):  # "torch" and "onnxruntime" are the same here
        return ("openvino", "onnxruntime") if device.type == "cpu" else ("onnxruntime",)
    if device.type != "cpu" or not model.weights_digest:
        return ("torch",)
    resolved = resolve_precision(precision, device)
    if resolved == "fp32":
        if isinstance(model.network, torch.jit.ScriptModule):  # onnxruntime cannot take TorchScript
            return ("openvino", "torch")
        return ("openvino", "onnxruntime", "torch")
    if resolved == "bf16" and cpu_has_native_bf16():
        return ("openvino", "torch")
    return ("torch",)


def _make(name: str, model: Model, device: torch.device, precision: str) -> Engine:
    """Engine ``name`` for ``model``; ``precision`` as asked ("auto" or an explicit one)."""
    from medseg.networks.onnx_runtime import OnnxNetwork

    if name == "torch" and isinstance(model.network, OnnxNetwork):
        name = "onnxruntime"  # what has always run an ONNX model folder
    if name == "torch":
        return TorchEngine.create(model.network, device, resolve_precision(precision, device))
    if name == "openvino":
        from medseg.inference.engines.openvino_engine import OpenVinoEngine

        return OpenVinoEngine(model, device, resolve_precision(precision, torch.device("cpu")))
    from medseg.inference.engines.onnxruntime_engine import OnnxRuntimeEngine

    return OnnxRuntimeEngine(model, device, "fp32" if precision == "auto" else precision)


__all__ = ["Engine", "TorchEngine", "auto_engines", "fold_batch_norm", "load_engine"]
