"""DICOM series: grouping, ordering by position, rescale, and refusals with reasons."""

import shutil

import numpy as np
import pydicom
import pytest
from helpers import make_geometry, phantom, rotation, write_dicom_series

from medseg.errors import ScanError
from medseg.io import read_scan

GEOMETRY = make_geometry((12, 10, 6), (0.75, 0.6, 2.5), direction=rotation((10.8, 0, 3.0)))


@pytest.fixture
def series(tmp_path):
    array = np.round(phantom(GEOMETRY.shape) * 3 - 200)
    folder = tmp_path / "series"
    paths = write_dicom_series(folder, array, GEOMETRY)
    return folder, array, paths


def test_oblique_series_geometry_and_hounsfield_units(series):
    folder, array, _ = series
    volume = read_scan(folder)
    # Positions are written with 6 decimals, so the grid agrees to about 1e-6 mm.
    assert volume.geometry.mismatch(GEOMETRY, atol=1e-4) is None
    np.testing.assert_array_equal(volume.array[0], array)  # rescale intercept applied
    assert volume.description == "3 synthetic"


def test_slice_step_from_positions_not_thickness(series):
    folder, _, paths = series
    assert float(pydicom.dcmread(paths[0]).SliceThickness) != pytest.approx(2.5)
    assert read_scan(folder).geometry.spacing[2] == pytest.approx(2.5, abs=1e-5)


def test_missing_slice_is_refused(series):
    folder, _, paths = series
    paths[2].unlink()
    with pytest.raises(ScanError, match=r"series: series has missing slices.*about 1 slice\(s\) missing"):
        read_scan(folder)


def test_duplicate_slice_is_refused(series):
    folder, _, paths = series
    shutil.copy(paths[3], folder / "copy_of_slice")
    ds = pydicom.dcmread(folder / "copy_of_slice")
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(folder / "copy_of_slice")
    with pytest.raises(ScanError, match="duplicate slice position"):
        read_scan(folder)


def test_mixed_orientation_is_refused(series):
    folder, _, paths = series
    ds = pydicom.dcmread(paths[1])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(paths[1])
    with pytest.raises(ScanError, match="mixes slice orientations"):
        read_scan(folder)


def test_mixed_pixel_spacing_is_refused_naming_both_files(series):
    folder, _, paths = series
    ds = pydicom.dcmread(paths[1])
    ds.PixelSpacing = [0.5, 0.5]
    ds.save_as(paths[1])
    with pytest.raises(
        ScanError,
        match=rf"mixes image grids: \w+ is 12x10 at \(0.6, 0.75\) mm, {paths[1].name} is 12x10 at \(0.5, 0.5\) mm",
    ):
        read_scan(folder)


def test_single_slice_is_refused(series):
    folder, _, paths = series
    for path in paths[1:]:
        path.unlink()
    with pytest.raises(ScanError, match=rf"{paths[0].name}: is a single 2D image"):
        read_scan(folder)


def test_uneven_slice_spacing_is_refused(series):
    folder, _, paths = series
    ds = pydicom.dcmread(paths[2])
    # 0.5 mm further along the normal: steps 2.5, 3.0, 2.0, ...: no gap, no duplicate, uneven.
    position = np.asarray(ds.ImagePositionPatient, dtype=float) + GEOMETRY.direction_matrix[:, 2] * 0.5
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.save_as(paths[2])
    with pytest.raises(ScanError, match=r"slice spacing is not uniform: steps range 2.000-3.000 mm"):
        read_scan(folder)


def test_gantry_tilt_is_refused(series):
    folder, _, paths = series
    d = GEOMETRY.direction_matrix
    for path in paths:
        ds = pydicom.dcmread(path)
        k = ds.InstanceNumber - 1
        # Slide each slice sideways along the rows: a sheared (tilted) stack.
        position = np.asarray(ds.ImagePositionPatient, dtype=float) + d[:, 1] * 0.4 * k
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.save_as(path)
    with pytest.raises(ScanError, match="gantry tilt"):
        read_scan(folder)


def test_folder_with_two_series_asks_which(tmp_path):
    geometry = make_geometry((8, 8, 4))
    uid_a, uid_b = "1.2.3.4.1", "1.2.3.4.2"
    write_dicom_series(tmp_path / "a", phantom(geometry.shape), geometry, series_uid=uid_a)
    write_dicom_series(tmp_path / "b", phantom(geometry.shape), geometry, series_uid=uid_b)
    with pytest.raises(ScanError, match=r"holds 2 DICOM series.*--series-uid"):
        read_scan(tmp_path)
    assert read_scan(tmp_path, series_uid=uid_b).source == tmp_path / "b"


def test_empty_series_uid_falls_back_to_geometry(tmp_path):
    geometry = make_geometry((8, 8, 4))
    write_dicom_series(tmp_path, phantom(geometry.shape), geometry, series_uid="")
    volume = read_scan(tmp_path)
    assert volume.geometry.shape == (8, 8, 4)


def test_non_dicom_files_in_series_folder_are_ignored(series):
    folder, array, _ = series
    (folder / "README.txt").write_text("notes")
    np.testing.assert_array_equal(read_scan(folder).array[0], array)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ScanError, match="holds no scan medseg can read"):
        read_scan(tmp_path)
