"""ModelSpec: what ``model.json`` holds, the single source of truth about a model.

Input channels, network hyper-parameters, labels (values, names, colours), intensity preset,
slice axis rule, target in-plane spacing, window size and provenance live here and nowhere
else; the reader, predictor, writers and CLI all take them from a ModelSpec.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError

FORMAT_VERSION = 1
SLICE_AXES = ("axial", "coronal", "sagittal", "coarsest")

# Distinct colours for labels 1.. when none are given (Slicer's generic anatomy palette).
DEFAULT_COLORS: tuple[tuple[int, int, int], ...] = (
    (128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79),
    (221, 130, 101), (144, 238, 144), (192, 104, 88), (220, 245, 20), (78, 63, 0),
    (255, 250, 220), (230, 220, 70), (200, 200, 235), (250, 250, 210), (244, 214, 49),
)  # fmt: skip


@dataclass(frozen=True)
class LabelSpec:
    """One output class: the value written in label maps, its name and RGB colour (0-255)."""

    value: int
    name: str
    color: tuple[int, int, int]


@dataclass(frozen=True)
class NetworkSpec:
    """The constructor arguments of the network (see ``medseg.networks.build_network``)."""

    name: str = "ArticleUNet"
    in_channels: int = 1
    out_channels: int = 2
    base_channels: int = 64
    depth: int = 4


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to run a model on a scan; saved as ``model.json`` beside the weights.

    ``labels`` are in network output-channel order: channel i is written as
    ``labels[i].value``. ``slice_axis`` names the anatomical plane the 2D network sees after
    the scan is put in RAS orientation ("coarsest" picks the axis with the largest spacing).
    ``spacing`` is the in-plane spacing (mm) slices are resampled to before the network, or
    None to keep each scan's native spacing. ``window`` is the largest slice (rows, columns
    of the resampled slice) run whole; larger slices use a sliding window of that size.
    ``context_slices`` k feeds each slice with its k neighbours on either side as extra
    channels (2.5D): ``network.in_channels`` is then the scan's channels times 2k+1.
    ``postprocess`` "largest_component" keeps each label's largest 3D component.
    ``members`` names sub-folders holding model folders whose probabilities are averaged (an
    ensemble, e.g. multi-view); the folder then has no weights of its own.
    """

    labels: tuple[LabelSpec, ...]
    network: NetworkSpec = field(default_factory=NetworkSpec)
    preset: str = "mr"
    slice_axis: str = "axial"
    spacing: tuple[float, float] | None = None
    window: tuple[int, int] = (512, 512)
    context_slices: int = 0
    postprocess: str = "none"
    members: tuple[str, ...] = ()
    weights: str = "weights.safetensors"
    weights_sha256: str | None = None
    name: str = "medseg-model"
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        from medseg.inference.postprocess import POSTPROCESS
        from medseg.transforms.presets import PRESETS

        if self.network.out_channels != len(self.labels):
            raise ConfigError(
                f"network.out_channels is {self.network.out_channels} but {len(self.labels)} "
                "labels are listed; they must match (one output channel per label)"
            )
        values = [lab.value for lab in self.labels]
        if len(set(values)) != len(values) or not all(0 <= v <= 255 for v in values):
            raise ConfigError(f"label values must be unique integers in 0..255, got {values}")
        names = [lab.name for lab in self.labels]
        if len(set(names)) != len(names) or not all(names):
            raise ConfigError(f"label names must be unique and non-empty, got {names}")
        for lab in self.labels:
            if len(lab.color) != 3 or not all(0 <= c <= 255 for c in lab.color):
                raise ConfigError(f"label {lab.name!r}: colour must be 3 ints 0..255")
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if any(not m or "/" in m or "\\" in m or m.startswith(".") for m in self.members):
            raise ConfigError(f"members must be plain sub-folder names, got {list(self.members)}")
        if self.postprocess not in POSTPROCESS:
            raise ConfigError(f"unknown postprocess {self.postprocess!r}; choose one of {POSTPROCESS}")
        if self.slice_axis not in SLICE_AXES:
            raise ConfigError(f"unknown slice_axis {self.slice_axis!r}; choose one of {SLICE_AXES}")
        multiple = 2**self.network.depth
        if len(self.window) != 2 or any(w <= 0 or w % multiple for w in self.window):
            raise ConfigError(f"window {self.window} must be two positive multiples of {multiple} (2**depth)")
        if self.context_slices < 0 or self.network.in_channels % (2 * self.context_slices + 1):
            raise ConfigError(
                f"network.in_channels {self.network.in_channels} must be a multiple of "
                f"2*context_slices+1 = {2 * self.context_slices + 1}"
            )
        if self.spacing is not None and (len(self.spacing) != 2 or min(self.spacing) <= 0):
            raise ConfigError(f"spacing must be two positive numbers (mm) or null, got {self.spacing}")

    @property
    def image_channels(self) -> int:
        """Channels the scan itself must have (network input channels without context)."""
        return self.network.in_channels // (2 * self.context_slices + 1)

    @property
    def label_values(self) -> tuple[int, ...]:
        return tuple(lab.value for lab in self.labels)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """Build from parsed JSON, rejecting unknown keys (a typo must not pass silently)."""
        data = dict(data)
        reject_unknown_keys(cls, data, "model.json")
        network = dict(data.pop("network", {}))
        reject_unknown_keys(NetworkSpec, network, "model.json 'network'")
        labels = []
        for item in data.pop("labels", []):
            reject_unknown_keys(LabelSpec, item, "model.json 'labels' entry")
            labels.append(LabelSpec(int(item["value"]), str(item["name"]), tuple(int(c) for c in item["color"])))
        for key in ("spacing", "window", "members"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ConfigError(
                f"model.json format_version {data['format_version']} is newer than this medseg "
                f"reads ({FORMAT_VERSION}); upgrade medseg"
            )
        return cls(labels=tuple(labels), network=NetworkSpec(**network), **data)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelSpec:
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{path}: not a valid model.json ({type(err).__name__}: {err})") from err


@dataclass(frozen=True)
class ModelLayout:
    """A model's shape and how it slices scans, before its labels and scan channels are known.

    What ``medseg init-model``'s options and a training configuration both describe (the
    defaults are init-model's); ``to_spec`` is the one place it becomes a ModelSpec, so the
    two cannot map it differently. Field meanings are ModelSpec's and NetworkSpec's.
    """

    network: str = "ArticleUNet"
    base_channels: int = 64
    depth: int = 4
    preset: str = "mr"
    slice_axis: str = "axial"
    spacing: tuple[float, float] | None = None
    window: tuple[int, int] = (512, 512)
    context_slices: int = 0

    def to_spec(self, labels: tuple[LabelSpec, ...], image_channels: int = 1, name: str = "medseg-model") -> ModelSpec:
        """The ModelSpec of this layout for ``labels`` (one output channel each) and scans of
        ``image_channels`` channels: the network sees each slice with its ``context_slices``
        neighbours on either side, so ``image_channels * (2 * context_slices + 1)`` inputs.
        ModelSpec checks the result (window multiple of 2**depth, preset, slice axis...)."""
        if image_channels < 1:
            raise ConfigError(f"image_channels must be >= 1, got {image_channels}")
        if self.context_slices < 0:
            raise ConfigError(f"context_slices must be >= 0, got {self.context_slices}")
        in_channels = image_channels * (2 * self.context_slices + 1)
        return ModelSpec(
            labels=tuple(labels),
            network=NetworkSpec(self.network, in_channels, len(labels), self.base_channels, self.depth),
            preset=self.preset,
            slice_axis=self.slice_axis,
            spacing=self.spacing,
            window=self.window,
            context_slices=self.context_slices,
            name=name,
        )


def reject_unknown_keys(cls: type, data: dict[str, Any], where: str) -> None:
    """ConfigError naming every key of ``data`` that is not a field of dataclass ``cls``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}")


def labels_from_names(names: list[str]) -> tuple[LabelSpec, ...]:
    """Labels 0..n-1 with default colours (background black) for ``names``."""
    labels = []
    for i, name in enumerate(names):
        color = (0, 0, 0) if i == 0 else DEFAULT_COLORS[(i - 1) % len(DEFAULT_COLORS)]
        labels.append(LabelSpec(i, name.strip(), color))
    return tuple(labels)
