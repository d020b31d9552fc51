"""ModelSpec: what ``model.json`` holds, the single source of truth about a model.

Input channels, network hyper-parameters, labels (values, names, colours), intensity preset,
slice axis rule, target in-plane spacing, window size and provenance live here and nowhere
else; the reader, predictor, writers and CLI all take them from a ModelSpec.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError

FORMAT_VERSION = 1
SLICE_AXES = ("axial", "coronal", "sagittal", "coarsest")

# Bounds on model.json values. Anything beyond them is a typo or a crafted file, not a model:
# a window past MAX_WINDOW would ask for gigabytes per slice, a label name is written into
# .seg.nrrd headers and .ctbl lines (one per line: a newline would forge header fields).
MAX_WINDOW = 8192
MAX_DEPTH = 8
MAX_CHANNELS = 4096
MAX_WIDTH = 4096  # base_channels * 2**depth: 4096 means ~600 MB for one 3x3 convolution
MAX_CONTEXT_SLICES = 32
MAX_LABEL_NAME = 64
MAX_MODEL_NAME = 256
MAX_NESTING = 32  # levels of JSON nesting in provenance
_SHA256 = re.compile(r"[0-9a-f]{64}")

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

    def __post_init__(self) -> None:
        # The name goes into .seg.nrrd headers, .ctbl lines and DICOM SEG: one line each.
        _check_int(self.value, "label value", 0, 255)
        check_text(self.name, "label name", MAX_LABEL_NAME)
        if not isinstance(self.color, tuple) or len(self.color) != 3:
            raise ConfigError(f"label {self.name!r}: colour must be 3 integers 0..255 (RGB), got {_show(self.color)}")
        for channel in self.color:
            _check_int(channel, f"label {self.name!r} colour", 0, 255)


@dataclass(frozen=True)
class NetworkSpec:
    """The constructor arguments of the network (see ``medseg.networks.build_network``)."""

    name: str = "ArticleUNet"
    in_channels: int = 1
    out_channels: int = 2
    base_channels: int = 64
    depth: int = 4

    def __post_init__(self) -> None:
        # The name is checked against the registry when the network is built: importing the
        # registry here would import torch for every spec (``medseg info`` must stay light).
        check_text(self.name, "network.name", MAX_MODEL_NAME)
        for key in ("in_channels", "out_channels", "base_channels"):
            _check_int(getattr(self, key), f"network.{key}", 1, MAX_CHANNELS)
        _check_int(self.depth, "network.depth", 1, MAX_DEPTH)
        widest = self.base_channels * 2**self.depth
        if widest > MAX_WIDTH:
            raise ConfigError(
                f"network.base_channels {self.base_channels} with depth {self.depth} gives {widest} channels at "
                f"the deepest level (base_channels * 2**depth); at most {MAX_WIDTH}: lower base_channels or depth"
            )


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to run a model on a scan; saved as ``model.json`` beside the weights.

    ``labels`` are in network output-channel order: channel i is written as
    ``labels[i].value``. ``slice_axis`` names the anatomical plane the 2D network sees after
    the scan is put in RAS orientation ("coarsest" picks the axis with the largest spacing).
    ``spacing`` is the in-plane spacing (mm) slices are resampled to before the network, or
    None to keep each scan's native spacing. ``window`` is the largest slice (rows, columns
    of the resampled slice) run whole; larger slices use a sliding window of that size.
    ``trained_window`` is the slice size training fed the network (smaller slices padded to
    it), or None when unknown (an untrained or imported model): inference pads a slice that
    fits it to it, as training did, and any other slice only to a multiple of 2**depth.
    ``context_slices`` k feeds each slice with its k neighbours on either side as extra
    channels (2.5D): ``network.in_channels`` is then the scan's channels times 2k+1.
    ``postprocess`` "largest_component" keeps each label's largest 3D component.
    ``members`` names sub-folders holding model folders whose probabilities are averaged (an
    ensemble, e.g. multi-view); the folder then has no weights of its own.

    Every value is checked on construction, types included (JSON ``"8"`` or ``true`` is no
    count), within the ``MAX_*`` bounds above; ConfigError names the key and the value.
    """

    labels: tuple[LabelSpec, ...]
    network: NetworkSpec = field(default_factory=NetworkSpec)
    preset: str = "mr"
    slice_axis: str = "axial"
    spacing: tuple[float, float] | None = None
    window: tuple[int, int] = (512, 512)
    trained_window: tuple[int, int] | None = None
    context_slices: int = 0
    postprocess: str = "none"
    members: tuple[str, ...] = ()
    weights: str = "weights.safetensors"
    weights_sha256: str | None = None
    name: str = "medseg-model"
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.network, NetworkSpec):
            raise ConfigError(f"network must be a NetworkSpec, got {_show(self.network)}")
        self._check_labels()
        self._check_choices()
        self._check_grid()
        self._check_files()
        check_text(self.name, "name", MAX_MODEL_NAME)
        if not isinstance(self.provenance, dict) or _nesting(self.provenance) > MAX_NESTING:
            raise ConfigError(f"provenance must be a JSON object nested at most {MAX_NESTING} levels deep")
        _check_int(self.format_version, "format_version", 1, 10**6)
        if self.format_version > FORMAT_VERSION:
            raise ConfigError(
                f"format_version {self.format_version} is newer than this medseg reads ({FORMAT_VERSION}); "
                "upgrade medseg"
            )

    def _check_labels(self) -> None:
        if not isinstance(self.labels, tuple) or not all(isinstance(lab, LabelSpec) for lab in self.labels):
            raise ConfigError(f"labels must be a tuple of LabelSpec, got {_show(self.labels)}")
        if self.network.out_channels != len(self.labels):
            raise ConfigError(
                f"network.out_channels is {self.network.out_channels} but {len(self.labels)} "
                "labels are listed; they must match (one output channel per label)"
            )
        values = [lab.value for lab in self.labels]
        if len(set(values)) != len(values):
            raise ConfigError(f"label values must be unique, got {values}")
        names = [lab.name for lab in self.labels]
        if len(set(names)) != len(names):
            raise ConfigError(f"label names must be unique, got {names}")
        from medseg.io.files import sanitise

        # File names (probability maps) and colour tables use the sanitised name: "a b" and
        # "a_b" would write one file over the other.
        safe = [sanitise(n).lower() for n in names]
        if len(set(safe)) != len(safe):
            clash = sorted({n for n, s in zip(names, safe) if safe.count(s) > 1})
            raise ConfigError(f"label names {clash} become the same file name; rename one of them")

    def _check_choices(self) -> None:
        from medseg.inference.postprocess import POSTPROCESS
        from medseg.transforms.presets import PRESETS

        _check_choice(self.preset, "preset", sorted(PRESETS))
        _check_choice(self.postprocess, "postprocess", POSTPROCESS)
        _check_choice(self.slice_axis, "slice_axis", SLICE_AXES)

    def _check_grid(self) -> None:
        """Window, spacing and context: what sizes the tensors the network sees."""
        multiple = 2**self.network.depth
        for key in ("window", "trained_window"):
            value = getattr(self, key)
            if value is None and key == "trained_window":
                continue
            for w in _check_pair(value, key):
                _check_int(w, key, 1, MAX_WINDOW)
            if any(w % multiple for w in value):
                raise ConfigError(f"{key} {value} must be two positive multiples of {multiple} (2**depth)")
        if self.spacing is not None:
            for mm in _check_pair(self.spacing, "spacing"):
                if isinstance(mm, bool) or not isinstance(mm, numbers.Real) or not math.isfinite(mm) or mm <= 0:
                    raise ConfigError(
                        f"spacing must be two finite positive numbers (mm) or null, got {_show(self.spacing)}"
                    )
        _check_int(self.context_slices, "context_slices", 0, MAX_CONTEXT_SLICES)
        if self.network.in_channels % (2 * self.context_slices + 1):
            raise ConfigError(
                f"network.in_channels {self.network.in_channels} must be a multiple of "
                f"2*context_slices+1 = {2 * self.context_slices + 1}"
            )

    def _check_files(self) -> None:
        """``weights`` and ``members`` name files inside the model folder, nothing else
        (``medseg.model`` also checks that symbolic links do not lead out of it)."""
        _check_relative_path(self.weights, "weights")
        if self.weights_sha256 is not None and not (
            isinstance(self.weights_sha256, str) and _SHA256.fullmatch(self.weights_sha256)
        ):
            raise ConfigError(
                f"weights_sha256 must be 64 lower-case hex digits or null, got {_show(self.weights_sha256)}"
            )
        if not isinstance(self.members, tuple):
            raise ConfigError(f"members must be a list of sub-folder names, got {_show(self.members)}")
        for member in self.members:
            check_text(member, "members entry", 255)
            if "/" in member or "\\" in member or member.startswith("."):
                raise ConfigError(
                    f"members entry {member!r} must be a plain sub-folder name (no '/', '\\' or leading '.')"
                )

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
    def from_dict(cls, data: Any, where: str = "model.json") -> ModelSpec:
        """Build from parsed JSON, rejecting unknown keys (a typo must not pass silently) and
        values of the wrong type or range. Every ConfigError starts with ``where`` (once)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: must hold a JSON object {{...}}, got {_show(data)}")
        reject_unknown_keys(cls, data, where)
        try:
            return cls._from_json(dict(data))
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from err

    @classmethod
    def _from_json(cls, data: dict[str, Any]) -> ModelSpec:
        network = data.pop("network", {})
        if not isinstance(network, dict):
            raise ConfigError(f"network must be a JSON object, got {_show(network)}")
        reject_unknown_keys(NetworkSpec, network, "'network'")
        items = _check_list(data.pop("labels", []), "labels")
        labels = tuple(_label_from_json(item, f"labels[{i}]") for i, item in enumerate(items))
        for key in ("spacing", "window", "trained_window", "members"):
            if data.get(key) is not None:
                data[key] = tuple(_check_list(data[key], key))
        if "trained_window" not in data:
            data["trained_window"] = _recorded_training_window(data.get("provenance"))
        return cls(labels=labels, network=NetworkSpec(**network), **data)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelSpec:
        """Read and check ``path``; every ConfigError starts with the path (once)."""
        try:
            return cls.from_dict(json.loads(path.read_text()), where=str(path))
        # JSONDecodeError and UnicodeDecodeError are ValueErrors; TypeError and KeyError would be
        # a value from_dict let through: still the file's fault, reported as such.
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise ConfigError(f"{path}: not a valid model.json ({type(err).__name__}: {err})") from err
        except RecursionError as err:  # json.loads recurses once per level of nesting
            raise ConfigError(f"{path}: not a valid model.json (JSON nested too deeply)") from err


def _recorded_training_window(provenance: Any) -> tuple[int, int] | None:
    """The training window of a model.json from before ``trained_window`` existed: medseg's
    training wrote its whole configuration into the provenance, window included."""
    if not isinstance(provenance, dict) or provenance.get("trained") is not True:
        return None
    config = provenance.get("config")
    window = config.get("window") if isinstance(config, dict) else None
    if isinstance(window, list) and len(window) == 2 and all(type(w) is int and w > 0 for w in window):
        return (window[0], window[1])
    return None


def _label_from_json(item: Any, where: str) -> LabelSpec:
    if not isinstance(item, dict):
        raise ConfigError(f"{where} must be a JSON object with value, name and color, got {_show(item)}")
    reject_unknown_keys(LabelSpec, item, where)
    missing = [f.name for f in dataclasses.fields(LabelSpec) if f.name not in item]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}")
    try:
        return LabelSpec(item["value"], item["name"], tuple(_check_list(item["color"], "color")))
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from err


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


def split_label_names(text: str) -> tuple[str, ...]:
    """Label names from a comma-separated command-line value ("background,left,right"),
    stripped, empty ones dropped; checked where they are used (LabelSpec, build_manifest)."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def labels_from_names(names: list[str]) -> tuple[LabelSpec, ...]:
    """Labels 0..n-1 with default colours (background black) for ``names``."""
    labels = []
    for i, name in enumerate(names):
        color = (0, 0, 0) if i == 0 else DEFAULT_COLORS[(i - 1) % len(DEFAULT_COLORS)]
        labels.append(LabelSpec(i, name.strip(), color))
    return tuple(labels)


