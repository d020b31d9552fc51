"""Loading scans in MONAI pipelines with medseg's reader and nothing else.

MONAI's ``LoadImage(reader=ScanReader())`` (or ``reader="ScanReader"``) registers medseg's
reader *beside* MONAI's own and, when the first reader raises, tries the next one: a DICOM
series that medseg refuses (a missing slice, mixed orientations, a gantry tilt...) then loads
through ``PydicomReader`` without a word. :class:`LoadScan` and :class:`LoadScand` read with
:class:`~medseg.io.monai_reader.ScanReader` only, so medseg's ``ScanError`` (naming the file,
what is wrong and what to do) reaches the caller. Inside a MONAI ``Compose`` it arrives as
MONAI wraps every transform's error: a ``RuntimeError`` whose ``__cause__`` is the ScanError.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import DtypeLike, KeysCollection, PathLike
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import ImageMetaKey, PostFix, convert_to_dst_type

from medseg.io.monai_reader import ScanReader


class LoadScan(Transform):
    """Read one scan (NIfTI/NRRD/MHA file, DICOM file or series folder) -> (C, X, Y, Z) MetaTensor.

    The MetaTensor is the one ``LoadImage(reader=ScanReader())`` gives for a scan medseg
    accepts: channel first, RAS affine (``affine`` and ``original_affine``), ``spatial_shape``,
    ``filename_or_obj`` (the path as given); voxels converted to ``dtype`` as ``LoadImage``
    does (medseg's readers give float32, which None keeps). Never falls back to another
    reader: medseg's ``ScanError`` propagates.

    Args:
        series_uid: the DICOM series to read when a folder holds several (None: the folder
            must hold one scan); ``__call__`` can override it per scan.
        image_only: return the MetaTensor only; False returns (MetaTensor, metadata dict).
        dtype: voxel type of the output, float32 by default as for ``LoadImage``.
    """

    def __init__(
        self, series_uid: str | None = None, image_only: bool = True, dtype: DtypeLike | None = np.float32
    ) -> None:
        self.series_uid = series_uid
        self.image_only = image_only
        self.dtype = dtype

    def __call__(
        self, filename: PathLike, series_uid: str | None = None
    ) -> MetaTensor | tuple[MetaTensor, dict[str, Any]]:
        """``filename``'s scan; ``series_uid`` (if given) picks its DICOM series."""
        if isinstance(filename, (list, tuple)):
            # LoadImage's multi-file form; one medseg scan is one file or one series folder.
            if len(filename) != 1:
                raise ValueError(
                    f"LoadScan reads one scan per call (a file or a DICOM series folder), got {len(filename)} paths"
                )
            filename = filename[0]
        path = Path(filename).expanduser()
        # The steps of LoadImage.__call__ for one reader, without constructing MONAI's default
        # readers (LoadImage builds them all, and some log warnings when built).
        reader = ScanReader(series_uid=self.series_uid if series_uid is None else series_uid)
        array, meta = reader.get_data(reader.read(path))
        array = convert_to_dst_type(array, dst=array, dtype=self.dtype)[0]
        meta[ImageMetaKey.FILENAME_OR_OBJ] = str(path)
        image = MetaTensor.ensure_torch_and_prune_meta(array, meta)
        return image if self.image_only else (image, image.meta)


class LoadScand(MapTransform):
    """Dictionary version of :class:`LoadScan`: each of ``keys`` holds a path.

    Args:
        keys: the keys whose paths to read.
        series_uid_key: the data key that holds a DICOM series UID for the item (as in medseg's
            data manifests, key ``"series_uid"``); when present and not empty it picks the
            series for every one of ``keys``, so give label files their own ``LoadScand``.
        image_only: store the MetaTensor only; False also stores its metadata dict under
            ``"{key}_meta_dict"``, as ``LoadImaged`` does.
        dtype: voxel type, float32 by default as for ``LoadImaged``.
        allow_missing_keys: skip keys that the data lack instead of raising KeyError.
    """

    def __init__(
        self,
        keys: KeysCollection,
        series_uid_key: str | None = None,
        image_only: bool = True,
        dtype: DtypeLike | None = np.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.series_uid_key = series_uid_key
        self.image_only = image_only
        self.loader = LoadScan(image_only=image_only, dtype=dtype)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        uid = d.get(self.series_uid_key) if self.series_uid_key is not None else None
        for key in self.key_iterator(d):
            loaded = self.loader(d[key], series_uid=uid or None)
            if self.image_only:
                d[key] = loaded
            else:
                d[key], d[PostFix.meta(str(key))] = loaded
        return d
