"""Intensity presets: CT windows and MR per-volume normalisation, as MONAI transforms.

CT values are Hounsfield units, so a fixed window maps them to [0, 1]. MR intensities have no
physical unit (the hippocampus crops peak anywhere from ~100 to 1.7 million), so each volume
is clipped to its own 0.5-99.5 percentiles and z-scored.

A per-voxel preset (a CT window, or none) can also be *deferred*: inference keeps a CT's
stored int16 voxels (half a float32 volume) and maps each slice batch as it is sent to the
network (:func:`defer_preset`, :func:`pending_preset`, :func:`apply_pending_`); the same
float32 operations on the same values, so the same network input bit for bit.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from medseg.transforms.presets import PRESETS, IntensityPreset
from medseg.transforms.quantiles import percentiles


def normalize_intensity(image: torch.Tensor, preset: str, inplace: bool = False) -> torch.Tensor:
    """Apply the named preset to ``image`` (C, X, Y, Z) float, each channel on its own.

    ``inplace`` overwrites a float32 ``image`` and returns it (the same values, no second
    volume: inference owns the voxels it read); other types are converted as without it.
    """
    from monai.utils import look_up_option

    p = look_up_option(preset, PRESETS)
    if p.kind == "none":
        return image
    if inplace and image.dtype == torch.float32:
        _normalize_(image.as_tensor() if isinstance(image, MetaTensor) else image, p)
        return image
    x = image.float()
    if p.kind == "window":
        return ((x.clamp(p.lower, p.upper) - p.lower) / (p.upper - p.lower)).to(image)
    out = torch.empty_like(x)
    for c in range(x.shape[0]):
        ch = x[c]
        lo, hi = _percentiles(ch, p)
        ch = ch.clamp(lo, hi)
        std = ch.std()
        out[c] = (ch - ch.mean()) / (std if std > 0 else 1.0)
    return out


def _normalize_(x: torch.Tensor, p: IntensityPreset) -> None:
    """``normalize_intensity``'s arithmetic on float32 ``x`` in place: the same operations in
    the same order, so the same values bit for bit."""
    if p.kind == "window":
        x.clamp_(p.lower, p.upper).sub_(p.lower).div_(p.upper - p.lower)
        return
    for c in range(x.shape[0]):
        ch = x[c]
        lo, hi = _percentiles(ch, p)
        ch.clamp_(lo, hi)
        std = ch.std()
        ch.sub_(ch.mean()).div_(std if std > 0 else 1.0)


def _percentiles(ch: torch.Tensor, p: IntensityPreset) -> tuple[float, float]:
    # numpy's percentiles without numpy's copy of the volume (torch.quantile refuses tensors
    # over 16M elements and sorts a copy too).
    lo, hi = percentiles(ch.detach().cpu().numpy(), (p.lower, p.upper))
    return float(lo), float(hi)


#: The MetaTensor meta key naming a preset that is still to be applied to ``image``'s voxels.
PENDING_PRESET = "medseg_pending_preset"


def per_voxel(preset: str) -> bool:
    """Whether ``preset`` maps each voxel on its own (a window, or none), so that applying it
    slice batch by slice batch equals applying it to the whole volume."""
    return PRESETS[preset].kind in ("window", "none")


def defer_preset(image: MetaTensor, preset: str) -> MetaTensor:
    """Leave ``image``'s voxels as they are and record that ``preset`` (per voxel) is pending:
    whoever reads its slices applies it with :func:`apply_pending_`. Returns ``image``."""
    if not per_voxel(preset):
        raise ValueError(f"preset {preset!r} needs the whole volume's statistics; it cannot wait for slices")
    image.meta[PENDING_PRESET] = preset
    return image


def pending_preset(image: torch.Tensor) -> str | None:
    """The preset still to be applied to ``image``'s voxels (None: they are network input)."""
    return image.meta.get(PENDING_PRESET) if isinstance(image, MetaTensor) else None


def apply_pending_(x: torch.Tensor, preset: str | None) -> torch.Tensor:
    """Apply the pending per-voxel ``preset`` to float32 ``x`` (a slice batch, or a slab) in
    place, exactly as preprocessing would have (:func:`_normalize_`); returns ``x``."""
    if preset is not None and PRESETS[preset].kind != "none":
        _normalize_(x, PRESETS[preset])
    return x


class NormalizeIntensityPreset(Transform):
    """MONAI array transform: ``normalize_intensity(img, preset, inplace)``; (C, X, Y, Z) in
    and out. ``inplace`` overwrites float32 inputs (for callers that own them)."""

    def __init__(self, preset: str, inplace: bool = False) -> None:
        if preset not in PRESETS:
            raise ValueError(f"unknown intensity preset {preset!r}; choose one of {sorted(PRESETS)}")
        self.preset = preset
        self.inplace = inplace

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return normalize_intensity(img, self.preset, self.inplace)


class NormalizeIntensityPresetd(MapTransform):
    """Dictionary version of :class:`NormalizeIntensityPreset`."""

    def __init__(
        self, keys: KeysCollection, preset: str, allow_missing_keys: bool = False, inplace: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = NormalizeIntensityPreset(preset, inplace)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d
