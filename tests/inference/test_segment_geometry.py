"""Round trips: a scan in any orientation comes back on its own grid, to the voxel.

A known-answer network (per-pixel thresholds) makes the expected label map exactly the
thresholded input, so any flip, transpose or shift introduced on the way shows up.
"""

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from helpers import (
    ThresholdNet,
    make_geometry,
    phantom,
    rotation,
    segment_one,
    threshold_labels,
    threshold_model,
    write_dicom_series,
    write_itk,
    write_nifti,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medseg.io.volume import Geometry

LOW, HIGH = 50.0, 200.0

# Axis permutations and flips in LPS: RAS, LPS, LAS, PIR-like, plus obliques.
DIRECTIONS = {
    "RAS": np.diag([-1.0, -1.0, 1.0]),
    "LPS": np.eye(3),
    "LAS": np.diag([1.0, -1.0, 1.0]),
    "PIR": np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
    "oblique": rotation((10.8, -4.0, 30.0)),
    "oblique-flipped": rotation((-35.0, 20.0, 5.0)) @ np.diag([1.0, -1.0, 1.0]),
}


def _check_output(result, geometry: Geometry, expected: np.ndarray) -> None:
    itk = sitk.ReadImage(str(result))
    read_back = Geometry(tuple(itk.GetSize()), itk.GetSpacing(), itk.GetOrigin(), itk.GetDirection())
    assert geometry.mismatch(read_back) is None
    img = nib.load(str(result))
    assert img.get_data_dtype() == np.uint8
    assert int(img.header["qform_code"]) == int(img.header["sform_code"]) == 1
    np.testing.assert_array_equal(np.asarray(img.dataobj), expected)


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
@pytest.mark.parametrize("slice_axis", ["axial", "sagittal", "coarsest"])
def test_voxel_exact_round_trip(tmp_path, name, slice_axis):
    geometry = make_geometry((23, 17, 9), (0.7, 1.2, 3.3), direction=DIRECTIONS[name])
    array = phantom(geometry.shape)
    path = write_nifti(tmp_path / "scan.nii.gz", array, geometry)
    model = threshold_model(LOW, HIGH, slice_axis=slice_axis)
    result = segment_one(path, model, tmp_path / "out")
    _check_output(result, geometry, threshold_labels(array, LOW, HIGH))


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_nrrd_and_mha_inputs(tmp_path, suffix):
    geometry = make_geometry((15, 21, 8), (1.1, 0.6, 2.0), direction=DIRECTIONS["oblique"])
    array = phantom(geometry.shape)
    path = write_itk(tmp_path / f"scan{suffix}", array, geometry)
    result = segment_one(path, threshold_model(LOW, HIGH), tmp_path / "out")
    assert result.name == "scan.nii.gz"
    _check_output(result, geometry, threshold_labels(array, LOW, HIGH))


def test_dicom_series_input(tmp_path):
    geometry = make_geometry((14, 12, 6), (0.8, 0.8, 5.0), direction=DIRECTIONS["oblique"])
    array = np.round(phantom(geometry.shape))
    write_dicom_series(tmp_path / "Series 3 (T1)", array, geometry)
    model = threshold_model(LOW, HIGH)
    result = segment_one(tmp_path / "Series 3 (T1)", model, tmp_path / "out")
    assert result.name.startswith("Series_3_T1__S3_synthetic_")  # sanitised, with a UID hash
    # DICOM positions carry 6 decimals: the grid agrees to well under 1e-4 mm.
    _check_output(result, geometry, threshold_labels(array, LOW, HIGH))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.tuples(st.integers(5, 40), st.integers(5, 40), st.integers(2, 12)),
    spacing=st.tuples(*[st.floats(0.3, 6.0)] * 3),
    angles=st.tuples(*[st.floats(-180, 180)] * 3),
    flip=st.sampled_from([1.0, -1.0]),
    axis=st.sampled_from(["axial", "coronal", "sagittal", "coarsest"]),
    window=st.sampled_from([(16, 16), (32, 16), (64, 64)]),
)
def test_property_any_grid_any_axis_any_window(tmp_path, shape, spacing, angles, flip, axis, window):
    """Random oblique grids, odd sizes, and windows small enough to force sliding windows."""
    direction = rotation(angles) @ np.diag([1.0, 1.0, flip])
    geometry = make_geometry(shape, spacing, direction=direction)
    array = phantom(shape)
    path = write_nifti(tmp_path / "p.nii.gz", array, geometry)
    model = threshold_model(LOW, HIGH, slice_axis=axis, window=window, values=(0, 3, 7))
    result = segment_one(path, model, tmp_path / "o", batch_size=3)
    expected = threshold_labels(array, LOW, HIGH)
    _check_output(result, geometry, np.choose(expected, [0, 3, 7]).astype(np.uint8))


