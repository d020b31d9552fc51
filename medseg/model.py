"""Model folders: ``model.json`` (a ModelSpec) plus the weights it names.

The weights file's suffix decides how it loads: ``.safetensors`` (preferred) or ``.pt``/``.pth``
hold a state dict for the network model.json describes (a ``.pt`` is loaded with
``weights_only=True``: medseg never unpickles arbitrary objects from a model folder);
``.ts`` is a TorchScript network and ``.onnx`` an ONNX network run by onnxruntime (both written
by ``medseg export``; they carry their own layout, so model.json's network is a record of it).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from medseg.errors import ConfigError, ModelError
from medseg.io.files import file_digest
from medseg.spec import ModelSpec

if TYPE_CHECKING:  # torch loads with the first network, so reading model.json stays instant
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

SPEC_FILE = "model.json"

# Weights-file suffixes: a state dict for the network model.json describes, or a whole
# exported network (TorchScript, ONNX) that needs no network code to run.
STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth")
TORCHSCRIPT_SUFFIX = ".ts"
ONNX_SUFFIX = ".onnx"


@dataclass(frozen=True)
class Model:
    """A network with its specification and the folder it came from; for an ensemble,
    ``network`` is None and ``members`` holds the member models."""

    spec: ModelSpec
    network: nn.Module | None
    folder: Path
    members: tuple[Model, ...] = ()
    weights_digest: str = ""  # sha256 of the weights file as loaded

    @property
    def sha256(self) -> str:
        """Identifies what the model computes: its weights and every setting of model.json that
        changes outputs (slice axis, window, preset, post-processing...; not its name or
        provenance), and for an ensemble all members' and how they are combined. Resume keys
        on it, so editing model.json redoes the scans."""
        import hashlib
        import json

        settings = {k: v for k, v in self.spec.to_dict().items() if k not in _NOT_COMPUTATION}
        parts = [self.weights_digest, json.dumps(settings, sort_keys=True), *(m.sha256 for m in self.members)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()


# model.json entries that do not change what a model computes.
_NOT_COMPUTATION = ("name", "provenance", "weights", "weights_sha256", "format_version")


# Largest magnitude stored as float16 with room to spare (its maximum is 65504).
_HALF_LIMIT = 6e4


def half_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with its float32 tensors stored as float16, halving the file.

    Loading casts them back to the network's float32 parameters, so only the storage
    rounding remains (relative 5e-4). A tensor with values beyond float16's range keeps
    float32 rather than overflowing; integer buffers (BatchNorm's step count) stay as they are.
    """
    import torch

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
        tmp.touch()  # created as any new file is: 0666 less the umask
        mode = tmp.stat().st_mode & 0o777
        save_file(state, str(tmp))
        # safetensors creates its file 0600, but a model folder is shared (other users, batch
        # services): give the weights the same permissions as model.json beside them.
        tmp.chmod(mode)
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
    for member in pytorch_members(
        model,
        "is an exported network (TorchScript or ONNX): its weights cannot be stored as float16",
        "store the PyTorch model folder as float16, then export it",
    ):
        save_model(member.folder, member.spec, member.network, half=True)


def holds_state_dict(spec: ModelSpec) -> bool:
    """Whether ``spec``'s weights file is a state dict (not an exported TorchScript/ONNX network)."""
    return Path(spec.weights).suffix.lower() in STATE_DICT_SUFFIXES


def pytorch_members(model: Model, problem: str, fix: str) -> tuple[Model, ...]:
    """``model``'s networks (its members, or itself), refused with a ModelError naming the
    first exported (TorchScript/ONNX) weights file, ``problem`` and ``fix``, where an
    operation needs PyTorch state dicts (float16 storage, exports, bundles)."""
    members = model.members or (model,)
    for member in members:
        if not holds_state_dict(member.spec):
            raise ModelError(member.folder / member.spec.weights, problem, fix)
    return members


