"""The OpenVINO engine: the network converted to OpenVINO IR (cached) and compiled for the CPU.

OpenVINO is the optional extra ``medseg[openvino]``; it is imported here, when an OpenVINO
engine is made, and nowhere else.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from medseg.errors import ConfigError
from medseg.inference.engines.cache import cached, entry_key, weights_hash
from medseg.inference.engines.torch_engine import check_conversion, conversion_failed, folded_copy
from medseg.model import Model

logger = logging.getLogger(__name__)

EXTRA = "medseg[openvino]"
_IR_FILES = ("model.xml", "model.bin")
_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


def import_openvino() -> ModuleType:
    """The openvino module; ConfigError naming the extra to install when it is missing."""
    try:
        import openvino
    except ImportError as err:
        raise ConfigError(
            f"--engine openvino needs OpenVINO, which is not installed; pip install '{EXTRA}' "
            "(or use --engine auto, which runs without it)"
        ) from err
    return openvino


@functools.cache
def _core() -> Any:  # openvino.Core, one per process (it owns the CPU plugin and its threads)
    return import_openvino().Core()


class OpenVinoEngine:
    """``model``'s network compiled by OpenVINO for the CPU, with dynamic batch, height and width.

    One dynamic-shape compile serves every input shape: compiling per shape (reshaped to it,
    with the batch dynamic or fixed) ran within 3% of it on every shape measured (512x512
    batch 1, 64x48 batches of 7 and 40, base 16 and 32, 2-core avx2 CPU) while each compile
    costs 0.15-0.6 s, and the bundled ensemble's batches come in one shape per scan.

    Shapes: (N, C, H, W) float32 on any device -> (N, classes, H, W) float32 logits on that
    device (OpenVINO runs on the CPU; a CUDA tensor goes there and back).
    """

    name = "openvino"

    def __init__(self, model: Model, device: torch.device, precision: str) -> None:
        ov = import_openvino()
        if device.type != "cpu":
            logger.warning(
                "%s: OpenVINO runs on the CPU here, not on %s (use --engine torch or auto to run on the GPU)",
                model.folder,
                device,
            )
        network = _read_or_convert(ov, model)
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            # The thread budget PyTorch has here (set by the caller or by sharded runs), so the
            # engine competes for cores the way the PyTorch network does.
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            # Pinning would tie every shard's threads to the same first cores (each process
            # pins independently) and keep medseg's reader and writer threads off them.
            # OpenVINO has no setting for its idle threads' spinning (TBB spins briefly, then
            # sleeps): benchmarks/engine_agreement.py times whole runs with reader and writer.
            "ENABLE_CPU_PINNING": False,
            "INFERENCE_PRECISION_HINT": _HINTS.get(precision, "f32"),
        }
        self.compiled = _core().compile_model(network, "CPU", config)
        # What OpenVINO actually runs: it falls back to f32 where the CPU lacks bf16/f16.
        actual = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = {ov.Type.bf16: "bf16", ov.Type.f16: "fp16"}.get(actual, "fp32")
        if self.precision != precision:
            logger.warning(
                "%s: OpenVINO runs %s on this CPU, not %s as asked (no native %s arithmetic here)",
                model.folder,
                self.precision,
                precision,
                precision,
            )
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # an infer request serves one call at a time

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float32 -> (N, classes, H, W) float32 logits, on ``x``'s device."""
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        with self._lock:
            # The input is read in place; the output is copied out of the request's buffer.
            logits = self._request.infer({0: array}, share_inputs=True)[0]
        return torch.from_numpy(logits).to(x.device)


def _read_or_convert(ov: ModuleType, model: Model) -> Any:
    """``model``'s network as an OpenVINO model: an ONNX file read as it is; a PyTorch or
    TorchScript network converted (BatchNorm folded first) and kept in the cache as IR."""
    from medseg.networks.onnx_runtime import OnnxNetwork

    network = model.network
    if isinstance(network, OnnxNetwork):  # read directly (0.3 s), exported with dynamic N/H/W
        return _core().read_model(str(network.path))
    key = entry_key(
        engine="openvino",
        version=ov.get_version(),
        weights=weights_hash(network),
        network=type(network).__qualname__,
        layout=dataclasses.asdict(model.spec.network),
    )

    def write(tmp: Path) -> None:  # weights kept float32: fp16 compression would change the logits
        ov.save_model(_convert(ov, model), str(tmp / "model.xml"), compress_to_fp16=False)

    folder = cached(key, _IR_FILES, write, f"{model.folder} (OpenVINO)")
    if folder is None:
        return _convert(ov, model)
    return _core().read_model(str(folder / "model.xml"))


def _convert(ov: ModuleType, model: Model) -> Any:
    """Convert ``model``'s torch network and check it against PyTorch at another shape than
    the one traced (a size baked into the graph by mistake would show there)."""
    network = folded_copy(model.network)
    channels = model.spec.network.in_channels
    multiple = 2**model.spec.network.depth
    example = torch.zeros(1, channels, 2 * multiple, 2 * multiple)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.jit's deprecation and tracer notices
            # Traced here without torch.jit's trace check (which reruns the network three
            # times): 1-2 s for the conversion instead of 9.
            if not isinstance(network, torch.jit.ScriptModule):
                network = torch.jit.trace(network, example, check_trace=False)
            converted = ov.convert_model(
                network, example_input=example, input=[ov.PartialShape([-1, channels, -1, -1])]
            )
    except Exception as err:  # the converter raises many types; the message says what failed
        raise conversion_failed(model, "OpenVINO", err) from err
    compiled = _core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    check_conversion(model, lambda x: torch.from_numpy(compiled({0: x.numpy()})[0]), "OpenVINO")
    return converted
