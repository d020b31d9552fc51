"""MONAI transforms: presets, slice-axis rule, in-plane resampling and its recorded inverse."""

import numpy as np
import pytest
import torch
from helpers import make_geometry, phantom, rotation, write_nifti
from monai.data import MetaTensor

from medseg.io.volume import Geometry
from medseg.spec import ModelSpec, NetworkSpec, labels_from_names
from medseg.transforms import (
    NormalizeIntensityPreset,
    ResampleInPlane,
    build_transforms,
    slice_axis_index,
)


def _spec(**kw) -> ModelSpec:
    return ModelSpec(labels=labels_from_names(["bg", "fg"]), network=NetworkSpec(out_channels=2), **kw)


def test_ct_window_maps_to_unit_range():
    hu = torch.tensor([[[[-1000.0, -160.0, 40.0, 240.0, 3000.0]]]])
    out = NormalizeIntensityPreset("ct_abdomen")(hu)
    np.testing.assert_allclose(out.flatten().numpy(), [0, 0, 0.5, 1, 1], atol=1e-6)


def test_mr_preset_is_scale_invariant_and_robust_to_outliers():
    x = torch.from_numpy(phantom((20, 18, 9)))[None]
    a = NormalizeIntensityPreset("mr")(x)
    b = NormalizeIntensityPreset("mr")(x * 5000 + 7)  # another scanner's scale and offset
    torch.testing.assert_close(a, b, atol=1e-3, rtol=0)
    assert abs(float(a.mean())) < 1e-4 and abs(float(a.std()) - 1) < 1e-3
    spiked = x.clone()
    spiked[0, 0, 0, 0] = 1e9  # one hot pixel must not squash everything else
    assert float(NormalizeIntensityPreset("mr")(spiked).std()) == pytest.approx(1, abs=1e-3)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown intensity preset"):
        NormalizeIntensityPreset("ct_liver")


@pytest.mark.parametrize(
    ("direction", "expected"),
    [
        (np.eye(3), {"sagittal": 0, "coronal": 1, "axial": 2}),
        (np.array([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]]), {"sagittal": 2, "coronal": 0, "axial": 1}),
        (rotation((10.8, 0, 0)), {"sagittal": 0, "coronal": 1, "axial": 2}),
    ],
)
def test_slice_axis_follows_anatomy_not_storage(direction, expected):
    affine = make_geometry((5, 6, 7), (1, 1, 1), direction=direction).affine_ras()
    for rule, axis in expected.items():
        assert slice_axis_index(rule, affine) == axis


def test_coarsest_rule_picks_largest_spacing():
    affine = make_geometry((5, 6, 7), (0.7, 5.0, 0.7)).affine_ras()
    assert slice_axis_index("coarsest", affine) == 1
    assert slice_axis_index("coarsest", make_geometry((5, 6, 7), (1, 1, 1)).affine_ras()) == 2


