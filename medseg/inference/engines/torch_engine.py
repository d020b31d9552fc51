"""The PyTorch engine, and BatchNorm folding (which every engine converting a torch network
uses before it converts)."""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from medseg.errors import ModelError
from medseg.model import Model

logger = logging.getLogger(__name__)

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Largest |logit difference| a converted network may show against PyTorch on the check input
# (the limit ``medseg export`` applies: float32 reorderings give ~1e-7 to 1.3e-5).
TOLERANCE = 1e-3


def fold_batch_norm(network: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d/ConvTranspose2d in the
    same ``nn.Sequential`` into that convolution (in place; the BatchNorm becomes Identity).

    "Directly follows" includes a BatchNorm that opens the next layer when that layer is
    itself a Sequential, as in MONAI's ``Convolution`` (conv, then an ``ADN`` Sequential whose
    first module is the norm under its default "NDA" order). A norm after the activation
    ("AN" order) is not foldable and is left in place.

    At inference BatchNorm is a fixed per-channel affine map, so it can live in the conv's
    weights and bias: one pass over the feature map fewer per layer (the article's U-Net has a
    BatchNorm after every conv), identical results up to float rounding (~1e-7).
    Changes ``network``; fold a copy (``copy.deepcopy``) to keep the original. Returns
    ``network`` for chaining.
    """
    for module in list(network.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        for i, conv in enumerate(list(module)[:-1]):
            if not isinstance(conv, nn.Conv2d | nn.ConvTranspose2d):
                continue
            owner, index = _leading_batch_norm(module, i + 1)
            if owner is None:
                continue
            transpose = isinstance(conv, nn.ConvTranspose2d)
            module[i] = fuse_conv_bn_eval(conv.eval(), owner[index].eval(), transpose=transpose)
            owner[index] = nn.Identity()
    return network


def _leading_batch_norm(sequential: nn.Sequential, index: int) -> tuple[nn.Sequential | None, int]:
    """The Sequential holding the plain BatchNorm2d that the layer ``sequential[index]`` starts
    with (itself, or the first module of nested Sequentials), and its index there."""
    layer = sequential[index]
    if _plain_batch_norm(layer):
        return sequential, index
    if isinstance(layer, nn.Sequential) and len(layer) > 0:
        return _leading_batch_norm(layer, 0)
    return None, 0


def _plain_batch_norm(module: nn.Module) -> bool:
    """A BatchNorm2d with running statistics (one without them normalises per batch)."""
    return isinstance(module, nn.BatchNorm2d) and module.track_running_stats and module.running_mean is not None


def network_device(network: nn.Module) -> torch.device:
    """Where ``network``'s parameters (or buffers) live; the CPU when it has none."""
    for tensor in itertools.chain(network.parameters(), network.buffers()):
        return tensor.device
    return torch.device("cpu")


def has_batch_norm(network: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in network.modules())


def folded_copy(network: nn.Module) -> nn.Module:
    """An eval-mode copy of ``network`` on the CPU with its BatchNorm folded; ``network`` is
    untouched (training, exports and bundles use the model's own network). A TorchScript
    network is copied as it is."""
    network = copy.deepcopy(network).to("cpu").eval()
    if isinstance(network, torch.jit.ScriptModule) or not has_batch_norm(network):
        return network
    return fold_batch_norm(network)


@dataclass
class TorchEngine:
    """The network run by PyTorch: BatchNorm folded into the convolutions, channels-last
    memory (about 1.3x on CPU with oneDNN, and what cuDNN prefers), autocast for bf16/fp16.

    ``network`` is a private copy (the model's own network is left as it is). TorchScript
    networks are run as they are.
    """

    network: nn.Module
    device: torch.device
    precision: str
    name: str = "torch"

    @classmethod
    def create(cls, network: nn.Module, device: torch.device, precision: str) -> TorchEngine:
        if not isinstance(network, torch.jit.ScriptModule) and has_batch_norm(network):
            network = fold_batch_norm(copy.deepcopy(network).eval())
        network = network.to(device, memory_format=torch.channels_last).eval()
        return cls(network, device, precision)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float32 on ``device`` -> (N, classes, H, W) logits."""
        with torch.autocast(
            self.device.type,
            dtype=_AUTOCAST_DTYPES.get(self.precision, torch.float32),
            enabled=self.precision in _AUTOCAST_DTYPES,
        ):
            return self.network(x.contiguous(memory_format=torch.channels_last))


def conversion_failed(model: Model, engine: str, err: Exception) -> ModelError:
    """The error for a network ``engine``'s converter could not convert (converters raise many
    types; the message says what failed)."""
    return ModelError(
        model.folder,
        f"could not be converted for {engine} ({type(err).__name__}: {str(err).strip()[:300]})",
        "use --engine torch",
    )


def check_conversion(model: Model, run: Callable[[torch.Tensor], torch.Tensor], engine: str) -> None:
    """ModelError unless ``run`` (the converted network) gives ``model``'s PyTorch logits
    within TOLERANCE on a random (3, C, 3m, 5m) input, m = 2**depth: a batch, height and width
    other than the ones a conversion traces with, so a size baked in by mistake shows here."""
    multiple = 2**model.spec.network.depth
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, model.spec.network.in_channels, 3 * multiple, 5 * multiple, generator=generator)
    where = network_device(model.network)
    with torch.no_grad():
        difference = float((run(x).float() - model.network(x.to(where)).float().cpu()).abs().max())
    if not difference <= TOLERANCE:  # also refuses NaN
        raise ModelError(
            model.folder,
            f"its {engine} conversion disagrees with PyTorch: max |logit difference| {difference:.3g} "
            f"on a random {'x'.join(map(str, x.shape))} input, more than {TOLERANCE} allowed",
            "use --engine torch",
        )
