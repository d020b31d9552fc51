"""An ONNX network file run by onnxruntime behind the ``nn.Module`` interface medseg's
predictor calls, so an exported model folder segments exactly as a PyTorch one does.

onnxruntime is the optional extra ``medseg[onnx]``; it is imported here, when an ``.onnx``
model loads, and nowhere else.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from medseg.errors import ModelError

logger = logging.getLogger(__name__)

EXTRA = "medseg[onnx]"


def import_onnxruntime(path: Path) -> ModuleType:
    """The onnxruntime module; ModelError naming ``path`` (the file that needs it) and the
    extra to install when it is missing."""
    try:
        import onnxruntime
    except ImportError as err:
        raise ModelError(
            path,
            "is an ONNX network, and running it needs onnxruntime, which is not installed",
            f"pip install '{EXTRA}'",
        ) from err
    return onnxruntime


class OnnxNetwork(nn.Module):
    """The ONNX network in ``path``, called like the PyTorch network it was exported from.

    Shapes: (N, in_channels, H, W) -> (N, out_channels, H, W) float32 logits on the input's
    device. The input may be channels-last or of any float type: it is handed over as
    contiguous NCHW float32, and the network always runs in float32 (onnxruntime has no
    autocast, so ``--precision bf16/fp16`` does not apply; under an autocast context the
    result is still float32, which the predictor takes as it is).

    It holds no parameters. ``.to(device)`` chooses where onnxruntime runs: CUDA when the
    device is cuda and this onnxruntime has the CUDA provider (onnxruntime-gpu), else the CPU;
    a memory format or dtype given to ``.to`` does not apply. ``in_channels`` and
    ``out_channels`` are read from the file (None where it leaves them symbolic).
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.path = Path(path)
        # A buffer only to follow .to()/.cuda()/.cpu(): forward runs where it lives.
        self.register_buffer("_where", torch.empty(0, device=device), persistent=False)
        self._session_device: torch.device | None = None
        self._session = self._open(torch.device(device))
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or not outputs or len(inputs[0].shape) != 4:
            raise ModelError(
                self.path,
                f"is an ONNX network with {len(inputs)} input(s) and {len(outputs)} output(s); medseg runs "
                "networks with one (N, C, H, W) input and logits as first output",
                "export it with 'medseg export --format onnx'",
            )
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.in_channels = _static(inputs[0].shape[1])
        self.out_channels = _static(outputs[0].shape[1])

    def _open(self, device: torch.device):  # -> onnxruntime.InferenceSession
        ort = import_onnxruntime(self.path)
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
            else:
                logger.warning(
                    "%s: this onnxruntime has no CUDA provider, so the ONNX network runs on the CPU "
                    "(install onnxruntime-gpu to run it on the GPU)",
                    self.path,
                )
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings are about graph details
        # The thread budget PyTorch has here (set by the caller or by sharded runs), so an
        # exported model competes for cores the way the PyTorch one does.
        options.intra_op_num_threads = torch.get_num_threads()
        # Idle onnxruntime threads otherwise spin, taking the cores medseg's reader and writer
        # threads need between batches: 40 hippocampus cases took 16-43 s without spinning
        # against 42-46 s with it, in the same rounds (2-core CPU, benchmarks/export_agreement.py).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as err:  # onnxruntime's own types: InvalidProtobuf, Fail, InvalidGraph...
            first_line = (str(err).strip().splitlines() or [""])[0][:300]
            raise ModelError(
                self.path,
                f"is not an ONNX network onnxruntime can run ({type(err).__name__}: {first_line})",
                "re-export it with 'medseg export --format onnx'",
            ) from err
        self._session_device = device
        return session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, classes, H, W) float32 logits, on ``x``'s device."""
        if self._where.device != self._session_device:  # moved by .to() since the last call
            self._session = self._open(self._where.device)
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self._session.run([self.output_name], {self.input_name: array})
        return torch.from_numpy(logits).to(x.device)

    def extra_repr(self) -> str:
        return f"{self.path}, in_channels={self.in_channels}, out_channels={self.out_channels}"


def _static(size: object) -> int | None:
    """A dimension of an ONNX input/output: its size, or None when symbolic ("batch", "16*kh")."""
    return size if isinstance(size, int) else None
