"""NIfTI label writer: qform == sform with codes set, smallest type, atomic."""

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from helpers import make_geometry, rotation

from medseg.io.files import atomic_path
from medseg.io.volume import Geometry
from medseg.io.writers import write_nifti_labels


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([1.0, -1.0, -1.0]), rotation((20, 5, -30))])
def test_written_geometry_agrees_in_nibabel_and_simpleitk(tmp_path, direction):
    geometry = make_geometry((7, 9, 5), (0.5, 0.9, 4.0), direction=direction)
    labels = np.random.default_rng(0).integers(0, 3, geometry.shape).astype(np.uint8)
    path = write_nifti_labels(labels, geometry, tmp_path / "labels.nii.gz")
    img = nib.load(str(path))
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-6)
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), labels)
    itk = sitk.ReadImage(str(path))
    from_itk = Geometry(tuple(itk.GetSize()), itk.GetSpacing(), itk.GetOrigin(), itk.GetDirection())
    assert geometry.mismatch(from_itk) is None
    assert Geometry.from_affine_ras(img.affine, img.shape).mismatch(geometry) is None


def test_label_values_above_255_use_uint16(tmp_path):
    geometry = make_geometry((4, 4, 4))
    labels = np.zeros(geometry.shape, np.int64)
    labels[0, 0, 0] = 300
    path = write_nifti_labels(labels, geometry, tmp_path / "big.nii.gz")
    assert nib.load(str(path)).get_data_dtype() == np.uint16


def test_shape_mismatch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="do not match"):
        write_nifti_labels(np.zeros((3, 3, 3), np.uint8), make_geometry((4, 4, 4)), tmp_path / "x.nii.gz")
    assert not list(tmp_path.iterdir())


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []
