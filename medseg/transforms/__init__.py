"""MONAI transforms: intensity presets, grid changes that record their inverse, the Compose."""

from medseg.transforms.compose import build_transforms
from medseg.transforms.grid import ResampleInPlane, ResampleInPlaned, slice_axis_index
from medseg.transforms.intensity import (
    PRESETS,
    NormalizeIntensityPreset,
    NormalizeIntensityPresetd,
)

__all__ = [
    "PRESETS",
    "NormalizeIntensityPreset",
    "NormalizeIntensityPresetd",
    "ResampleInPlane",
    "ResampleInPlaned",
    "build_transforms",
    "slice_axis_index",
]
