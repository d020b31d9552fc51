"""Intensity presets by name: CT windows and MR per-volume normalisation (data only).

Kept free of torch and MONAI imports so the command line can offer the names as choices
before anything heavy loads; ``medseg.transforms.intensity`` applies them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IntensityPreset:
    """``kind`` "window": clip to [lower, upper] then scale to [0, 1];
    "percentile_zscore": clip to the [lower, upper] percentiles then z-score per volume;
    "none": leave intensities as they are (data normalised elsewhere)."""

    kind: str
    lower: float = 0.0
    upper: float = 0.0


def _window(level: float, width: float) -> IntensityPreset:
    return IntensityPreset("window", level - width / 2, level + width / 2)


PRESETS: dict[str, IntensityPreset] = {
    "ct_abdomen": _window(40, 400),
    "ct_soft_tissue": _window(50, 350),
    "ct_lung": _window(-600, 1500),
    "ct_bone": _window(400, 1800),
    "ct_brain": _window(40, 80),
    "mr": IntensityPreset("percentile_zscore", 0.5, 99.5),
    "none": IntensityPreset("none"),
}
