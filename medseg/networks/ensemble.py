"""A model folder's networks as one ``nn.Module``: what a MONAI bundle's ``network_def`` builds.

A medseg model is one 2D network or an ensemble of them, each member with its own slice
axis, window, in-plane spacing and number of context slices (2.5D). MONAI's bundle tools
(``CheckpointLoader``, ``ckpt_export``, ``verify_net_in_out``) expect one network with one
state dict, so :class:`SliceEnsemble` holds the members in a ``ModuleList`` and keeps each
member's layout as plain attributes. Volumes go through
:class:`medseg.inference.bundle.SliceEnsembleInferer`, which gives every member its own
slices; ``forward`` exists for the 2D checks and TorchScript export.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from medseg.spec import NetworkSpec

if TYPE_CHECKING:
    from medseg.model import Model


def member_layout(spec: Any) -> dict[str, Any]:
    """The part of a member's ModelSpec a bundle needs (JSON-ready): its network's
    constructor arguments and how it slices a volume."""
    return {
        "network": {
            "name": spec.network.name,
            "in_channels": spec.network.in_channels,
            "out_channels": spec.network.out_channels,
            "base_channels": spec.network.base_channels,
            "depth": spec.network.depth,
        },
        "slice_axis": spec.slice_axis,
        "window": list(spec.window),
        # Slices that fit it are padded to it, as training padded them (None: unknown).
        "trained_window": None if spec.trained_window is None else list(spec.trained_window),
        "spacing": None if spec.spacing is None else list(spec.spacing),
        "context_slices": spec.context_slices,
    }


def _centre_channels(image_channels: int, context: int, widest: int) -> list[int]:
    """Indices of a member's input channels (``context`` slices each side) inside the stack
    of the widest member (``widest`` each side); stacks are channel-major (see slice_stack)."""
    span = 2 * widest + 1
    return [c * span + widest - context + j for c in range(image_channels) for j in range(2 * context + 1)]


class SliceEnsemble(nn.Module):
    """Members of a medseg model as one module.

    Args:
        members: per member, ``member_layout(spec)``: ``network`` (NetworkSpec fields),
            ``slice_axis``, ``window``, ``spacing`` and ``context_slices``.
        image_channels: channels of the scans (1 for a CT or one MR sequence).

    ``forward``: (N, image_channels * (2K+1), H, W) -> (N, classes, H, W) mean softmax
    probabilities, K the largest ``context_slices`` of the members; each member sees the
    centre 2k+1 slices of the stack it needs. H and W must be multiples of 2**depth.
    """

    def __init__(self, members: Sequence[Mapping[str, Any]], image_channels: int = 1) -> None:
        super().__init__()
        from medseg.networks import build_network

        if not members:
            raise ValueError("SliceEnsemble needs at least one member")
        self.layouts = [dict(m) for m in members]
        specs = [NetworkSpec(**dict(m["network"])) for m in members]
        classes = {s.out_channels for s in specs}
        if len(classes) != 1:
            raise ValueError(f"members must have the same number of output classes, got {sorted(classes)}")
        self.members = nn.ModuleList(build_network(s) for s in specs)
        contexts = [int(m["context_slices"]) for m in members]
        self.widest = max(contexts)
        self.image_channels = int(image_channels)
        self.in_channels = self.image_channels * (2 * self.widest + 1)
        self.out_channels = specs[0].out_channels
        self.channels = [_centre_channels(self.image_channels, k, self.widest) for k in contexts]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(
            (x.shape[0], self.out_channels, x.shape[-2], x.shape[-1]), dtype=torch.float32, device=x.device
        )
        for i, member in enumerate(self.members):
            index = torch.tensor(self.channels[i], dtype=torch.long, device=x.device)
            total = total + torch.softmax(member(x.index_select(1, index)).float(), dim=1)
        return total / len(self.channels)


def _stored_tensors(member: Model) -> dict[str, torch.Tensor]:
    """The member's weights as its safetensors file stores them (empty for other files)."""
    weights = member.folder / member.spec.weights
    if weights.suffix != ".safetensors" or not weights.is_file():
        return {}
    from safetensors.torch import load_file

    return load_file(str(weights))


def slice_ensemble(model: Model) -> tuple[SliceEnsemble, dict[str, torch.Tensor]]:
    """The SliceEnsemble of a loaded model folder (one member for a single network), with its
    weights, and its state dict with tensors as the weights files store them (float16 in
    shipped models: loading casts them to the network's float32, the values medseg runs)."""
    members = model.members or (model,)
    network = SliceEnsemble([member_layout(m.spec) for m in members], image_channels=model.spec.image_channels)
    state = {}
    for i, member in enumerate(members):
        stored = _stored_tensors(member)
        for key, value in member.network.state_dict().items():
            kept = stored.get(key)
            same = kept is not None and kept.shape == value.shape and torch.equal(kept.to(value.dtype), value.cpu())
            state[f"members.{i}.{key}"] = (kept if same else value).detach().cpu().contiguous()
    network.load_state_dict(state)
    return network.eval(), state


def load_slice_ensemble(folder: str | Path) -> SliceEnsemble:
    """The model in ``folder`` (PyTorch weights) as one SliceEnsemble in eval mode: the network
    for :class:`medseg.inference.bundle.SliceEnsembleInferer` in a MONAI workflow."""
    from medseg.model import load_model

    return slice_ensemble(load_model(Path(folder)))[0]
