"""MONAI transforms: loading with medseg's reader, intensity presets, grid changes that record
their inverse, 2D slice sampling for training, the Compose."""

from medseg._lazy import lazy_exports

_EXPORTS = {
    "PRESETS": "medseg.transforms.presets",
    "LoadScan": "medseg.transforms.io",
    "LoadScand": "medseg.transforms.io",
    "NormalizeIntensityPreset": "medseg.transforms.intensity",
    "NormalizeIntensityPresetd": "medseg.transforms.intensity",
    "OrientationInPlace": "medseg.transforms.orientation",
    "OrientationInPlaced": "medseg.transforms.orientation",
    "ResampleInPlane": "medseg.transforms.grid",
    "ResampleInPlaned": "medseg.transforms.grid",
    "InPlaneResampling": "medseg.transforms.grid",
    "PadInPlane": "medseg.transforms.slices",
    "PadInPlaned": "medseg.transforms.slices",
    "RandSliceSamplerd": "medseg.transforms.slices",
    "build_transforms": "medseg.transforms.compose",
    "pad_slices": "medseg.transforms.slices",
    "slice_affine": "medseg.transforms.slices",
    "slice_axis_index": "medseg.transforms.grid",
    "slice_stack": "medseg.transforms.slices",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
