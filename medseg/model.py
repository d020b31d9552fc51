"""Model folders: ``model.json`` (a ModelSpec) plus the weights it names.

Weights are safetensors (preferred) or a plain PyTorch state dict loaded with
``weights_only=True``: medseg never unpickles arbitrary objects from a model folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from medseg.errors import ConfigError, ModelError
from medseg.io.files import file_digest
from medseg.networks import build_network
from medseg.spec import ModelSpec

logger = logging.getLogger(__name__)

SPEC_FILE = "model.json"


@dataclass(frozen=True)
class Model:
    """A network with its specification and the folder it came from; for an ensemble,
    ``network`` is None and ``members`` holds the member models."""

    spec: ModelSpec
    network: nn.Module | None
    folder: Path
    members: tuple[Model, ...] = ()

    @property
    def sha256(self) -> str:
        """Identifies the weights (for an ensemble, all members' and how they are combined)."""
        if not self.members:
            return self.spec.weights_sha256 or ""
        import hashlib

        joined = "|".join([*(m.sha256 for m in self.members), self.spec.postprocess])
        return hashlib.sha256(joined.encode()).hexdigest()


# Largest magnitude stored as float16 with room to spare (its maximum is 65504).
_HALF_LIMIT = 6e4


def half_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with its float32 tensors stored as float16, halving the file.

    Loading casts them back to the network's float32 parameters, so only the storage
    rounding remains (relative 5e-4). A tensor with values beyond float16's range keeps
    float32 rather than overflowing; integer buffers (BatchNorm's step count) stay as they are.
    """
    out = {}
    for key, tensor in state.items():
        fits = tensor.dtype == torch.float32 and tensor.numel() > 0 and bool(tensor.abs().max() < _HALF_LIMIT)
        out[key] = tensor.half() if fits else tensor
    return out


def save_model(folder: Path, spec: ModelSpec, network: nn.Module, half: bool = False) -> ModelSpec:
    """Write ``network``'s weights (safetensors) and ``model.json`` to ``folder``.

    ``half`` stores float weights as float16 (see ``half_state``): for shipped models, where
    size matters more than the last bits. Returns the spec as saved (weights file name and
    checksum filled in). Both files are written under temporary names and renamed, so a
    crash never leaves a half-written model.
    """
    from safetensors.torch import save_file

    from medseg.io.files import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "weights.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    if half:
        state = half_state(state)
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
    provenance = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **spec.provenance,
    }
    saved = replace(spec, weights=weights.name, weights_sha256=file_digest(weights), provenance=provenance)
    with atomic_path(folder / SPEC_FILE) as tmp:
        saved.save(tmp)
    return saved


def store_half(folder: Path) -> None:
    """Rewrite the weights of the model (or of every ensemble member) in ``folder`` as float16."""
    model = load_model(folder)
    for member in model.members or (model,):
        save_model(member.folder, member.spec, member.network, half=True)


def load_spec(folder: Path) -> ModelSpec:
    spec_path = folder / SPEC_FILE
    if not folder.is_dir():
        raise ModelError(folder, "is not a model folder", "create one with 'medseg init-model' or train one")
    if not spec_path.is_file():
        raise ModelError(spec_path, "is missing", "a model folder holds model.json and the weights it names")
    try:
        return ModelSpec.load(spec_path)
    except ConfigError as err:
        raise ModelError(spec_path, str(err).removeprefix(f"{spec_path}: ")) from err


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelError(path, f"is not a readable safetensors file ({err})", "re-copy the model") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for pickled objects, RuntimeError for corrupt zips
        raise ModelError(
            path,
            f"was refused: it is not a plain tensor state dict ({type(err).__name__}). "
            "medseg loads "
            "checkpoints with weights_only=True and never unpickles arbitrary objects",
            "convert it to safetensors from a trusted environment",
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(path, "does not hold a state dict of tensors", "save network.state_dict()")
    return state


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> Model:
    """Load the model in ``folder`` in eval mode on ``device``; ModelError on any mismatch."""
    folder = Path(folder)
    spec = load_spec(folder)
    if spec.members:
        return _load_ensemble(folder, spec, device)
    weights = folder / spec.weights
    if not weights.is_file():
        raise ModelError(
            weights,
            "is missing (model.json names it as the weights file)",
            "re-copy the model folder",
        )
    if spec.weights_sha256 and file_digest(weights) != spec.weights_sha256:
        raise ModelError(
            weights,
            "does not match the checksum in model.json (changed or corrupted after saving)",
            "re-copy the model folder, or re-save it with medseg",
        )
    network = build_network(spec.network)
    state = _read_state_dict(weights)
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        details = []
        if wrong:
            k = wrong[0]
            details.append(
                f"{len(wrong)} shape mismatch(es), e.g. {k}: {tuple(state[k].shape)} in file, "
                f"{tuple(expected[k].shape)} expected"
            )
        if missing:
            details.append(f"{len(missing)} missing tensor(s), e.g. {missing[0]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}")
        raise ModelError(
            weights,
            f"does not fit the network in model.json ({spec.network}): " + "; ".join(details),
            "the weights belong to another model; use the model.json saved with them",
        )
    network.load_state_dict(state)
    network.to(device).eval()
    return Model(spec=spec, network=network, folder=folder)


def _load_ensemble(folder: Path, spec: ModelSpec, device: str | torch.device) -> Model:
    members = tuple(load_model(folder / name, device) for name in spec.members)
    for member in members:
        if member.spec.labels != spec.labels or member.spec.preset != spec.preset:
            raise ModelError(
                member.folder / SPEC_FILE,
                f"ensemble member disagrees with {folder / SPEC_FILE} on labels or preset",
                "members must be trained for the same labels with the same intensity preset",
            )
    return Model(spec=spec, network=None, folder=folder, members=members)


def init_model(folder: Path, spec: ModelSpec, seed: int = 0) -> ModelSpec:
    """Write an untrained model folder (seeded initialisation) and return its saved spec."""
    with torch.random.fork_rng(devices=[]):  # seeded here, no global seeding left behind
        torch.manual_seed(seed)
        network = build_network(spec.network)
    spec = replace(spec, provenance={"trained": False, "init_seed": seed, **spec.provenance})
    return save_model(folder, spec, network)
