"""Bounded memory (issue 12): one float32 volume per scan, preprocessed in place.

Each test holds a behaviour that keeps memory down (no whole-volume copy, the network's input
freed before restoring, a compact ensemble sum) together with the claim that makes it safe:
the same numbers as the copying code it replaced. Peak RSS itself is measured by
``benchmarks/memory.py``, not here (it would flake).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import make_geometry, phantom, rotation, threshold_model, write_itk, write_nifti
from monai.data import MetaTensor
from monai.transforms import Compose, Orientation

from medseg.inference.options import InferenceOptions
from medseg.inference.predictor import EnsemblePredictor, SlicePredictor
from medseg.inference.segment import predict_labels, prepare, segment_volume
from medseg.io import readers
from medseg.io.readers import read_file
from medseg.io.volume import Volume
from medseg.model import Model
from medseg.spec import ModelSpec, NetworkSpec, labels_from_names
from medseg.transforms.intensity import defer_preset, normalize_intensity, pending_preset
from medseg.transforms.orientation import OrientationInPlace, OrientationInPlaced, flip_

SHAPE = (16, 15, 7)


@pytest.fixture
def small_slabs(monkeypatch):
    """Slabs of one slice, so every multi-slab path runs on tiny volumes."""
    monkeypatch.setattr(readers, "_SLAB_BYTES", 1)


def _ct_like(shape=SHAPE, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1024, 1500, size=shape).astype(np.int16)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("kind", ["int16", "int16-scaled", "float64", "4d"])
def test_nifti_read_slab_by_slab_equals_a_whole_read(tmp_path, small_slabs, suffix, kind):
    data = _ct_like()
    if kind == "float64":
        data = data.astype(np.float64) / 7
    if kind == "4d":
        data = np.stack([data, data * 2, data // 3], axis=-1)
    img = nib.Nifti1Image(data, np.diag([0.8, 1.1, 2.5, 1.0]))
    if kind == "int16-scaled":
        img.header.set_slope_inter(0.37, -12.5)
    path = tmp_path / f"scan{suffix}"
    nib.save(img, str(path))

    volume = read_file(path)
    whole = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    whole = np.moveaxis(whole.reshape(*whole.shape[:3], -1), -1, 0)
    assert volume.array.dtype == np.float32 and volume.array.flags.c_contiguous
    np.testing.assert_array_equal(volume.array, whole)


def test_itk_read_slab_by_slab_equals_a_whole_read(tmp_path, small_slabs):
    data = _ct_like()
    path = write_itk(tmp_path / "scan.nrrd", data, make_geometry(SHAPE))
    volume = read_file(path)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).T.astype(np.float32)
    assert volume.array.dtype == np.float32 and volume.array.flags.c_contiguous
    np.testing.assert_array_equal(volume.array[0], expected)


def test_scattered_nans_are_replaced_slab_by_slab(tmp_path, small_slabs):
    data = phantom(SHAPE)
    data[3, 4, 0], data[10, 2, 6], data[0, 0, 3] = np.nan, np.inf, -np.inf
    volume = read_file(write_nifti(tmp_path / "nan.nii.gz", data, make_geometry(SHAPE)))
    finite = np.isfinite(data)
    expected = np.where(finite, data, data[finite].min())
    np.testing.assert_array_equal(volume.array[0], expected)
    assert any("3 NaN/infinite voxel(s)" in note for note in volume.notes)


def _random_grid_tensor(seed: int, space: str) -> MetaTensor:
    """(2, 16, 15, 7) float32 on a grid with permuted, flipped axes (every orientation)."""
    rng = np.random.default_rng(seed)
    affine = np.eye(4)
    affine[:3, :3] = np.eye(3)[:, rng.permutation(3)] * rng.choice([-1.0, 1.0], 3) * [0.8, 1.1, 2.5]
    affine[:3, 3] = rng.normal(size=3)
    image = MetaTensor(torch.from_numpy(rng.normal(size=(2, *SHAPE)).astype(np.float32)), affine=affine)
    image.meta["space"] = space
    return image


@pytest.mark.parametrize("seed", range(12))
def test_orientation_in_place_equals_monai_and_shares_the_input(seed):
    space = "LPS" if seed % 3 == 0 else "RAS"
    image = _random_grid_tensor(seed, space)
    expected = Orientation("RAS", labels=None)(image.clone())
    storage = image.untyped_storage().data_ptr()

    out = OrientationInPlace("RAS", labels=None)(image)

    assert out.untyped_storage().data_ptr() == storage  # no second volume
    assert torch.equal(out.as_tensor(), expected.as_tensor()) and out.stride() == expected.stride()
    assert torch.equal(out.affine, expected.affine)
    record, reference = out.applied_operations[-1], expected.applied_operations[-1]
    assert record["class"] == "OrientationInPlace" and record["orig_size"] == reference["orig_size"]
    assert np.array_equal(record["extra_info"]["original_affine"], reference["extra_info"]["original_affine"])


def test_orientation_in_place_is_undone_by_compose_inverse():
    image = _random_grid_tensor(5, "RAS")
    original = image.clone()
    transforms = Compose([OrientationInPlaced("image", axcodes="RAS", labels=None)])
    out = transforms({"image": image})["image"]
    back = transforms.inverse({"image": out.clone()})["image"]
    assert torch.equal(back.as_tensor(), original.as_tensor())
    assert torch.allclose(back.affine, original.affine)


def test_flip_in_place_equals_torch_flip():
    x = torch.arange(2 * 9 * 4 * 5, dtype=torch.float32).reshape(2, 9, 4, 5)
    expected = torch.flip(x, [1, 3])
    assert torch.equal(flip_(x, [1, 3], block_bytes=16), expected)


@pytest.mark.parametrize("preset", ["ct_abdomen", "mr"])
def test_intensity_in_place_gives_the_same_values_in_the_same_memory(preset):
    rng = np.random.default_rng(1)
    data = torch.from_numpy(rng.normal(100, 300, size=(2, *SHAPE)).astype(np.float32))
    permuted = data.permute(0, 3, 1, 2)  # a non-contiguous view, as after orientation
    expected = normalize_intensity(permuted, preset)
    out = normalize_intensity(permuted, preset, inplace=True)
    assert out is permuted and out.data_ptr() == data.data_ptr()
    assert torch.equal(out, expected)


def test_prepare_in_place_uses_the_volumes_own_memory_and_equals_prepare_on_a_copy():
    model = threshold_model(50.0, 200.0)
    geometry = make_geometry(SHAPE, direction=np.diag([-1.0, 1.0, -1.0]))  # flips to RAS
    volume = Volume(phantom(SHAPE)[None], geometry, Path("scan.nii.gz"))
    before = volume.array.copy()

    on_copy = prepare(volume, dataclasses.replace(model.spec, preset="ct_abdomen"))
    np.testing.assert_array_equal(volume.array, before)  # left as it was
    in_place = prepare(volume, dataclasses.replace(model.spec, preset="ct_abdomen"), inplace=True)

    assert in_place.image.untyped_storage().data_ptr() == volume.array.ctypes.data
    assert torch.equal(in_place.image.as_tensor(), on_copy.image.as_tensor())
    assert torch.equal(in_place.image.affine, on_copy.image.affine)


def test_predict_labels_frees_the_network_input_and_equals_segment_volume():
    model = threshold_model(50.0, 200.0)
    geometry = make_geometry(SHAPE, direction=rotation((0, 0, 90)))
    volume = Volume(phantom(SHAPE)[None], geometry, Path("scan.nii.gz"))
    expected = segment_volume(volume, SlicePredictor(model))

    prepared = prepare(dataclasses.replace(volume, array=volume.array.copy()), model.spec, inplace=True)
    labels = predict_labels(prepared, SlicePredictor(model))

    assert prepared.image.numel() == 0 and prepared.image.applied_operations  # voxels gone, record kept
    np.testing.assert_array_equal(labels, expected)


def test_a_volume_without_voxels_keeps_its_shape_and_takes_no_memory():
    volume = Volume(phantom(SHAPE)[None], make_geometry(SHAPE), Path("scan.nii.gz"), notes=("a note",))
    light = volume.without_voxels()
    assert light.array.shape == volume.array.shape and light.array.strides == (0, 0, 0, 0)
    assert not light.array.flags.writeable
    assert (light.geometry, light.source, light.notes) == (volume.geometry, volume.source, volume.notes)


def _ensemble(*members: Model) -> Model:
    spec = dataclasses.replace(members[0].spec, members=tuple(f"m{i}" for i in range(len(members))))
    return Model(spec=spec, network=None, folder=Path("ensemble"), members=members)


class _Scaled(torch.nn.Module):
    """Smooth per-pixel logits (no ties): a known network whose probabilities are not 0/1."""

    def __init__(self, weights: tuple[float, float, float]) -> None:
        super().__init__()
        self.w = weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :1].float() / 100
        return torch.cat([w * torch.sin(x * (i + 1)) for i, w in enumerate(self.w)], dim=1)


def test_ensemble_sums_in_a_compact_accumulator_with_the_labels_of_a_float32_sum():
    spec = ModelSpec(
        labels=labels_from_names(["background", "a", "b"]),
        network=NetworkSpec(out_channels=3, base_channels=4),
        preset="none",
    )
    members = [
        Model(spec=dataclasses.replace(spec, slice_axis=axis), network=_Scaled(w), folder=Path(axis))
        for axis, w in (("axial", (1.0, 2.0, 3.0)), ("sagittal", (3.0, 1.0, 2.0)), ("coronal", (2.0, 3.0, 1.0)))
    ]
    predictor = EnsemblePredictor(_ensemble(*members))
    volume = Volume(phantom(SHAPE)[None] * 3, make_geometry(SHAPE), Path("scan.nii.gz"))
    image = prepare(volume, spec).image

    total = torch.zeros((3, *SHAPE), dtype=torch.float32)  # the float32 sum this replaces
    for member in predictor.members:
        member.add_probabilities(image, total)
    exact = torch.tensor(predictor.values, dtype=torch.uint8)[(total / len(members)).argmax(dim=0)]

    assert predictor._sum(image, None).dtype == torch.int16
    torch.testing.assert_close(predictor.predict_probabilities(image), total / len(members), atol=1e-4, rtol=0)
    assert torch.equal(predictor.predict(image), exact)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
@pytest.mark.parametrize(("stored", "kept"), [(np.int16, True), (np.uint8, True), (np.uint16, False)])
def test_integers_keeps_small_stored_integers_in_their_type(tmp_path, small_slabs, suffix, stored, kept):
    data = _ct_like().clip(np.iinfo(stored).min, np.iinfo(stored).max).astype(stored)
    geometry = make_geometry(SHAPE)
    path = (write_nifti if suffix == ".nii.gz" else write_itk)(tmp_path / f"scan{suffix}", data, geometry)
    volume = read_file(path, integers=True)
    assert volume.array.dtype == (np.dtype(stored) if kept else np.float32)
    np.testing.assert_array_equal(volume.array[0], data)
    assert read_file(path).array.dtype == np.float32  # the default is unchanged


def test_integers_keeps_a_big_endian_int16_nifti_in_int16(tmp_path):
    data = _ct_like().astype(">i2")
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 1.1, 2.5, 1.0])), str(tmp_path / "big.nii"))
    volume = read_file(tmp_path / "big.nii", integers=True)
    assert volume.array.dtype == np.dtype(np.int16)  # native order
    np.testing.assert_array_equal(volume.array[0], data)


def test_integers_leaves_scaled_nifti_voxels_to_float32(tmp_path):
    img = nib.Nifti1Image(_ct_like(), np.diag([0.8, 1.1, 2.5, 1.0]))
    img.header.set_slope_inter(0.37, -12.5)
    nib.save(img, str(tmp_path / "scaled.nii"))
    volume = read_file(tmp_path / "scaled.nii", integers=True)
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, read_file(tmp_path / "scaled.nii").array)


def _ct_network_model(window: tuple[int, int], preset: str = "ct_abdomen") -> Model:
    """The known-answer thresholds (0.3 and 0.7 of the window: 0 and 120 HU) under a CT window
    preset: labels that follow the windowed intensities voxel by voxel."""
    model = threshold_model(0.3, 0.7, window=window)
    return dataclasses.replace(model, spec=dataclasses.replace(model.spec, preset=preset))


@pytest.mark.parametrize("window", [(64, 64), (16, 16)], ids=["whole-slices", "sliding-window"])
def test_a_ct_kept_in_int16_is_windowed_per_batch_to_the_same_labels(window):
    """Stored int16 + a CT window: the volume stays int16 (half the memory), the window is
    applied to each slice batch, and the labels equal the float32 path's (content crop,
    padding value and sliding window included)."""
    shape = (40, 33, 9)
    geometry = make_geometry(shape, (0.7, 0.9, 3.0), direction=rotation((0, 180, 0)))
    data = np.full(shape, -1024, dtype=np.int16)  # air around a body, so the content crop bites
    data[6:31, 5:27, :] = _ct_like((25, 22, 9), seed=4) // 4
    model = _ct_network_model(window)
    predictor = SlicePredictor(model, InferenceOptions(device="cpu", precision="fp32", engine="torch"))
    as_float = Volume(data[None].astype(np.float32), geometry, Path("ct.nii.gz"))
    as_int16 = Volume(data[None].copy(), geometry, Path("ct.nii.gz"))

    prepared = prepare(as_int16, model.spec, inplace=True)
    assert prepared.image.dtype == torch.int16 and pending_preset(prepared.image) == "ct_abdomen"
    labels = predict_labels(prepared, predictor)
    expected = segment_volume(as_float, predictor)
    assert set(np.unique(expected)) == {0, 1, 2}  # the comparison means something
    np.testing.assert_array_equal(labels, expected)


def test_a_preset_needing_the_whole_volume_is_never_deferred():
    model = _ct_network_model((64, 64), preset="mr")
    volume = Volume(_ct_like()[None], make_geometry(SHAPE), Path("mr.nii.gz"))
    prepared = prepare(volume, model.spec)
    assert prepared.image.dtype == torch.float32 and pending_preset(prepared.image) is None
    with pytest.raises(ValueError, match="needs the whole volume's statistics"):
        defer_preset(prepared.image, "mr")


def test_segment_keeps_a_ct_in_int16_and_writes_the_labels_of_the_float32_path(tmp_path, monkeypatch):
    """Through medseg.segment: the worker reads int16 (watched at prepare) and the written
    labels equal segment_volume on the float32 read; with --formats qc (voxels shown as
    read) the float32 path is taken."""
    import medseg.batch.worker as worker
    from medseg import segment
    from medseg.io import read_scan

    shape = (40, 33, 9)
    geometry = make_geometry(shape, (0.7, 0.9, 3.0))
    data = np.full(shape, -1024, dtype=np.int16)
    data[6:31, 5:27, :] = _ct_like((25, 22, 9), seed=5) // 4
    scan = write_nifti(tmp_path / "ct.nii.gz", data, geometry)
    model = _ct_network_model((64, 64))
    seen = []
    real_prepare = worker.prepare
    monkeypatch.setattr(worker, "prepare", lambda v, *a, **k: (seen.append(v.array.dtype), real_prepare(v, *a, **k))[1])

    report = segment(scan, tmp_path / "out", model, formats="nifti", device="cpu", precision="fp32", engine="torch")
    assert report.records[0].status == "ok" and seen == [np.dtype(np.int16)]
    predictor = SlicePredictor(model, InferenceOptions(device="cpu", precision="fp32", engine="torch"))
    expected = segment_volume(read_scan(scan), predictor)
    np.testing.assert_array_equal(read_scan(report.records[0].outputs["nifti"]).array[0], expected)

    segment(scan, tmp_path / "qc", model, formats="nifti,qc", device="cpu", precision="fp32", engine="torch")
    assert seen[-1] == np.float32
