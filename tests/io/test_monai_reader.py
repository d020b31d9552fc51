"""ScanReader behind MONAI's LoadImage: by instance, by name and by dotted name."""

import numpy as np
import pytest
import torch
from helpers import make_geometry, phantom, write_dicom_series, write_itk, write_nifti
from monai.data import NibabelReader
from monai.transforms import LoadImage, LoadImaged
from monai.transforms.io.array import SUPPORTED_READERS

from medseg.io import monai_reader
from medseg.io.monai_reader import ScanReader
from medseg.transforms import LoadScan

GEOMETRY = make_geometry((9, 7, 5), (0.7, 0.9, 2.0))


@pytest.mark.parametrize("name", ["ScanReader", "scanreader", "medseg.io.monai_reader.ScanReader"])
def test_load_image_resolves_scan_reader_by_name(tmp_path, name):
    path = write_itk(tmp_path / "scan.nrrd", phantom(GEOMETRY.shape), GEOMETRY)
    loader = LoadImage(reader=name)
    assert isinstance(loader.readers[-1], ScanReader)  # the one tried first
    image = loader(path)
    torch.testing.assert_close(image.as_tensor(), LoadScan()(path).as_tensor())
    np.testing.assert_allclose(image.affine.numpy(), GEOMETRY.affine_ras(), atol=1e-6)


def test_reader_arguments_reach_scan_reader_by_name(tmp_path):
    write_dicom_series(tmp_path / "a", phantom(GEOMETRY.shape), GEOMETRY, series_uid="1.2.3.1")
    write_dicom_series(tmp_path / "b", phantom(GEOMETRY.shape) + 40, GEOMETRY, series_uid="1.2.3.2")
    data = LoadImaged("image", reader="ScanReader", series_uid="1.2.3.2")({"image": tmp_path})
    assert data["image"].shape == (1, *GEOMETRY.shape)
    assert float(data["image"].mean()) == pytest.approx(float(phantom(GEOMETRY.shape).mean()) + 40, abs=1)


def test_registration_leaves_monai_choices_alone(tmp_path):
    """First in SUPPORTED_READERS is last in MONAI's order: a plain LoadImage still reads a
    NIfTI with NibabelReader, and registering again changes nothing."""
    assert next(iter(SUPPORTED_READERS)) == "scanreader" and SUPPORTED_READERS["scanreader"] is ScanReader
    before = list(SUPPORTED_READERS.items())
    monai_reader._register_by_name()
    assert list(SUPPORTED_READERS.items()) == before
    path = write_nifti(tmp_path / "scan.nii.gz", phantom(GEOMETRY.shape), GEOMETRY)
    loader = LoadImage()
    chosen = next(r for r in loader.readers[::-1] if r.verify_suffix(str(path)))
    assert isinstance(chosen, NibabelReader)
    assert loader(path).shape == GEOMETRY.shape  # MONAI's own reader: no channel axis
