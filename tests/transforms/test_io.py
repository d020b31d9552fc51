"""LoadScan(d): medseg's reader in MONAI pipelines, with no fallback to MONAI's readers."""

import numpy as np
import pytest
import torch
from helpers import make_geometry, phantom, rotation, write_dicom_series, write_itk
from monai.data import MetaTensor
from monai.transforms import LoadImage

from medseg.errors import ScanError
from medseg.io.monai_reader import ScanReader
from medseg.spec import ModelSpec, NetworkSpec, labels_from_names
from medseg.transforms import LoadScan, LoadScand, build_transforms

GEOMETRY = make_geometry((12, 10, 6), (0.75, 0.6, 2.5), direction=rotation((10.8, 0, 3.0)))


@pytest.fixture
def gap_series(tmp_path):
    """A DICOM series with its third slice deleted: medseg refuses it, PydicomReader does not."""
    folder = tmp_path / "series"
    paths = write_dicom_series(folder, np.round(phantom(GEOMETRY.shape)), GEOMETRY)
    paths[2].unlink()
    return folder


def test_same_metatensor_as_scan_reader_in_load_image(tmp_path):
    path = write_itk(tmp_path / "scan.nrrd", phantom(GEOMETRY.shape), GEOMETRY)
    ours = LoadScan()(path)
    theirs = LoadImage(reader=ScanReader())(path)
    assert isinstance(ours, MetaTensor) and ours.shape == (1, *GEOMETRY.shape)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours.as_tensor(), theirs.as_tensor())
    torch.testing.assert_close(ours.affine, theirs.affine)
    np.testing.assert_allclose(ours.affine.numpy(), GEOMETRY.affine_ras(), atol=1e-6)
    assert ours.meta["filename_or_obj"] == str(path) == theirs.meta["filename_or_obj"]
    assert sorted(ours.meta) == sorted(theirs.meta)


def test_dtype_and_image_only(tmp_path):
    path = write_itk(tmp_path / "seg.nrrd", (phantom(GEOMETRY.shape) > 50).astype(np.uint8), GEOMETRY)
    image, meta = LoadScan(image_only=False, dtype=torch.uint8)(path)
    assert image.dtype == torch.uint8 and set(torch.unique(image).tolist()) == {0, 1}
    assert meta["filename_or_obj"] == str(path)
    data = LoadScand("label", image_only=False)({"label": path})
    assert data["label"].dtype == torch.float32 and data["label_meta_dict"]["filename_or_obj"] == str(path)


def test_refused_series_raises_scan_error_naming_the_folder(gap_series):
    with pytest.raises(ScanError, match=r"series: series has missing slices") as info:
        LoadScand("image")({"image": gap_series})
    assert info.value.path == gap_series
    # MONAI's own loader, given medseg's reader, quietly falls back to PydicomReader.
    assert LoadImage(reader=ScanReader())(gap_series).shape[-1] == GEOMETRY.shape[2] - 1


def test_build_transforms_refuses_what_medseg_refuses(gap_series):
    spec = ModelSpec(labels=labels_from_names(["bg", "fg"]), network=NetworkSpec(out_channels=2), preset="ct_abdomen")
    # MONAI's Compose wraps a transform's error in a RuntimeError; medseg's is its cause.
    with pytest.raises(RuntimeError) as info:
        build_transforms(spec)({"image": str(gap_series)})
    cause = info.value.__cause__
    assert isinstance(cause, ScanError) and cause.path == gap_series
    assert "missing slices" in str(cause)


def test_series_uid_key_picks_the_series(tmp_path):
    small = make_geometry((8, 8, 4))
    uid_a, uid_b = "1.2.3.4.1", "1.2.3.4.2"
    write_dicom_series(tmp_path / "a", phantom(small.shape), small, series_uid=uid_a)
    write_dicom_series(tmp_path / "b", phantom(small.shape, seed=1) + 50, small, series_uid=uid_b)
    load = LoadScand("image", series_uid_key="series_uid")
    with pytest.raises(ScanError, match="holds 2 DICOM series"):
        load({"image": tmp_path, "series_uid": None})  # empty: no series picked
    b = load({"image": tmp_path, "series_uid": uid_b})["image"]
    np.testing.assert_allclose(b[0].numpy(), np.round(phantom(small.shape, seed=1) + 50), atol=0.5)
    spec = ModelSpec(labels=labels_from_names(["bg", "fg"]), network=NetworkSpec(out_channels=2), preset="none")
    a = build_transforms(spec)({"image": tmp_path, "series_uid": uid_a})["image"]  # RAS: flipped
    assert float(b.mean()) - float(a.mean()) == pytest.approx(50, abs=1)


def test_allow_missing_keys(tmp_path):
    path = write_itk(tmp_path / "scan.mha", phantom(GEOMETRY.shape), GEOMETRY)
    with pytest.raises(KeyError):
        LoadScand(("image", "label"))({"image": path})
    data = LoadScand(("image", "label"), allow_missing_keys=True)({"image": path})
    assert set(data) == {"image"} and data["image"].shape == (1, *GEOMETRY.shape)


def test_load_scan_takes_one_path_in_a_list_and_refuses_several(tmp_path):
    import numpy as np
    from helpers import make_geometry, write_nifti

    from medseg.transforms import LoadScan

    path = write_nifti(tmp_path / "a.nii.gz", np.zeros((4, 5, 6), np.float32), make_geometry((4, 5, 6)))
    assert tuple(LoadScan()([str(path)]).shape) == (1, 4, 5, 6)
    with pytest.raises(ValueError, match="one scan per call"):
        LoadScan()([str(path), str(path)])
