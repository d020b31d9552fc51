"""Real scans from ../shared/data: geometry equal to the input's, masks that line up."""

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from helpers import segment_one, threshold_labels, threshold_model

from medseg.cli import main
from medseg.io import read_scan
from medseg.io.volume import Geometry

pytestmark = pytest.mark.realdata


def _itk_geometry(img: sitk.Image) -> Geometry:
    return Geometry(tuple(img.GetSize()), img.GetSpacing(), img.GetOrigin(), img.GetDirection())


def _itk_series(folder) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


@pytest.mark.parametrize(
    "relative",
    ["totalsegmentator/example_ct_dicom", "dicom_mr_studies/Study3/26401-T1prereg-52906"],
)
def test_dicom_series_match_itk(shared_data, relative):
    """Our reader agrees with ITK/GDCM on grid and voxels (JPEG 2000 CT; oblique MR)."""
    volume = read_scan(shared_data / relative)
    itk = _itk_series(shared_data / relative)
    assert volume.geometry.mismatch(_itk_geometry(itk)) is None
    np.testing.assert_array_equal(volume.array[0], sitk.GetArrayFromImage(itk).T)


def test_ct_jpeg2000_mask_lines_up_with_reference(shared_data, tmp_path):
    """HU thresholds of our output, resampled onto the TotalSegmentator mask's (row-flipped)
    grid, put liver and spleen in soft tissue and the humeri in bone; any flip breaks that."""
    folder = shared_data / "totalsegmentator/example_ct_dicom"
    out = sitk.ReadImage(str(segment_one(folder, threshold_model(-100, 300), tmp_path)))
    assert _itk_geometry(out).mismatch(_itk_geometry(_itk_series(folder))) is None
    mask = sitk.ReadImage(str(shared_data / "totalsegmentator/example_seg_dicom.nii.gz"))
    on_mask = sitk.Resample(out, mask, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    ours, ref = sitk.GetArrayFromImage(on_mask), sitk.GetArrayFromImage(mask)

    def lines_up(labels: np.ndarray) -> bool:
        soft = min((labels[ref == organ] == 1).mean() for organ in (1, 5))  # spleen, liver
        bone = (labels[np.isin(ref, (69, 70))] == 2).mean()
        return soft > 0.99 and bone > 0.65

    assert lines_up(ours)
    # The same check must reject a mask flipped along any axis.
    assert not any(lines_up(np.flip(ours, axis)) for axis in range(3))


@pytest.mark.parametrize(
    "relative",
    [
        "dicom_mr_studies/Study3/26401-T1prereg-52906",  # oblique (10.8 degrees) MR series
        "totalsegmentator/example_mr_sm.nii.gz",  # LPS MR NIfTI
        "slicerio/CTChest4.nrrd",  # Slicer's CT NRRD
        "monai_testing/anatomical.nii",  # big-endian LAS NIfTI
    ],
)
def test_real_scan_voxel_exact_on_original_grid(shared_data, tmp_path, relative):
    path = shared_data / relative
    volume = read_scan(path)
    low, high = np.percentile(volume.array, (40, 80))
    result = segment_one(path, threshold_model(low, high), tmp_path)
    itk_in = _itk_series(path) if path.is_dir() else sitk.ReadImage(str(path))
    itk_out = sitk.ReadImage(str(result))
    assert _itk_geometry(itk_out).mismatch(_itk_geometry(itk_in)) is None
    expected = threshold_labels(sitk.GetArrayFromImage(itk_in).T.astype(np.float32), low, high)
    np.testing.assert_array_equal(np.asarray(nib.load(str(result)).dataobj), expected)


def test_cli_segments_real_crop_series_with_article_unet(shared_data, tmp_path, tiny_model_dir):
    """The real network end to end through the command line on a hippocampus crop series."""
    series = shared_data / "dicom_mr_studies/Study1/13_HCropVolume"
    code = main(["segment", str(series), "-o", str(tmp_path), "--model", str(tiny_model_dir)])
    assert code == 0
    (output,) = tmp_path.glob("13_HCropVolume_HippoCrop_*.nii.gz")
    out = sitk.ReadImage(str(output))
    assert _itk_geometry(out).mismatch(_itk_geometry(_itk_series(series))) is None
    assert set(np.unique(sitk.GetArrayFromImage(out))) <= {0, 1, 2}
