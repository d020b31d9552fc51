"""Intensity presets: CT windows and MR per-volume normalisation, as MONAI transforms.

CT values are Hounsfield units, so a fixed window maps them to [0, 1]. MR intensities have no
physical unit (the hippocampus crops peak anywhere from ~100 to 1.7 million), so each volume
is clipped to its own 0.5-99.5 percentiles and z-scored.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

from medseg.transforms.presets import PRESETS, IntensityPreset  # noqa: F401 (re-exported)


def normalize_intensity(image: torch.Tensor, preset: str) -> torch.Tensor:
    """Apply the named preset to ``image`` (C, X, Y, Z) float, each channel on its own."""
    from monai.utils import look_up_option

    p = look_up_option(preset, PRESETS)
    if p.kind == "none":
        return image
    x = image.float()
    if p.kind == "window":
        return ((x.clamp(p.lower, p.upper) - p.lower) / (p.upper - p.lower)).to(image)
    out = torch.empty_like(x)
    for c in range(x.shape[0]):
        ch = x[c]
        # numpy's percentile: torch.quantile refuses tensors over 16M elements.
        lo, hi = np.percentile(ch.detach().cpu().numpy(), (p.lower, p.upper))
        ch = ch.clamp(float(lo), float(hi))
        std = ch.std()
        out[c] = (ch - ch.mean()) / (std if std > 0 else 1.0)
    return out


class NormalizeIntensityPreset(Transform):
    """MONAI array transform: ``normalize_intensity(img, preset)``; (C, X, Y, Z) in and out."""

    def __init__(self, preset: str) -> None:
        if preset not in PRESETS:
            raise ValueError(f"unknown intensity preset {preset!r}; choose one of {sorted(PRESETS)}")
        self.preset = preset

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return normalize_intensity(img, self.preset)


class NormalizeIntensityPresetd(MapTransform):
    """Dictionary version of :class:`NormalizeIntensityPreset`."""

    def __init__(self, keys: KeysCollection, preset: str, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = NormalizeIntensityPreset(preset)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d
