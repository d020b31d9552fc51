"""The preprocessing chain as one MONAI ``Compose``, built from a ModelSpec.

load -> channel first -> RAS orientation -> (in-plane resampling) -> intensity preset.
Orientation and resampling record their inverse in the MetaTensor; ``Compose.inverse``
(or ``Invertd``) undoes them in reverse order, in one place. Loading uses medseg's reader
only (:class:`~medseg.transforms.io.LoadScand`): a scan medseg refuses is refused here too.
With ``inplace`` (inference), orientation and intensity overwrite the input's own memory
(``medseg.transforms.orientation``) rather than copy the volume.
"""

from __future__ import annotations

from monai.transforms import Compose, EnsureChannelFirstd, Orientationd

from medseg.spec import ModelSpec
from medseg.transforms.grid import ResampleInPlaned
from medseg.transforms.intensity import NormalizeIntensityPresetd
from medseg.transforms.io import LoadScand
from medseg.transforms.orientation import OrientationInPlaced

CANONICAL_AXCODES = "RAS"


def build_transforms(
    spec: ModelSpec,
    keys: tuple[str, ...] = ("image",),
    load: bool = True,
    resample: bool = True,
    label_keys: tuple[str, ...] = (),
    series_uid_key: str | None = "series_uid",
    inplace: bool = False,
    intensity: bool = True,
) -> Compose:
    """The Compose that turns a scan path (or a loaded MetaTensor) into network-ready input.

    Args:
        spec: the model's specification (preset, slice axis rule, target spacing).
        keys: image keys; intensity normalisation applies to these only.
        load: start with :class:`LoadScand` (medseg's reader, no fallback to MONAI's: its
            ScanError is the ``__cause__`` of the RuntimeError MONAI's Compose raises); False
            when data are already MetaTensors.
        resample: include in-plane resampling to ``spec.spacing`` (the predictor resamples
            slice batches itself, so inference passes False).
        label_keys: label-map keys that follow the images' grid changes (nearest neighbour).
        series_uid_key: the data key whose value (when present) picks the DICOM series of the
            images, as in medseg's data manifests; label maps are read without it.
        inplace: orientation and intensity overwrite the input tensors instead of copying
            them (the same results and recorded operations; no second volume in memory), for
            callers that own the data and never use it again, as inference does.
        intensity: end with the intensity preset; False leaves it to the caller (inference
            defers a CT window to each slice batch, ``medseg.inference.segment.prepare``).
    """
    all_keys = (*keys, *label_keys)
    steps = []
    if load:
        steps.append(LoadScand(keys, series_uid_key=series_uid_key))
        if label_keys:
            steps.append(LoadScand(label_keys))
    steps += [
        EnsureChannelFirstd(all_keys),
        (OrientationInPlaced if inplace else Orientationd)(all_keys, axcodes=CANONICAL_AXCODES, labels=None),
    ]
    if resample and spec.spacing is not None:
        steps.append(ResampleInPlaned(keys, spec.spacing, spec.slice_axis, mode="bilinear"))
        if label_keys:
            steps.append(ResampleInPlaned(label_keys, spec.spacing, spec.slice_axis, mode="nearest"))
    if intensity:
        steps.append(NormalizeIntensityPresetd(keys, spec.preset, inplace=inplace))
    return Compose(steps)
