"""MONAI transforms: intensity presets, grid changes that record their inverse, the Compose."""

from medseg._lazy import lazy_exports

_EXPORTS = {
    "PRESETS": "medseg.transforms.presets",
    "NormalizeIntensityPreset": "medseg.transforms.intensity",
    "NormalizeIntensityPresetd": "medseg.transforms.intensity",
    "ResampleInPlane": "medseg.transforms.grid",
    "ResampleInPlaned": "medseg.transforms.grid",
    "InPlaneResampling": "medseg.transforms.grid",
    "build_transforms": "medseg.transforms.compose",
    "slice_axis_index": "medseg.transforms.grid",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