# Short, bounded representations of user values for messages (a crafted file may hold a
# huge or deeply nested value where a number belongs).
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 3


def _show(value: Any) -> str:
    """``value`` as an error message shows it: repr (escapes newlines), bounded, with its type."""
    return f"{_REPR.repr(value)} ({type(value).__name__})"


def _check_int(value: Any, key: str, low: int, high: int) -> None:
    """ConfigError unless ``value`` is an integer in low..high (a bool is not a count)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{key} must be an integer, got {_show(value)}")
    if not low <= value <= high:
        raise ConfigError(f"{key} must be in {low}..{high}, got {value}")


def check_text(value: Any, key: str, max_length: int) -> None:
    """ConfigError unless ``value`` is a non-blank string of at most ``max_length`` printable
    characters: names end up in file headers, one per line, and on screen."""
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {_show(value)}")
    if not value.strip():
        raise ConfigError(f"{key} must not be empty")
    if len(value) > max_length:
        raise ConfigError(f"{key} {_REPR.repr(value)} is {len(value)} characters long; at most {max_length} allowed")
    if not value.isprintable():
        raise ConfigError(
            f"{key} {value!r} holds a newline, tab or other control character; use printable characters only"
        )


def _check_choice(value: Any, key: str, choices: Any) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"unknown {key} {_show(value)}; choose one of {tuple(choices)}")


def _check_list(value: Any, key: str) -> list[Any] | tuple[Any, ...]:
    """``value`` when it is a JSON list (a string or number where a list belongs is refused)."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key} must be a list, got {_show(value)}")
    return value


def _check_pair(value: Any, key: str) -> tuple[Any, Any]:
    if not isinstance(value, tuple) or len(value) != 2:
        raise ConfigError(f"{key} must be two values, got {_show(value)}")
    return value


def _check_relative_path(value: Any, key: str) -> None:
    """ConfigError unless ``value`` is a relative path that stays in its folder ('/'-separated)."""
    check_text(value, key, 255)
    parts = value.split("/")
    if value.startswith("/") or "\\" in value or ":" in parts[0] or ".." in parts or "" in parts:
        raise ConfigError(
            f"{key} {value!r} must name a file inside the model folder: a relative '/'-separated path "
            "without '..' (e.g. weights.safetensors)"
        )


def _nesting(value: Any) -> int:
    """Levels of list/dict nesting in ``value`` (iterative: a crafted file must not exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            deepest = max(deepest, level)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest
