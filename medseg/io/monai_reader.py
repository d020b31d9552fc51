"""medseg's readers behind MONAI's ``ImageReader`` interface, for ``LoadImage(d)``.

``LoadImaged(keys="image", reader=ScanReader())`` gives MONAI users medseg's DICOM series
handling (grouping, ordering, checks) and NIfTI/NRRD/MHA reading in their own pipelines.

By name: importing this module adds ``ScanReader`` to MONAI's ``SUPPORTED_READERS`` (the
table MONAI documents for custom readers), which is where ``LoadImage(reader="ScanReader")``
looks a bare name up; the dotted name ``"medseg.io.monai_reader.ScanReader"`` works without
the import, through MONAI's ``pydoc.locate``. It goes *first* in that table, which MONAI
treats as the lowest priority, so a plain ``LoadImage()`` picks the same reader for every
file as before (``PydicomReader``, which claims any name, always comes before it).

Whichever way it is given, ``LoadImage`` tries MONAI's other readers when ``ScanReader``
raises: a DICOM series that medseg refuses still loads through ``PydicomReader``. To read with
medseg's reader only, and get its ``ScanError``, use ``medseg.transforms.LoadScan(d)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader, MetaTensor
from monai.transforms.io.array import SUPPORTED_READERS
from monai.utils import MetaKeys, SpaceKeys

from medseg.io.discover import read_scan
from medseg.io.readers import SCAN_SUFFIXES
from medseg.io.volume import Volume


def volume_meta(volume: Volume) -> dict[str, Any]:
    """MONAI metadata for ``volume``: RAS affine, spatial shape, channel-first data."""
    affine = volume.geometry.affine_ras()
    return {
        MetaKeys.AFFINE: affine.copy(),
        MetaKeys.ORIGINAL_AFFINE: affine.copy(),
        MetaKeys.SPATIAL_SHAPE: np.asarray(volume.geometry.shape),
        MetaKeys.SPACE: SpaceKeys.RAS,
        MetaKeys.ORIGINAL_CHANNEL_DIM: 0,
        "filename_or_obj": str(volume.source),
        "description": volume.description,
    }


def volume_to_metatensor(volume: Volume) -> MetaTensor:
    """(C, X, Y, Z) MetaTensor carrying ``volume``'s RAS affine and source; it shares
    ``volume.array``'s memory (no copy), so in-place transforms change the volume too."""
    return MetaTensor(volume.array, meta=volume_meta(volume))


class ScanReader(ImageReader):
    """Reads one NIfTI/NRRD/MHA file or one DICOM series folder per call (channel first).

    Args:
        series_uid: which series to read when a DICOM folder holds several.
    """

    def __init__(self, series_uid: str | None = None) -> None:
        super().__init__()
        self.series_uid = series_uid

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        names = [filename] if isinstance(filename, (str, Path)) else list(filename)
        return all(Path(n).is_dir() or str(n).lower().endswith(SCAN_SUFFIXES) for n in names)

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs: Any) -> Volume:
        if not isinstance(data, (str, Path)):
            if len(data) != 1:
                raise ValueError("ScanReader reads one scan per call")
            data = data[0]
        return read_scan(data, series_uid=self.series_uid)

    def get_data(self, img: Volume) -> tuple[np.ndarray, dict[str, Any]]:
        return img.array, volume_meta(img)


def _register_by_name() -> None:
    """Make ``LoadImage(reader="ScanReader")`` resolve: MONAI looks bare reader names up,
    lower-cased, in ``SUPPORTED_READERS``. The entry goes first (MONAI tries the table from
    last to first), so MONAI's own choice of reader for any file is unchanged."""
    if SUPPORTED_READERS.get("scanreader") is ScanReader:
        return
    others = {name: reader for name, reader in SUPPORTED_READERS.items() if name != "scanreader"}
    SUPPORTED_READERS.clear()  # in place: LoadImage holds this very dict
    SUPPORTED_READERS.update({"scanreader": ScanReader, **others})


_register_by_name()
