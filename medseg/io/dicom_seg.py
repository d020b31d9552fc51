"""DICOM Segmentation objects (highdicom) referencing the source series.

Pitfalls measured on the real series in ../shared/data (see shared/notes/dicom-seg.md):
highdicom pairs mask frame i with source image i by list order, so the sources are sorted
along the slice normal exactly as the Volume was built and the mask is handed over as a
(frames, rows, columns) numpy array in that order; missing type-2 attributes are added as
empty values on copies; a series without Study/Series/SOP UIDs or a FrameOfReferenceUID
gets no SEG (a SEG must reference them; highdicom fails on a missing frame of reference);
BINARY segment numbers must run 1..N, so label values are renumbered and the value is kept
in each segment's label.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError
from medseg.io.dicom import DicomSeries, ordered_slices
from medseg.io.files import atomic_path
from medseg.spec import LabelSpec

logger = logging.getLogger(__name__)

SEG_TYPES = ("binary", "labelmap")
_REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID")
_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "Manufacturer",
)  # fmt: skip


class DicomSegUnavailable(MedsegError):
    """The source series cannot be referenced by a SEG (a warning in run reports)."""


def _missing_uids(ds) -> str:
    """The required UIDs ``ds`` lacks, as "empty A, B; no C" ("" when it has them all)."""
    empty = [uid for uid in _REQUIRED_UIDS if uid in ds and not str(ds.get(uid) or "").strip()]
    absent = [uid for uid in _REQUIRED_UIDS if uid not in ds]
    parts = ([f"empty {', '.join(empty)}"] if empty else []) + ([f"no {', '.join(absent)}"] if absent else [])
    return "; ".join(parts)


def _sources(series: DicomSeries) -> list:
    """Source datasets (no pixel data) sorted along the slice normal, type-2 gaps filled."""
    import pydicom

    datasets = []
    for s in ordered_slices(series):
        ds = pydicom.dcmread(s.path, stop_before_pixels=True)
        missing = _missing_uids(ds)
        if missing:
            raise DicomSegUnavailable(
                f"{series.folder}: no DICOM SEG written: the source files have {missing}, "
                "which a SEG must reference (the other outputs were written; set the UIDs, for example "
                "with pydicom or dcmodify, to get a SEG)"
            )
        ds = copy.deepcopy(ds)
        for keyword in _TYPE2:
            if keyword not in ds:
                setattr(ds, keyword, "")
        datasets.append(ds)
    return datasets


def _descriptions(labels: tuple[LabelSpec, ...], model_name: str) -> list:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    import medseg

    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name or "medseg", family=codes.cid7162.ArtificialIntelligence, version=medseg.__version__
    )
    out = []
    for number, lab in enumerate((lab for lab in labels if lab.value != 0), start=1):
        out.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=f"{lab.name} (label {lab.value})",
                segmented_property_category=codes.SCT.AnatomicalStructure,
                segmented_property_type=codes.SCT.Tissue,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                display_color=hd.color.CIELabColor.from_rgb(*lab.color),
            )
        )
    return out


def write_dicom_seg(
    labels: np.ndarray,
    series: DicomSeries,
    spec_labels: tuple[LabelSpec, ...],
    path: Path,
    seg_type: str = "binary",
    model_name: str = "medseg",
) -> Path:
    """Write ``labels`` (X=columns, Y=rows, Z=slices in position order, as the Volume read
    from ``series``) as a DICOM SEG at ``path``.

    Raises DicomSegUnavailable when the series lacks the UIDs (Study, Series, SOP instance
    and class, frame of reference) a SEG must reference.
    """
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless

    if seg_type not in SEG_TYPES:
        raise ValueError(f"seg_type must be one of {SEG_TYPES}, got {seg_type!r}")
    sources = _sources(series)
    # Renumber label values to segment numbers 1..N (BINARY requires it; kept for LABELMAP too).
    lut = np.zeros(256, dtype=np.uint8)
    for number, lab in enumerate((lab for lab in spec_labels if lab.value != 0), start=1):
        lut[lab.value] = number
    frames = np.ascontiguousarray(lut[labels].transpose(2, 1, 0))  # (slices, rows, columns)
    if frames.shape[0] != len(sources):
        raise ValueError(f"{len(sources)} source slices but {frames.shape[0]} label slices")
    labelmap = seg_type == "labelmap"
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.LABELMAP if labelmap else hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_descriptions(spec_labels, model_name),
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medseg",
        manufacturer_model_name=model_name or "medseg",
        software_versions=__import__("medseg").__version__,
        device_serial_number="0",
        series_description=f"medseg {model_name}"[:64],
        # BINARY cannot be compressed by highdicom; the LABELMAP compresses losslessly.
        transfer_syntax_uid=RLELossless if labelmap else ExplicitVRLittleEndian,
        omit_empty_frames=False,
    )
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return path
