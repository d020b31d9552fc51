"""Training configuration: frozen dataclasses loaded from JSON or YAML, unknown keys rejected."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError
from medseg.spec import ModelLayout, reject_unknown_keys

SCHEDULES = ("cosine", "poly")
TRAIN_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class AugmentConfig:
    """Random augmentation, sampled from a seeded generator, applied per 2D sample.

    ``flip_axes`` lists the in-plane axes (0: rows, 1: columns) that may be flipped without
    changing what the labels mean; leave it empty when a flip swaps anatomy (the hippocampus
    sagittal plane: flipping rows swaps its anterior and posterior ends).
    """

    probability: float = 0.8
    flip_axes: tuple[int, ...] = ()
    rotate_degrees: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    gamma: tuple[float, float] = (0.8, 1.25)
    noise_std: float = 0.05


@dataclass(frozen=True)
class TrainConfig:
    """Model layout and optimisation for ``medseg train``; saved resolved in the run folder.

    ``labels`` None takes the manifest's labels. ``window`` is the 2D training patch and the
    model's whole-slice window. ``precision`` "auto" uses bf16 autocast only where the CPU
    has native bf16 (it is ~10x slower than fp32 where emulated) and AMP on GPUs.
    ``time_limit_minutes`` ends training early at an epoch boundary (best model kept).
    ``batch_dice`` computes the Dice loss over the whole batch rather than per slice (as
    nnU-Net does for 2D), so slices without foreground do not each pull towards empty output.
    """

    labels: tuple[str, ...] | None = None
    network: str = "ArticleUNet"
    base_channels: int = 16
    depth: int = 4
    preset: str = "mr"
    slice_axis: str = "sagittal"
    spacing: tuple[float, float] | None = None
    window: tuple[int, int] = (64, 48)
    context_slices: int = 0
    epochs: int = 30
    steps_per_epoch: int = 200
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    schedule: str = "cosine"
    grad_clip: float = 12.0
    precision: str = "auto"
    pos_fraction: float = 0.67
    batch_dice: bool = False
    val_every: int = 2
    seed: int = 0
    device: str = "auto"
    time_limit_minutes: float | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in TRAIN_PRECISIONS:
            raise ConfigError(f"precision must be one of {TRAIN_PRECISIONS}, got {self.precision!r}")
        for name in ("epochs", "steps_per_epoch", "batch_size", "val_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def layout(self) -> ModelLayout:
        """The model layout this configuration trains (its network and slicing fields).

        The configuration stays flat (its JSON files name the layout fields at the top level);
        taking every ModelLayout field by name means a layout field added without its
        configuration field fails here rather than being silently left at its default.
        """
        return ModelLayout(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelLayout)})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> TrainConfig:
        data = dict(data)
        reject_unknown_keys(cls, data, where)
        augment = dict(data.pop("augment", {}) or {})
        reject_unknown_keys(AugmentConfig, augment, f"{where} 'augment'")
        for key in ("flip_axes", "scale", "gamma"):
            if key in augment:
                augment[key] = tuple(augment[key])
        for key in ("labels", "spacing", "window"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(augment=AugmentConfig(**augment), **data)

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        """Read JSON or YAML (by suffix)."""
        text = path.read_text()
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as err:  # yaml and json raise their own error types
            raise ConfigError(f"{path}: cannot be parsed ({type(err).__name__}: {err})") from err
        try:
            return cls.from_dict(data, where=str(path))
        except TypeError as err:
            raise ConfigError(f"{path}: {err}") from err
