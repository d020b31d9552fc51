"""Readers: geometry and voxels exactly as written, clear errors naming the file."""

import gzip

import nibabel as nib
import numpy as np
import pytest
from helpers import make_geometry, phantom, rotation, write_itk, write_nifti

from medseg.errors import ScanError
from medseg.io import read_scan

OBLIQUE = rotation((12.0, -7.0, 25.0))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, -1.0, 1.0]), OBLIQUE])
def test_geometry_and_voxels_round_trip(tmp_path, suffix, direction):
    geometry = make_geometry((13, 11, 7), (0.7, 1.3, 3.1), direction=direction)
    array = phantom(geometry.shape)
    path = tmp_path / f"scan{suffix}"
    (write_nifti if "nii" in suffix else write_itk)(path, array, geometry)
    volume = read_scan(path)
    assert volume.geometry.mismatch(geometry) is None
    np.testing.assert_array_equal(volume.array[0], array)
    assert volume.array.dtype == np.float32


def test_nifti_4d_becomes_channels(tmp_path):
    geometry = make_geometry((9, 8, 7))
    data = np.stack([phantom(geometry.shape, seed=s) for s in range(3)], axis=-1)
    volume = read_scan(write_nifti(tmp_path / "four.nii.gz", data, geometry))
    assert volume.array.shape == (3, 9, 8, 7)
    np.testing.assert_array_equal(volume.array[2], data[..., 2])


def test_nifti_sform_is_used_and_disagreement_noted(tmp_path):
    geometry = make_geometry((9, 8, 7))
    img = nib.Nifti1Image(phantom(geometry.shape), geometry.affine_ras())
    shifted = geometry.affine_ras().copy()
    shifted[0, 3] += 5
    img.set_qform(shifted, code=1)
    img.set_sform(geometry.affine_ras(), code=2)
    nib.save(img, str(tmp_path / "xforms.nii.gz"))
    volume = read_scan(tmp_path / "xforms.nii.gz")
    assert volume.geometry.mismatch(geometry) is None
    assert "qform and sform disagree" in volume.notes[0]  # the run report's warnings carry it


def test_2d_image_is_refused(tmp_path):
    path = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 30), np.float32), np.eye(4)), str(path))
    with pytest.raises(ScanError, match=r"flat\.nii\.gz: is a 2D image"):
        read_scan(path)


def test_single_slice_volume_is_refused(tmp_path):
    path = write_itk(tmp_path / "one.nrrd", np.zeros((20, 30, 1), np.float32), make_geometry((20, 30, 1)))
    with pytest.raises(ScanError, match=r"one\.nrrd: is a 2D image"):
        read_scan(path)


def test_nan_volume_is_refused(tmp_path):
    geometry = make_geometry((9, 8, 7))
    path = write_nifti(tmp_path / "nan.nii.gz", np.full(geometry.shape, np.nan, np.float32), geometry)
    with pytest.raises(ScanError, match=r"nan\.nii\.gz: holds no finite intensity"):
        read_scan(path)


def test_scattered_nans_are_filled_with_minimum(tmp_path):
    geometry = make_geometry((9, 8, 7))
    array = phantom(geometry.shape)
    array[1, 2, 3] = np.nan
    volume = read_scan(write_nifti(tmp_path / "somenan.nii.gz", array, geometry))
    assert np.isfinite(volume.array).all()
    assert volume.array[0, 1, 2, 3] == np.nanmin(array)
    assert "NaN/infinite voxel(s)" in volume.notes[0]


def test_truncated_gzip_names_file(tmp_path):
    geometry = make_geometry((30, 20, 10))
    full = write_nifti(tmp_path / "full.nii.gz", phantom(geometry.shape), geometry).read_bytes()
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(ScanError, match=r"truncated\.nii\.gz: cannot be read as NIfTI"):
        read_scan(path)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.touch()
    with pytest.raises(ScanError, match=r"empty\.nii\.gz: is empty \(0 bytes\)"):
        read_scan(path)


def test_text_file_named_nii(tmp_path):
    path = tmp_path / "notes.nii"
    path.write_text("not an image\n")
    with pytest.raises(ScanError, match=r"notes\.nii: cannot be read"):
        read_scan(path)


def test_gzip_of_text_named_nii_gz(tmp_path):
    path = tmp_path / "text.nii.gz"
    path.write_bytes(gzip.compress(b"hello" * 100))
    with pytest.raises(ScanError, match=r"text\.nii\.gz: cannot be read"):
        read_scan(path)


def test_png_is_not_a_scan(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(ScanError, match=r"photo\.png: is not a scan medseg can read"):
        read_scan(path)


def test_corrupt_nrrd(tmp_path):
    path = tmp_path / "bad.nrrd"
    path.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 10 10 10\nencoding: raw\n\n")
    with pytest.raises(ScanError, match=r"bad\.nrrd: cannot be read"):
        read_scan(path)


def test_missing_path(tmp_path):
    with pytest.raises(ScanError, match="does not exist"):
        read_scan(tmp_path / "nowhere.nii.gz")