def load_spec(folder: str | Path) -> ModelSpec:
    """The validated ``model.json`` of the model folder ``folder``; ModelError otherwise."""
    folder = Path(folder)
    spec_path = folder / SPEC_FILE
    if not folder.is_dir():
        raise ModelError(folder, "is not a model folder", "create one with 'medseg init-model' or train one")
    if not spec_path.is_file():
        raise ModelError(spec_path, "is missing", "a model folder holds model.json and the weights it names")
    try:
        return ModelSpec.load(spec_path)
    except ConfigError as err:  # its message starts with the path, which ModelError adds
        problem = str(err).removeprefix(f"{spec_path}: ")
        raise ModelError(spec_path, problem, "fix model.json, or re-create the model folder with medseg") from err


def _inside(folder: Path, entry: str, key: str) -> Path:
    """``folder / entry``, refused unless it resolves inside ``folder``: model.json must not
    make medseg read files from elsewhere, through ``..`` or a symbolic link."""
    path = folder / entry
    target = path.resolve()
    if not target.is_relative_to(folder.resolve()):
        raise ModelError(
            folder / SPEC_FILE,
            f"{key} {entry!r} leads outside the model folder (to {target})",
            "copy the file into the model folder instead of linking to it",
        )
    return path


def read_plain_checkpoint(path: Path) -> object:
    """``torch.load`` of ``path`` with ``weights_only=True``: tensors, dicts, lists, numbers and
    strings only. ModelError naming ``path`` for pickled objects or a damaged file."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for pickled objects, RuntimeError for corrupt zips
        raise ModelError(
            path,
            f"was refused: it is not a plain tensor state dict ({type(err).__name__}). "
            "medseg loads "
            "checkpoints with weights_only=True and never unpickles arbitrary objects",
            "convert it to safetensors from a trusted environment",
        ) from err


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    import torch

    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelError(path, f"is not a readable safetensors file ({err})", "re-copy the model") from err
    state = read_plain_checkpoint(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(path, "does not hold a state dict of tensors", "save network.state_dict()")
    return state


def state_mismatch(state: Mapping[str, torch.Tensor], network: nn.Module) -> str | None:
    """What keeps ``state`` from loading strictly into ``network`` (shape mismatches, missing and
    unexpected tensors, one example each), or None when it fits."""
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
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
    return "; ".join(details) or None


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> Model:
    """Load the model in ``folder`` in eval mode on ``device``; ModelError on any mismatch."""
    folder = Path(folder)
    spec = load_spec(folder)
    if spec.members:
        return _load_ensemble(folder, spec, device)
    weights = _inside(folder, spec.weights, "weights")
    if not weights.is_file():
        raise ModelError(
            weights,
            "is missing (model.json names it as the weights file)",
            "re-copy the model folder",
        )
    digest = file_digest(weights)
    if spec.weights_sha256 and digest != spec.weights_sha256:
        raise ModelError(
            weights,
            "does not match the checksum in model.json (changed or corrupted after saving)",
            "re-copy the model folder, or re-save it with medseg",
        )
    suffix = weights.suffix.lower()
    if suffix == TORCHSCRIPT_SUFFIX:
        network = _load_torchscript(weights)
    elif suffix == ONNX_SUFFIX:
        from medseg.networks.onnx_runtime import OnnxNetwork

        network = OnnxNetwork(weights, device)
    elif suffix in STATE_DICT_SUFFIXES:
        network = _load_state_dict_network(folder, spec, weights)
    else:
        raise ModelError(
            folder / SPEC_FILE,
            f"weights {spec.weights!r} has a suffix medseg does not know",
            f"name a {', '.join(STATE_DICT_SUFFIXES)} (state dict), {TORCHSCRIPT_SUFFIX} (TorchScript) "
            f"or {ONNX_SUFFIX} (ONNX) file",
        )
    _check_channels(network, spec, weights)
    network.to(device).eval()
    return Model(spec=spec, network=network, folder=folder, weights_digest=digest)


def _load_state_dict_network(folder: Path, spec: ModelSpec, weights: Path) -> nn.Module:
    """The network model.json describes, with the state dict in ``weights`` loaded strictly.

    The network is built on the meta device (shapes only: no memory, no random
    initialisation) and the file's tensors, converted to its dtypes, become its parameters
    (``assign``): nothing is initialised only to be overwritten, nor copied twice.
    """
    import torch

    from medseg.networks import build_network

    try:
        with torch.device("meta"):
            network = build_network(spec.network)
    except ConfigError as err:  # an unknown network name
        raise ModelError(folder / SPEC_FILE, str(err), "use a network medseg knows") from err
    state = _read_state_dict(weights)
    problem = state_mismatch(state, network)
    if problem:
        raise ModelError(
            weights,
            f"does not fit the network in model.json ({spec.network}): {problem}",
            "the weights belong to another model; use the model.json saved with them",
        )
    network.load_state_dict(_in_network_dtypes(state, network), assign=True)
    if _holds_meta_tensors(network):  # one the file does not hold (a non-persistent buffer): build as usual
        network = build_network(spec.network)
        network.load_state_dict(_in_network_dtypes(state, network), assign=True)
    return network


def _holds_meta_tensors(network: nn.Module) -> bool:
    """Whether a parameter, buffer or plain tensor attribute of ``network`` is still on the
    meta device (has no values)."""
    import torch

    for module in network.modules():
        tensors = (*module.parameters(recurse=False), *module.buffers(recurse=False), *vars(module).values())
        if any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors):
            return True
    return False


def _in_network_dtypes(state: Mapping[str, torch.Tensor], network: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` as new contiguous tensors of ``network``'s dtypes, each value what
    ``load_state_dict``'s copy would give (float16 -> float32 is exact).

    float16/float32 -> float32 goes through numpy: one thread and vectorised, about 4x faster
    than torch's copy on a CPU (and 10x where OpenMP threads compete with other processes),
    which made the half-precision shipped weights the slowest part of loading a model.
    """
    import numpy as np
    import torch

    expected = network.state_dict()
    out = {}
    for key, value in state.items():
        target = expected[key]
        fresh = torch.empty(value.shape, dtype=target.dtype)  # a freshly built network is on the CPU
        if target.dtype == torch.float32 and value.dtype in (torch.float16, torch.float32):
            np.copyto(fresh.numpy(), value.detach().cpu().numpy(), casting="same_kind")
        else:
            fresh.copy_(value)
        out[key] = fresh
    return out


