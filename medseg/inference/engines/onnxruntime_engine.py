"""The ONNX Runtime engine: the network exported to ONNX (cached) and run by onnxruntime.

onnxruntime (with onnx and onnxscript to export) is the optional extra ``medseg[onnx]``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from medseg.errors import ConfigError, ModelError
from medseg.inference.engines.cache import cached, entry_key, weights_hash
from medseg.inference.engines.torch_engine import check_conversion, conversion_failed, folded_copy
from medseg.model import Model
from medseg.networks.onnx_runtime import EXTRA, OnnxNetwork

logger = logging.getLogger(__name__)

_FILES = ("model.onnx",)


def require(*names: str) -> None:
    """ConfigError naming the extra when one of the packages ``names`` cannot be imported."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(
                f"--engine onnxruntime needs {name}, which is not installed; pip install '{EXTRA}' "
                "(or use --engine auto, which runs without it)"
            ) from err


class OnnxRuntimeEngine:
    """``model``'s network run by onnxruntime, always in float32 (onnxruntime has no autocast).

    A PyTorch model is exported with ``medseg export``'s ONNX exporter (BatchNorm folded,
    dynamic batch, height and width) into the cache, checked against PyTorch when exported;
    an ONNX model folder's own network is run as it is. Threads, spinning and the device
    (the CUDA provider where onnxruntime-gpu has it, else the CPU) are ``OnnxNetwork``'s.

    Shapes: (N, C, H, W) float32 on ``device`` -> (N, classes, H, W) float32 logits there.
    """

    name = "onnxruntime"
    precision = "fp32"

    def __init__(self, model: Model, device: torch.device, precision: str) -> None:
        if precision != "fp32":
            logger.warning("%s: onnxruntime runs float32 only; --precision %s does not apply", model.folder, precision)
        network = model.network
        if isinstance(network, torch.jit.ScriptModule):
            raise ModelError(
                model.folder / model.spec.weights,
                "is a TorchScript network, which onnxruntime cannot run",
                "use --engine torch or openvino, or export the PyTorch model folder with 'medseg export --format onnx'",
            )
        if isinstance(network, OnnxNetwork):
            self.network = network.to(device)
            return
        require("onnxruntime")
        path, temporary = _onnx_file(model)
        self.network = OnnxNetwork(path, device)
        if temporary:  # the session holds the network now
            shutil.rmtree(path.parent, ignore_errors=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float32 -> (N, classes, H, W) float32 logits, on ``x``'s device."""
        return self.network(x)


def _onnx_file(model: Model) -> tuple[Path, bool]:
    """The ONNX export of ``model``'s PyTorch network, from the cache or exported into it, and
    whether it is a temporary file instead (the cache cannot be written: delete it after use)."""
    key = entry_key(
        engine="onnxruntime",
        version=importlib.metadata.version("onnxruntime"),
        exporter=_version("onnxscript"),
        weights=weights_hash(model.network),
        network=type(model.network).__qualname__,
        layout=dataclasses.asdict(model.spec.network),
    )
    folder = cached(key, _FILES, lambda tmp: _export(model, tmp / _FILES[0]), f"{model.folder} (ONNX Runtime)")
    if folder is not None:
        return folder / _FILES[0], False
    path = Path(tempfile.mkdtemp(prefix="medseg-onnx-")) / _FILES[0]
    try:
        _export(model, path)
    except BaseException:
        shutil.rmtree(path.parent, ignore_errors=True)
        raise
    return path, True


def _export(model: Model, path: Path) -> None:
    """Export ``model``'s network (BatchNorm folded) to ``path`` and check it against PyTorch."""
    require("onnx", "onnxscript")
    from medseg.export.networks import export_onnx

    multiple = 2**model.spec.network.depth
    # Batch 2 and distinct multiples: torch.export fixes sizes traced at 1 and may tie equal ones.
    example = torch.zeros(2, model.spec.network.in_channels, 3 * multiple, 4 * multiple)
    try:
        export_onnx(folded_copy(model.network), path, example, multiple)
    except Exception as err:  # the exporter raises many types; the message says what failed
        raise conversion_failed(model, "onnxruntime", err) from err
    check_conversion(model, OnnxNetwork(path), "ONNX")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"
