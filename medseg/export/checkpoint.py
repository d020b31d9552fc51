"""MONAI (or plain PyTorch) checkpoints into medseg model folders.

A checkpoint is a state dict of a network medseg knows (``medseg.networks.NETWORKS``), as
``torch.save(net.state_dict())`` writes it, or wrapped the way training tools save one
(``{"model": sd, "optimizer": ...}`` from MONAI's CheckpointSaver or medseg's trainer,
``{"network": sd}``, ``{"state_dict": sd}``), possibly with the ``module.`` prefix of
DistributedDataParallel. The network's layout is read from the tensor shapes; what the tensors
cannot tell (labels, intensity preset, slice axis, window, context) the caller states.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from medseg.errors import ConfigError, ModelError
from medseg.export.folders import check_output_folder, staged_folder
from medseg.io.files import file_digest
from medseg.model import load_model, read_plain_checkpoint, save_model, state_mismatch
from medseg.networks import NETWORKS, build_network
from medseg.spec import MAX_DEPTH, ModelLayout, ModelSpec, NetworkSpec, labels_from_names

logger = logging.getLogger(__name__)

# Keys under which training tools store the network's state dict beside optimiser state:
# MONAI's CheckpointSaver uses the save_dict's names (commonly "model" or "network"), medseg's
# trainer "model", Lightning and many scripts "state_dict".
WRAPPER_KEYS = ("model", "network", "net", "state_dict")
# Key prefixes of wrapped networks: DistributedDataParallel / DataParallel, torch.compile.
PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class Checkpoint:
    """A network state dict as found in a checkpoint file, and how it was unwrapped."""

    state: dict[str, torch.Tensor]
    key: str | None  # the wrapper key it was stored under, None for a bare state dict
    prefixes: tuple[str, ...]  # key prefixes removed, in order


def read_checkpoint(path: Path) -> Checkpoint:
    """The network state dict in ``path`` (see the module docstring for the forms accepted),
    loaded with ``weights_only=True`` only; ModelError naming ``path`` otherwise."""
    content = read_plain_checkpoint(path)
    key = None
    if isinstance(content, dict) and not _is_state_dict(content):
        key = next((k for k in WRAPPER_KEYS if _is_state_dict(content.get(k))), None)
        if key is None:
            entries = sorted(str(k) for k in content)[:8]
            raise ModelError(
                path,
                f"holds no network state dict: neither the file nor an entry {list(WRAPPER_KEYS)} is a "
                f"dict of tensors (entries: {entries})",
                "save the network's state_dict() (torch.save(net.state_dict(), 'model.pt'))",
            )
        content = content[key]
    if not _is_state_dict(content):
        raise ModelError(path, f"holds a {type(content).__name__}, not a network state dict", "save net.state_dict()")
    state, removed = dict(content), []
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
            removed.append(prefix)
    return Checkpoint(state, key, tuple(removed))


def _is_state_dict(value: object) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def infer_network(state: Mapping[str, torch.Tensor], path: Path, name: str | None = None) -> NetworkSpec:
    """The NetworkSpec whose network has exactly ``state``'s tensors (names and shapes).

    Input channels and ``base_channels`` come from the first convolution's weight (out, in,
    k, k), output channels from the last one's; the network (``name``, or each of ``NETWORKS``
    in turn) and depth are found by building candidates on the meta device (no memory) and
    comparing their state dicts. ModelError naming ``path`` and the closest candidate's
    differences when none fits.
    """
    if name is not None and name not in NETWORKS:
        raise ConfigError(f"unknown network {name!r}; medseg knows {sorted(NETWORKS)}")
    convs = [v for v in state.values() if v.ndim == 4 and v.is_floating_point()]
    if not convs:
        raise ModelError(path, "holds no 2D convolution weights", "import the state dict of a 2D U-Net")
    in_channels, base, out_channels = convs[0].shape[1], convs[0].shape[0], convs[-1].shape[0]
    closest: tuple[int, NetworkSpec, nn.Module] | None = None
    for candidate in [name] if name else list(NETWORKS):
        for depth in range(1, MAX_DEPTH + 1):
            try:
                spec = NetworkSpec(candidate, in_channels, out_channels, base, depth)
            except ConfigError:  # wider than medseg allows: deeper ones are wider still
                break
            with torch.device("meta"):
                network = NETWORKS[candidate](spec)
            if state_mismatch(state, network) is None:
                return spec
            shared = len(set(state) & set(network.state_dict()))
            if closest is None or shared > closest[0]:
                closest = (shared, spec, network)
    if closest is None:
        raise ModelError(path, f"has a first convolution of {base} channels, too wide for medseg", "check the file")
    _, spec, network = closest
    layout = (
        f"{spec.name}(in={spec.in_channels}, out={spec.out_channels}, base={spec.base_channels}, depth={spec.depth})"
    )
    raise ModelError(
        path,
        f"does not fit {name or 'a network medseg knows'}; the closest, {layout}, differs by "
        f"{state_mismatch(state, network)}",
        f"medseg imports state dicts of {' and '.join(sorted(NETWORKS))}; MonaiUNet is MONAI's 2D UNet with "
        "channels base*2**k, strides 2, two residual units and batch norm"
        + ("" if name else "; pass --network to pick one"),
    )


def import_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    labels: Sequence[str],
    *,
    preset: str,
    slice_axis: str,
    network: str | None = None,
    window: tuple[int, int] = (512, 512),
    spacing: tuple[float, float] | None = None,
    context_slices: int = 0,
    postprocess: str = "none",
    name: str | None = None,
    overwrite: bool = False,
) -> ModelSpec:
    """Write the model folder ``output`` (safetensors weights and model.json) from the
    network state dict in ``checkpoint``.

    ``labels`` name the network's output channels in order, background first (values 0..n-1).
    The network's name (unless given), input and output channels, base channels and depth are
    read from the tensors; its input channels must be the scan's channels times
    ``2 * context_slices + 1``. ``preset``, ``slice_axis``, ``window``, ``spacing``,
    ``context_slices`` and ``postprocess`` mean what they do in model.json and must be those the
    network was trained with: a checkpoint does not record them. Provenance records the file
    and its sha256. ``output`` must be absent or empty unless ``overwrite``; it is written under
    a temporary name and renamed. Returns the spec written.
    """
    path, output = Path(checkpoint), Path(output)
    if not path.is_file():
        raise ModelError(path, "does not exist or is not a file", "give the checkpoint file (e.g. model.pt)")
    check_output_folder(output, overwrite)
    found = read_checkpoint(path)
    net = infer_network(found.state, path, network)
    names = [n.strip() for n in labels if n.strip()]
    if len(names) != net.out_channels:
        raise ModelError(
            path,
            f"holds a network with {net.out_channels} output channels, but {len(names)} labels are named "
            f"({', '.join(names)})",
            f"name {net.out_channels} labels, one per output channel, background first",
        )
    image_channels, rest = divmod(net.in_channels, 2 * context_slices + 1)
    if rest or image_channels < 1:
        raise ModelError(
            path,
            f"holds a network with {net.in_channels} input channels, which is not a multiple of "
            f"2 * context_slices + 1 = {2 * context_slices + 1}",
            "pass the --context-slices the network was trained with",
        )
    layout = ModelLayout(
        network=net.name,
        base_channels=net.base_channels,
        depth=net.depth,
        preset=preset,
        slice_axis=slice_axis,
        spacing=spacing,
        window=tuple(window),
        context_slices=context_slices,
    )
    spec = layout.to_spec(labels_from_names(names), image_channels, name or output.resolve().name)
    provenance = {
        # A checkpoint is what training wrote; medseg cannot check it, so it records the source.
        "trained": True,
        "imported_from": str(path.resolve()),
        "imported_sha256": file_digest(path),
        "checkpoint_key": found.key,
        "stripped_prefixes": list(found.prefixes),
    }
    spec = replace(spec, postprocess=postprocess, provenance=provenance)
    built = build_network(net)
    built.load_state_dict(found.state, strict=True)  # infer_network proved the exact fit
    with staged_folder(output) as tmp:
        saved = save_model(tmp, spec, built)
        load_model(tmp)  # the folder loads as medseg segment will load it
    logger.debug("imported %s as %s (%s)", path, output, net)
    return saved