def test_resample_in_plane_records_and_restores_grid():
    geometry = make_geometry((31, 22, 7), (0.7, 1.3, 3.0), direction=rotation((15, -5, 20)))
    image = MetaTensor(torch.from_numpy(phantom(geometry.shape))[None], affine=geometry.affine_ras())
    resampler = ResampleInPlane((2.0, 2.0), "axial")
    out = resampler(image)
    assert out.shape == (1, 11, 14, 7)
    spacing = np.linalg.norm(out.affine.numpy()[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, [0.7 * 31 / 11, 1.3 * 22 / 14, 3.0], rtol=1e-6)
    # Field of view kept: the outer voxel edge of axis 0 stays in place.
    edge = lambda a, n: (a @ np.array([n - 0.5, -0.5, -0.5, 1.0]))[:3]  # noqa: E731
    np.testing.assert_allclose(edge(out.affine.numpy(), 11), edge(geometry.affine_ras(), 31), atol=1e-6)
    labels = (out > 50).to(torch.uint8)
    labels.applied_operations = list(out.applied_operations)
    back = resampler.inverse(labels)
    assert back.dtype == torch.uint8 and back.shape == image.shape
    assert Geometry.from_affine_ras(back.affine.numpy(), back.shape[1:]).mismatch(geometry) is None


def test_compose_loads_and_inverts_with_monai(tmp_path):
    """build_transforms is a MONAI Compose: LoadImaged(ScanReader) in, Compose.inverse back."""
    geometry = make_geometry((25, 19, 8), (0.9, 0.8, 2.5), direction=np.diag([1.0, -1.0, -1.0]))
    path = write_nifti(tmp_path / "s.nii.gz", phantom(geometry.shape), geometry)
    transforms = build_transforms(_spec(preset="ct_abdomen", slice_axis="axial", spacing=(1.6, 1.6)))
    data = transforms({"image": str(path)})
    image = data["image"]
    assert [op["class"] for op in image.applied_operations] == ["Orientation", "ResampleInPlane"]
    assert float(image.min()) >= 0 and float(image.max()) <= 1
    import nibabel as nib

    assert nib.orientations.aff2axcodes(image.affine.numpy()) == ("R", "A", "S")
    labels = MetaTensor((image > 0.5).to(torch.uint8), meta=dict(image.meta))
    labels.applied_operations = list(image.applied_operations)
    restored = transforms.inverse({"image": labels})["image"]
    assert restored.shape == (1, *geometry.shape)
    back = Geometry.from_affine_ras(restored.affine.numpy(), restored.shape[1:])
    assert back.mismatch(geometry) is None


def test_compose_moves_labels_with_image(tmp_path):
    geometry = make_geometry((25, 19, 8), direction=rotation((0, 0, 90)))
    image = phantom(geometry.shape)
    write_nifti(tmp_path / "img.nii.gz", image, geometry)
    write_nifti(tmp_path / "lab.nii.gz", (image > 50).astype(np.float32), geometry)
    transforms = build_transforms(_spec(preset="mr", spacing=(1.0, 1.0)), label_keys=("label",))
    data = transforms({"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")})
    assert data["image"].shape == data["label"].shape
    torch.testing.assert_close(data["image"].affine, data["label"].affine)
    assert set(torch.unique(data["label"]).tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("slice_axis", ["axial", "coronal", "sagittal"])
def test_predictor_batch_inverse_equals_compose_inverse(slice_axis):
    """Inference resamples slice batches to the model's spacing and their probabilities back
    (``InPlaneResampling``, batch by batch); the same grid change on the whole volume, undone
    by MONAI's ``Compose.inverse``, must give the same probabilities on the scan's grid."""
    from dataclasses import replace
    from pathlib import Path

    from helpers import ThresholdNet, threshold_model

    from medseg.inference import InferenceOptions, SlicePredictor
    from medseg.inference.segment import to_original_grid
    from medseg.io.monai_reader import volume_to_metatensor
    from medseg.io.volume import Volume

    g = make_geometry((21, 26, 11), (0.7, 0.9, 1.6), direction=rotation((10.0, -5.0, 30.0)))
    volume = Volume(phantom(g.shape)[None], g, Path("phantom"))
    model = threshold_model(0.3, 0.7, slice_axis=slice_axis, spacing=(1.3, 0.6), window=(64, 64))
    model = replace(model, network=ThresholdNet(0.3, 0.7, sharpness=6.0))  # smooth probabilities

    plain = build_transforms(model.spec, load=False, resample=False)  # what inference runs
    image = plain({"image": volume_to_metatensor(volume)})["image"]
    probabilities = SlicePredictor(model, InferenceOptions(batch_size=4)).predict_probabilities(image)
    ours = to_original_grid(probabilities, image, plain)

    full = build_transforms(model.spec, load=False, resample=True)  # the whole-volume route
    resampled = full({"image": volume_to_metatensor(volume)})["image"]
    assert resampled.shape[1:] != image.shape[1:]  # the grid really changed
    axis = slice_axis_index(slice_axis, resampled.affine)
    with torch.no_grad():
        scores = torch.softmax(model.network(torch.movedim(resampled.as_tensor(), axis + 1, 0)), dim=1)
    theirs = to_original_grid(torch.movedim(scores, 0, axis + 1), resampled, full)

    assert ours.shape == (3, *g.shape)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert 0.05 < float(np.mean(ours[1])) < 0.95  # not a trivial all-one-class answer


@pytest.mark.parametrize("nearest_interp", [True, False])
def test_invertd_nearest_interp_acts_as_for_monai_spacingd(nearest_interp):
    """A float label map predicted on the resampled grid: ``Invertd(nearest_interp=True)``
    brings back labels only, False interpolates, for ResampleInPlaned as for Spacingd."""
    from monai.transforms import Compose, Invertd, Orientationd, Spacingd

    from medseg.transforms import ResampleInPlaned

    geometry = make_geometry((31, 22, 7), (0.7, 1.3, 3.0), direction=rotation((0, 0, 90)))
    image = MetaTensor(torch.from_numpy(phantom(geometry.shape))[None], affine=geometry.affine_ras())
    grid_changes = {
        "medseg": ResampleInPlaned("image", (2.0, 2.0), "axial", mode="bilinear"),
        "monai": Spacingd("image", (2.0, 2.0, 3.0), mode="bilinear"),
    }
    for name, resample in grid_changes.items():
        transforms = Compose([Orientationd("image", axcodes="RAS", labels=None), resample])
        data = transforms({"image": image})
        assert data["image"].applied_operations[-1]["extra_info"]["mode"] == "bilinear"
        data["pred"] = (data["image"] > 80).float() + (data["image"] > 250).float()  # 0., 1., 2.
        out = Invertd("pred", transforms, orig_keys="image", nearest_interp=nearest_interp)(data)["pred"]
        assert out.shape == image.shape and out.dtype == torch.float32, name
        values = torch.unique(out)
        if nearest_interp:
            assert set(values.tolist()) == {0.0, 1.0, 2.0}, name
        else:
            assert len(values) > 20, name  # interpolated in between
        torch.testing.assert_close(out.affine, torch.as_tensor(geometry.affine_ras()), atol=1e-6, rtol=0)


def test_resample_in_plane_rejects_unknown_mode():
    with pytest.raises(ValueError, match="bicubic"):
        ResampleInPlane((1.0, 1.0), "axial", mode="bicubic")