def test_in_plane_resampling_keeps_grid_and_accuracy(tmp_path):
    """Resampled to 2 mm and back: same grid, and close to the native answer."""
    geometry = make_geometry((61, 47, 6), (0.7, 0.9, 3.0), direction=DIRECTIONS["oblique"])
    array = phantom(geometry.shape)
    path = write_nifti(tmp_path / "scan.nii.gz", array, geometry)
    model = threshold_model(LOW, HIGH, spacing=(1.5, 1.5))
    result = segment_one(path, model, tmp_path / "out")
    out = np.asarray(nib.load(str(result)).dataobj)
    expected = threshold_labels(array, LOW, HIGH)
    assert out.shape == expected.shape
    for label in (1, 2):
        a, b = out == label, expected == label
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > 0.9, f"label {label}: Dice {dice:.3f}"


class ContextThresholdNet(ThresholdNet):
    """Thresholds the middle of 2k+1 context channels: proves the centre channel is the slice."""

    def __init__(self, low: float, high: float, context: int) -> None:
        super().__init__(low, high)
        self.context = context

    def forward(self, x):
        return super().forward(x[:, self.context : self.context + 1])


def test_context_slices_feed_centre_slice_in_the_middle(tmp_path):
    from dataclasses import replace

    from medseg.model import Model
    from medseg.spec import NetworkSpec

    geometry = make_geometry((19, 14, 9), direction=DIRECTIONS["oblique"])
    array = phantom(geometry.shape)
    path = write_nifti(tmp_path / "scan.nii.gz", array, geometry)
    base = threshold_model(LOW, HIGH, slice_axis="coronal")
    spec = replace(base.spec, context_slices=2, network=NetworkSpec(in_channels=5, out_channels=3))
    model = Model(spec=spec, network=ContextThresholdNet(LOW, HIGH, 2), folder=base.folder)
    result = segment_one(path, model, tmp_path / "out")
    _check_output(result, geometry, threshold_labels(array, LOW, HIGH))


def test_largest_component_postprocess_removes_islands(tmp_path):
    from dataclasses import replace

    from medseg.model import Model

    geometry = make_geometry((30, 26, 12))
    array = np.zeros(geometry.shape, np.float32)
    array[5:15, 5:15, 2:8] = 100  # the structure (label 1)
    array[25:27, 20:22, 10:11] = 100  # a stray island of label 1
    path = write_nifti(tmp_path / "scan.nii.gz", array, geometry)
    base = threshold_model(LOW, HIGH)
    model = Model(replace(base.spec, postprocess="largest_component"), base.network, base.folder)
    out = nib.load(str(segment_one(path, model, tmp_path / "out"))).get_fdata()
    assert out[5:15, 5:15, 2:8].min() == 1 and out[25:27, 20:22, 10:11].max() == 0
    plain = nib.load(str(segment_one(path, base, tmp_path / "plain"))).get_fdata()
    assert plain[25:27, 20:22, 10:11].min() == 1  # the control: without it the island stays


def test_ensemble_of_views_averages_probabilities(tmp_path):
    """Members slicing along different axes; the known answer survives the averaging."""
    from medseg.model import Model

    geometry = make_geometry((21, 18, 11), direction=DIRECTIONS["oblique"])
    array = phantom(geometry.shape)
    path = write_nifti(tmp_path / "scan.nii.gz", array, geometry)
    members = tuple(threshold_model(LOW, HIGH, slice_axis=a) for a in ("axial", "coronal", "sagittal"))
    ensemble = Model(members[0].spec, None, tmp_path, members=members)
    result = segment_one(path, ensemble, tmp_path / "out")
    _check_output(result, geometry, threshold_labels(array, LOW, HIGH))
