"""Output formats: one registry, one writer interface.

Every format takes the same :class:`Segmentation` (labels on the scan's grid, the scan, the
label table, the source DICOM series when there is one) and writes its files to the paths
it named in :meth:`OutputFormat.files`. The batch runner loops over the registry; adding a
format means adding one class and one entry in ``FORMATS``, nothing else.

Importing this module loads no torch, MONAI or writer back-end (highdicom, slicerio,
matplotlib load when a format writes), so the command line can check ``--formats`` while
parsing.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.io.dicom import DicomSeries
from medseg.io.dicom_seg import SEG_TYPES
from medseg.io.files import sanitise
from medseg.io.volume import Volume
from medseg.io.writers import PROBABILITY_ENCODINGS
from medseg.spec import LabelSpec


@dataclass(frozen=True)
class Segmentation:
    """What every writer gets.

    ``labels`` (X, Y, Z) integer label values on ``volume``'s grid; ``volume`` the scan (its
    geometry places every file; its voxels as read, which QC pictures show, are there when a
    format ``needs_voxels``: see ``Volume.without_voxels``); ``label_table`` the model's
    labels (value, name, colour); ``series`` the DICOM series the scan was read from (None
    for files); ``probabilities`` (classes, X, Y, Z) float32 in ``label_table`` order, when
    computed.
    """

    labels: np.ndarray
    volume: Volume
    label_table: tuple[LabelSpec, ...]
    model_name: str = "medseg"
    series: DicomSeries | None = None
    probabilities: np.ndarray | None = None

    @property
    def foreground(self) -> tuple[LabelSpec, ...]:
        return tuple(lab for lab in self.label_table if lab.value != 0)


@dataclass(frozen=True)
class WriteOptions:
    """Per-format settings: ``dicom_seg_type`` "binary" (every viewer; passes dciodvfy) or
    "labelmap" (compact, newer SOP class); ``probability_encoding`` "uint8" (p x 255 with a
    NIfTI slope) or "float32"."""

    dicom_seg_type: str = "binary"
    probability_encoding: str = "uint8"

    def __post_init__(self) -> None:
        if self.dicom_seg_type not in SEG_TYPES:
            raise ValueError(f"DICOM SEG type must be one of {SEG_TYPES}, got {self.dicom_seg_type!r}")
        if self.probability_encoding not in PROBABILITY_ENCODINGS:
            raise ValueError(
                f"probability encoding must be one of {PROBABILITY_ENCODINGS}, got {self.probability_encoding!r}"
            )


class OutputFormat:
    """One output format. Subclasses set ``name``/``help`` and implement ``files``/``write``.

    ``needs_voxels``: the format shows the scan's intensities (``seg.volume.array``); the
    batch runner keeps the voxels as read only for such formats (otherwise they become the
    network's input in place, and ``seg.volume`` holds the geometry with a stand-in array).
    """

    name = ""
    help = ""
    needs_probabilities = False
    needs_voxels = False
    dicom_only = False

    def files(self, base: str, label_table: tuple[LabelSpec, ...]) -> dict[str, str]:
        """Output key (as in run reports) -> file name, for a scan whose outputs are ``base.*``."""
        raise NotImplementedError

    def write(self, seg: Segmentation, paths: Mapping[str, Path], options: WriteOptions) -> list[str]:
        """Write ``seg`` to ``paths`` (the keys of :meth:`files`); warnings (an output that
        cannot exist for this scan, the others still written)."""
        raise NotImplementedError


class NiftiLabels(OutputFormat):
    name = "nifti"
    help = "NAME.nii.gz label map (uint8, qform = sform) and NAME.ctbl Slicer colour table"

    def files(self, base: str, label_table: tuple[LabelSpec, ...]) -> dict[str, str]:
        return {"nifti": f"{base}.nii.gz", "color-table": f"{base}.ctbl"}

    def write(self, seg: Segmentation, paths: Mapping[str, Path], options: WriteOptions) -> list[str]:
        from medseg.io.writers import write_color_table, write_nifti_labels

        write_nifti_labels(seg.labels, seg.volume.geometry, paths["nifti"])
        write_color_table(seg.label_table, paths["color-table"])
        return []


class SlicerSegmentation(OutputFormat):
    name = "seg.nrrd"
    help = "NAME.seg.nrrd 3D Slicer segmentation with segment names and colours"

    def files(self, base: str, label_table: tuple[LabelSpec, ...]) -> dict[str, str]:
        return {"seg.nrrd": f"{base}.seg.nrrd"}

    def write(self, seg: Segmentation, paths: Mapping[str, Path], options: WriteOptions) -> list[str]:
        from medseg.io.writers import write_seg_nrrd

        write_seg_nrrd(seg.labels, seg.volume.geometry, seg.label_table, paths["seg.nrrd"])
        return []


class DicomSegmentation(OutputFormat):
    name = "dicom-seg"
    help = "NAME.seg.dcm DICOM Segmentation referencing the source series (DICOM inputs only)"
    dicom_only = True

    def files(self, base: str, label_table: tuple[LabelSpec, ...]) -> dict[str, str]:
        return {"dicom-seg": f"{base}.seg.dcm"}

    def write(self, seg: Segmentation, paths: Mapping[str, Path], options: WriteOptions) -> list[str]:
        from medseg.io.dicom_seg import DicomSegUnavailable, write_dicom_seg

        if seg.series is None:
            raise ValueError("a DICOM SEG needs the source DICOM series")
        try:
            write_dicom_seg(
                seg.labels, seg.series, seg.label_table, paths["dicom-seg"], options.dicom_seg_type, seg.model_name
            )
        except DicomSegUnavailable as err:
            return [str(err)]
        return []


class QcPicture(OutputFormat):
    name = "qc"
    help = "NAME.qc.png montage with the labels overlaid, and index.html over the run"
    needs_voxels = True

    def files(self, base: str, label_table: tuple[LabelSpec, ...]) -> dict[str, str]:
        return {"qc": f"{base}.qc.png"}

    def write(self, seg: Segmentation, paths: Mapping[str, Path], options: WriteOptions) -> list[str]:
        from medseg.io.montage import write_montage

        write_montage(seg.volume, seg.labels, seg.label_table, paths["qc"])
        return []


class ProbabilityMaps(OutputFormat):
    name = "probabilities"
    help = "NAME.prob-LABEL.nii.gz per foreground label (see --probabilities)"
    needs_probabilities = True

    def files(self, base: str, label_table: tuple[LabelSpec, ...]) -> dict[str, str]:
        return {f"prob-{lab.name}": f"{base}.prob-{sanitise(lab.name)}.nii.gz" for lab in label_table if lab.value}

    def write(self, seg: Segmentation, paths: Mapping[str, Path], options: WriteOptions) -> list[str]:
        from medseg.io.writers import write_probability_map

        if seg.probabilities is None:
            raise ValueError("probability maps asked for but none were computed")
        for channel, lab in enumerate(seg.label_table):
            if lab.value:
                path = paths[f"prob-{lab.name}"]
                write_probability_map(
                    seg.probabilities[channel], seg.volume.geometry, path, options.probability_encoding
                )
        return []


FORMATS: dict[str, OutputFormat] = {
    f.name: f for f in (NiftiLabels(), SlicerSegmentation(), DicomSegmentation(), QcPicture(), ProbabilityMaps())
}
FORMAT_NAMES = tuple(FORMATS)
DEFAULT_FORMATS = ("nifti", "seg.nrrd")


def parse_formats(names: str | Sequence[str]) -> tuple[str, ...]:
    """Format names from "nifti,seg.nrrd" or a sequence; ValueError naming the bad one and
    the closest valid name. Order kept, repeats dropped."""
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n).strip() for n in names]
    items = [n for n in dict.fromkeys(items) if n]
    if not items:
        raise ValueError(f"no output format given; choose from {', '.join(FORMAT_NAMES)}")
    for name in items:
        if name not in FORMATS:
            close = difflib.get_close_matches(name, FORMAT_NAMES, n=1)
            suggestion = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown output format {name!r}{suggestion}; choose from {', '.join(FORMAT_NAMES)}")
    return tuple(items)


def output_files(
    formats: Sequence[str], base: str, out_dir: Path, label_table: tuple[LabelSpec, ...], dicom: bool
) -> dict[str, Path]:
    """Every file ``formats`` write for one scan named ``base`` (DICOM-only formats only
    when the scan is ``dicom``), by output key."""
    paths: dict[str, Path] = {}
    for name in formats:
        fmt = FORMATS[name]
        if fmt.dicom_only and not dicom:
            continue
        paths |= {key: out_dir / file for key, file in fmt.files(base, label_table).items()}
    return paths


def write_outputs(
    seg: Segmentation, formats: Sequence[str], paths: Mapping[str, Path], options: WriteOptions
) -> list[str]:
    """Write ``seg`` in every one of ``formats`` that applies to it; the formats' warnings."""
    warnings: list[str] = []
    for name in formats:
        fmt = FORMATS[name]
        if fmt.dicom_only and seg.series is None:
            continue  # said once per run by the runner, not once per scan
        warnings += fmt.write(seg, paths, options)
    return warnings
