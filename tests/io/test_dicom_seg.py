"""DICOM SEG: frames match the source slices position by position; dciodvfy finds no errors."""

import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from helpers import make_geometry, phantom, rotation, threshold_labels, write_dicom_series

from medseg.io.dicom import ordered_slices
from medseg.io.dicom_seg import DicomSegUnavailable, write_dicom_seg
from medseg.io.discover import discover
from medseg.spec import LabelSpec, labels_from_names

LABELS = (LabelSpec(0, "background", (0, 0, 0)), LabelSpec(3, "low", (10, 200, 30)), LabelSpec(7, "high", (250, 5, 5)))


def _read_back(path, series, labels_spec) -> np.ndarray:
    """(X, Y, Z) label values from the SEG, slice k taken from source slice k by its UID."""
    seg = hd.seg.segread(path)
    uids = [str(pydicom.dcmread(s.path, stop_before_pixels=True).SOPInstanceUID) for s in ordered_slices(series)]
    numbers = list(range(1, len(labels_spec)))
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=numbers, combine_segments=True)
    values = np.array([0] + [lab.value for lab in labels_spec if lab.value != 0])
    return values[pixels].transpose(2, 1, 0)


def _errors(path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("seg_type", ["binary", "labelmap"])
def test_seg_reads_back_equal_position_by_position(tmp_path, seg_type):
    geometry = make_geometry((14, 12, 6), (0.8, 0.7, 5.0), direction=rotation((10.8, 0, 3)))
    array = np.round(phantom(geometry.shape))
    write_dicom_series(tmp_path / "series", array, geometry)  # file names in reverse position order
    series = discover(tmp_path / "series").scans[0].series
    labels = np.choose(threshold_labels(array, 50, 200), [0, 3, 7]).astype(np.uint8)
    path = write_dicom_seg(labels, series, LABELS, tmp_path / "seg.dcm", seg_type)
    np.testing.assert_array_equal(_read_back(path, series, LABELS), labels)
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == seg_type.upper()
    # LABELMAP adds a "Background" segment 0 of its own.
    assert [d.SegmentLabel for d in seg.SegmentSequence if d.SegmentNumber > 0] == ["low (label 3)", "high (label 7)"]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) is not installed")
def test_binary_seg_passes_dciodvfy(tmp_path):
    geometry = make_geometry((10, 9, 4), (0.8, 0.8, 2.0))
    array = np.round(phantom(geometry.shape))
    write_dicom_series(tmp_path / "series", array, geometry)
    series = discover(tmp_path / "series").scans[0].series
    path = write_dicom_seg(
        threshold_labels(array, 50, 200), series, labels_from_names(["bg", "a", "b"]), tmp_path / "s.dcm"
    )
    assert _errors(path) == []


def test_series_without_uids_is_refused(tmp_path):
    geometry = make_geometry((8, 8, 3))
    paths = write_dicom_series(tmp_path / "series", np.zeros(geometry.shape), geometry)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID = ""
        ds.save_as(p)
    series = discover(tmp_path / "series").scans[0].series
    with pytest.raises(DicomSegUnavailable, match="empty StudyInstanceUID"):
        write_dicom_seg(np.zeros(geometry.shape, np.uint8), series, LABELS, tmp_path / "s.dcm")
    assert not (tmp_path / "s.dcm").exists()


def test_series_without_frame_of_reference_is_refused_as_unavailable(tmp_path):
    """highdicom fails on it; as a DicomSegUnavailable it is a warning and the other outputs stand."""
    geometry = make_geometry((8, 8, 3))
    paths = write_dicom_series(tmp_path / "series", np.zeros(geometry.shape), geometry)
    for p in paths:
        ds = pydicom.dcmread(p)
        del ds.FrameOfReferenceUID
        ds.save_as(p)
    series = discover(tmp_path / "series").scans[0].series
    with pytest.raises(DicomSegUnavailable, match=r"series: no DICOM SEG written: .* no FrameOfReferenceUID"):
        write_dicom_seg(np.zeros(geometry.shape, np.uint8), series, LABELS, tmp_path / "s.dcm")
    assert not (tmp_path / "s.dcm").exists()


@pytest.mark.realdata
def test_real_mr_crop_series_seg(shared_data, tmp_path):
    """Study1 lacks type-2 patient attributes; the SEG is still valid and position-exact."""
    series = discover(shared_data / "dicom_mr_studies/Study1/13_HCropVolume").scans[0].series
    from medseg.io.dicom import read_series

    volume = read_series(series)
    labels = threshold_labels(volume.array[0], *np.percentile(volume.array, (60, 90))).astype(np.uint8)
    spec = labels_from_names(["background", "anterior", "posterior"])
    path = write_dicom_seg(labels, series, spec, tmp_path / "seg.dcm")
    np.testing.assert_array_equal(_read_back(path, series, spec), labels)
    if shutil.which("dciodvfy"):
        assert _errors(path) == []


@pytest.mark.realdata
def test_totalsegmentator_ct_without_uids_gets_no_seg(shared_data, tmp_path):
    series = discover(shared_data / "totalsegmentator/example_ct_dicom").scans[0].series
    with pytest.raises(DicomSegUnavailable, match="SeriesInstanceUID"):
        write_dicom_seg(np.zeros((512, 512, 20), np.uint8), series, LABELS, tmp_path / "s.dcm")
