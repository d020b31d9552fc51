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


def test_seg_nrrd_reads_back_in_slicerio_with_names_colours_voxels(tmp_path):
    import slicerio

    from medseg.io.writers import write_seg_nrrd
    from medseg.spec import labels_from_names

    geometry = make_geometry((12, 9, 6), (0.7, 1.2, 3.0), direction=rotation((10, -20, 5)))
    labels = np.zeros(geometry.shape, np.uint8)
    labels[2:5, 1:4, 1:3] = 1
    labels[6:10, 5:8, 3:5] = 2
    spec_labels = labels_from_names(["background", "anterior", "posterior", "absent"])
    path = write_seg_nrrd(labels, geometry, spec_labels, tmp_path / "s.seg.nrrd")
    seg = slicerio.read_segmentation(str(path))
    names = [s["name"] for s in seg["segments"]]
    assert names == ["anterior", "posterior", "absent"]
    anterior = seg["segments"][0]
    np.testing.assert_allclose(anterior["color"], [c / 255 for c in spec_labels[1].color], atol=1e-5)
    assert anterior["labelValue"] == 1 and anterior["layer"] == 0 and anterior["extent"] == [2, 4, 1, 3, 1, 2]
    assert seg["segments"][2]["extent"] == [0, -1, 0, -1, 0, -1]
    np.testing.assert_array_equal(seg["voxels"], labels)
    np.testing.assert_allclose(seg["ijkToLPS"], geometry.affine_lps(), atol=1e-6)


def test_color_table_lines(tmp_path):
    from medseg.io.writers import write_color_table
    from medseg.spec import labels_from_names

    path = write_color_table(labels_from_names(["background", "left part"]), tmp_path / "x.ctbl")
    rows = [line.split() for line in path.read_text().splitlines() if not line.startswith("#")]
    assert rows[0] == ["0", "background", "0", "0", "0", "0"]
    assert rows[1][:2] == ["1", "left_part"] and rows[1][-1] == "255"


def test_seg_nrrd_has_the_segment_fields_slicer_writes(shared_data, tmp_path):
    """Every per-segment field in Slicer's own Segmentation.seg.nrrd is in ours too."""
    import slicerio

    from medseg.io.writers import write_seg_nrrd
    from medseg.spec import labels_from_names

    slicer = slicerio.read_segmentation(str(shared_data / "slicerio" / "Segmentation.seg.nrrd"))
    geometry = make_geometry((6, 5, 4))
    labels = np.zeros(geometry.shape, np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    ours = slicerio.read_segmentation(
        str(write_seg_nrrd(labels, geometry, labels_from_names(["bg", "a"]), tmp_path / "o.seg.nrrd"))
    )
    needed = {"id", "name", "color", "labelValue", "layer", "extent"}
    assert needed <= set(slicer["segments"][0]) and needed <= set(ours["segments"][0])
    assert ours["masterRepresentation"] == slicer["masterRepresentation"] == "Binary labelmap"