def _load_torchscript(path: Path) -> nn.Module:
    """The TorchScript network in ``path``. TorchScript runs the code stored in the file (in its
    own interpreter, not Python's): model.json's checksum guards against damage, not against a
    file crafted by someone else, so load only exports you trust."""
    import torch

    with warnings.catch_warnings():
        # torch.jit is deprecated upstream (torch 2.13); the format still loads and runs.
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning)
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except Exception as err:  # RuntimeError (or a pybind error) for anything not a TorchScript archive
            raise ModelError(
                path,
                f"is not a readable TorchScript file ({type(err).__name__})",
                "re-export it with 'medseg export --format torchscript'",
            ) from err


def _check_channels(network: nn.Module, spec: ModelSpec, weights: Path) -> None:
    """Refuse an exported network whose input or output channels differ from model.json's
    (a state-dict network is built from model.json, so it always agrees)."""
    for key in ("in_channels", "out_channels"):
        found = getattr(network, key, None)
        wanted = getattr(spec.network, key)
        if isinstance(found, int) and found != wanted:
            raise ModelError(
                weights,
                f"has {found} {key.replace('_', ' ')} but model.json says {wanted}",
                "the file belongs to another model; use the model.json exported with it",
            )


def _load_ensemble(folder: Path, spec: ModelSpec, device: str | torch.device) -> Model:
    members = tuple(load_model(_inside(folder, name, "members entry"), device) for name in spec.members)
    for member in members:
        if member.spec.labels != spec.labels or member.spec.preset != spec.preset:
            raise ModelError(
                member.folder / SPEC_FILE,
                f"ensemble member disagrees with {folder / SPEC_FILE} on labels or preset",
                "members must be trained for the same labels with the same intensity preset",
            )
    return Model(spec=spec, network=None, folder=folder, members=members)


def member_name(folder: Path) -> str:
    """A sub-folder name for the model in ``folder`` inside an ensemble: the folder's name (its
    run folder's for a training run's ``RUN/model``), reduced to letters, digits, ``._-``."""
    folder = Path(folder).resolve()
    raw = folder.parent.name if folder.name == "model" else folder.name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw).lstrip(".") or "member"


def build_ensemble(
    members: Mapping[str, Path],
    folder: Path,
    postprocess: str = "none",
    name: str | None = None,
    half: bool = False,
    overwrite: bool = False,
) -> ModelSpec:
    """Write an ensemble model folder averaging the probabilities of ``members``.

    ``members`` maps sub-folder names to model folders; each is copied inside ``folder``
    (so the ensemble is self-contained) and keeps its own network, slice axis, window and
    context. They must be single models with the same labels and intensity preset; this is
    checked before anything is written. The folder is assembled under a temporary name and
    renamed, so a failure leaves nothing behind. ``half`` stores the copies' weights as
    float16. Returns the ensemble's spec.
    """
    import shutil
    import uuid

    folder = Path(folder)
    if len(members) < 2:
        raise ModelError(folder, "an ensemble needs at least two member models", "pass two or more model folders")
    for source in members.values():  # copying a folder into itself never ends
        if Path(source).resolve() == folder.resolve() or Path(source).resolve() in folder.resolve().parents:
            raise ModelError(folder, f"lies inside the member folder {source}", "write the ensemble elsewhere")
    if folder.exists() and not overwrite:
        raise ModelError(folder, "already exists", "choose a new output folder or pass --overwrite")
    specs = {member: load_spec(Path(source)) for member, source in members.items()}
    _check_members(specs, members)
    first = next(iter(specs.values()))
    # The top-level spec carries labels, preset and post-processing; each member its own
    # slice axis, window and context (a member's validation Dice would mislead here).
    spec = replace(
        first,
        network=replace(first.network, in_channels=first.image_channels),
        context_slices=0,
        members=tuple(members),
        postprocess=postprocess,
        weights_sha256=None,
        name=name or first.name,
        provenance={
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "trained": all(s.provenance.get("trained", False) for s in specs.values()),
            **_shared_provenance(list(specs.values())),
            "ensemble_of": {member: str(Path(source).resolve()) for member, source in members.items()},
        },
    )
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.mkdir(parents=True)
        for member, source in members.items():
            shutil.copytree(source, tmp / member)
        spec.save(tmp / SPEC_FILE)
        if half:
            store_half(tmp)
        load_model(tmp)  # everything written loads together
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote ensemble %s of %s", folder, ", ".join(members))
    return spec


# Facts about the training data that hold for an ensemble when every member agrees on them.
_DATA_PROVENANCE = ("manifest", "dataset", "training_cases", "validation_cases")


def _shared_provenance(specs: list[ModelSpec]) -> dict:
    first = specs[0].provenance
    return {
        key: first[key]
        for key in _DATA_PROVENANCE
        if key in first and all(s.provenance.get(key) == first[key] for s in specs)
    }


def _check_members(specs: Mapping[str, ModelSpec], members: Mapping[str, Path]) -> None:
    """Refuse members that cannot be averaged with the first: nested ensembles, other labels
    or another intensity preset (the error names the member's folder)."""
    first_name, first = next(iter(specs.items()))
    for member, spec in specs.items():
        source = Path(members[member])
        if spec.members:
            raise ModelError(source, "is itself an ensemble", "pass its member folders instead")
        if spec.labels != first.labels or spec.preset != first.preset:
            raise ModelError(
                source / SPEC_FILE,
                f"has other labels or another preset than {Path(members[first_name]) / SPEC_FILE}",
                "ensemble members must be trained for the same labels with the same intensity preset",
            )


def init_model(folder: Path, spec: ModelSpec, seed: int = 0, overwrite: bool = True) -> ModelSpec:
    """Write an untrained model folder (seeded initialisation) and return its saved spec.

    ``overwrite=False`` (the command line's default) refuses a folder that already holds a
    model, so a trained model is never replaced by an untrained one by mistake.
    """
    if not overwrite and (Path(folder) / SPEC_FILE).is_file():
        raise ModelError(folder, "already holds a model", "choose a new folder, or pass --overwrite to replace it")
    import torch

    from medseg.networks import build_network

    with torch.random.fork_rng(devices=[]):  # seeded here, no global seeding left behind
        torch.manual_seed(seed)
        network = build_network(spec.network)
    spec = replace(spec, provenance={"trained": False, "init_seed": seed, **spec.provenance})
    return save_model(folder, spec, network)
