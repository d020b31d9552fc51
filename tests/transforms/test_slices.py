"""2D slice cutting: slice_stack (training and inference) and the seeded sampler."""

import numpy as np
import pytest
import torch
from helpers import make_geometry, rotation
from monai.data import DataLoader, Dataset, MetaTensor, list_data_collate
from monai.transforms import Compose

import medseg.transforms
from medseg.transforms import PadInPlane, PadInPlaned, RandSliceSamplerd, pad_slices, slice_affine, slice_stack


def _volume(shape=(2, 5, 6, 7)) -> torch.Tensor:
    return torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_stack_without_context_is_plain_indexing(axis):
    image = _volume()
    out = slice_stack(image, axis, [3, 1])
    expected = torch.stack([image.select(axis + 1, 3), image.select(axis + 1, 1)])
    torch.testing.assert_close(out, expected)


def test_slice_stack_context_channels_and_edges():
    image = _volume()
    out = slice_stack(image, 2, [0, 4], context=1)
    assert out.shape == (2, 2 * 3, 5, 6)
    # channel-major: channel c's neighbours -1, 0, +1; index -1 repeats the edge slice.
    torch.testing.assert_close(out[0, 0], image[0, :, :, 0])
    torch.testing.assert_close(out[0, 1], image[0, :, :, 0])
    torch.testing.assert_close(out[0, 2], image[0, :, :, 1])
    torch.testing.assert_close(out[1, 3], image[1, :, :, 3])
    torch.testing.assert_close(out[1, 5], image[1, :, :, 5])


def _pair(shape=(1, 12, 10, 30)):
    geometry = make_geometry(shape[1:], (1, 1, 1))
    image = MetaTensor(torch.randn(shape), affine=geometry.affine_ras())
    label = torch.zeros(shape)
    label[0, 3:6, 2:5, 20:23] = 1  # foreground in 3 of 30 axial slices
    return {"image": image, "label": MetaTensor(label, affine=geometry.affine_ras())}


def test_sampler_oversamples_foreground_and_is_seeded():
    sampler = RandSliceSamplerd(("image", "label"), "label", "axial", num_samples=200, pos_fraction=0.5)
    sampler.set_random_state(seed=7)
    samples = sampler(_pair())
    assert len(samples) == 200
    assert samples[0]["image"].shape == (1, 12, 10) and samples[0]["label"].shape == (1, 12, 10)
    with_fg = np.mean([float(s["label"].max()) > 0 for s in samples])
    assert 0.45 < with_fg < 0.7  # 0.5 + 0.5 * 3/30 expected, against 0.1 without oversampling
    first = [s["slice_index"] for s in samples]
    sampler.set_random_state(seed=7)
    assert [s["slice_index"] for s in sampler(_pair())] == first
    for s in samples[:20]:
        torch.testing.assert_close(s["label"], _pair()["label"][:, :, :, s["slice_index"]])


def test_sampler_context_applies_to_images_only():
    sampler = RandSliceSamplerd(("image", "label"), "label", "axial", num_samples=4, context=2)
    sampler.set_random_state(seed=0)
    sample = sampler(_pair())[0]
    assert sample["image"].shape == (5, 12, 10) and sample["label"].shape == (1, 12, 10)


def test_public_names_resolve():
    for name in medseg.transforms.__all__:
        assert getattr(medseg.transforms, name) is not None, name


@pytest.mark.parametrize(("rule", "axis"), [("axial", 2), ("sagittal", 0), ("coronal", 1)])
def test_sampled_slices_carry_their_2d_affine_and_the_cut(rule, axis):
    data = _pair()
    sampler = RandSliceSamplerd(("image", "label"), "label", rule, num_samples=3)
    sampler.set_random_state(seed=1)
    affine = data["image"].affine.numpy()
    for sample in sampler(data):
        k = sample["slice_index"]
        for key in ("image", "label"):
            out = sample[key]
            assert isinstance(out, MetaTensor) and out.affine.shape == (3, 3)
            op = out.applied_operations[-1]
            assert op["class"] == "RandSliceSamplerd"
            assert op["extra_info"]["slice_axis"] == axis and op["extra_info"]["slice_index"] == k
            assert tuple(op["orig_size"]) == tuple(data[key].shape[1:])
        # Pixel (i, j) of the slice is voxel (.., k, ..) of the volume: same in-plane world place.
        plane = [a for a in range(3) if a != axis]
        for i, j in [(0, 0), (3, 7), (11, 2)]:
            voxel = np.zeros(4)
            voxel[plane[0]], voxel[plane[1]], voxel[axis], voxel[3] = i, j, k, 1
            world = affine @ voxel
            np.testing.assert_allclose(sample["image"].affine.numpy() @ [i, j, 1], [*world[plane], 1], atol=1e-9)


def test_slice_affine_origin_moves_with_the_slice():
    affine = make_geometry((5, 6, 7), (0.5, 0.7, 2.5), direction=rotation((0, 0, 90))).affine_ras()
    a, b = slice_affine(affine, 2, 0), slice_affine(affine, 2, 3)
    torch.testing.assert_close(a[:2, :2], b[:2, :2])
    torch.testing.assert_close(b[:2, 2] - a[:2, 2], torch.as_tensor(affine[:2, 2] * 3))


def test_sampler_keeps_other_items_and_allows_missing_keys():
    keys = ("image", "label", "weights")
    with pytest.raises(KeyError):
        RandSliceSamplerd(keys, "label", "axial", num_samples=2)({**_pair(), "case": "c1"})
    samples = RandSliceSamplerd(keys, "label", "axial", num_samples=2, allow_missing_keys=True)(
        {**_pair(), "case": "c1"}
    )
    assert [set(s) for s in samples] == [{"image", "label", "case", "slice_index"}] * 2
    assert samples[0]["case"] == "c1"
    with pytest.raises(KeyError, match="samples by 'label'"):
        RandSliceSamplerd("image", "label", "axial")({"image": _pair()["image"]})


def test_sampler_output_collates_in_monai_data_loader():
    transform = Compose([RandSliceSamplerd(("image", "label"), "label", "axial", num_samples=3, context=1)])
    loader = DataLoader(Dataset([_pair(), _pair()], transform), batch_size=2, collate_fn=list_data_collate)
    transform.set_random_state(seed=0)
    (batch,) = list(loader)
    assert isinstance(batch["image"], MetaTensor) and batch["image"].shape == (6, 3, 12, 10)
    assert batch["label"].shape == (6, 1, 12, 10) and batch["image"].affine.shape == (6, 3, 3)
    assert batch["slice_index"].shape == (6,)


def test_pad_in_plane_pads_like_training_and_inverts():
    data = _pair()  # (1, 12, 10, 30), axial: in-plane 12 x 10
    transform = Compose([PadInPlaned("image", (16, 15), "axial"), PadInPlaned("label", (16, 15), "axial", value=0)])
    out = transform(data)
    assert out["image"].shape == (1, 16, 15, 30) and out["label"].shape == (1, 16, 15, 30)
    # The same pixels as pad_slices gives slice by slice, filled with the volume's minimum.
    expected, _ = pad_slices(slice_stack(data["image"].as_tensor(), 2, range(30)), (16, 15), float(data["image"].min()))
    torch.testing.assert_close(slice_stack(out["image"].as_tensor(), 2, range(30)), expected)
    # Origin moves back by the pixels added before: 2 along X, 2 along Y.
    shift = out["image"].affine.numpy()[:3, 3] - data["image"].affine.numpy()[:3, 3]
    np.testing.assert_allclose(shift, data["image"].affine.numpy()[:3, :3] @ [-2, -2, 0], atol=1e-9)
    back = transform.inverse(out)
    torch.testing.assert_close(back["image"].as_tensor(), data["image"].as_tensor())
    torch.testing.assert_close(back["label"].affine, data["label"].affine)
    assert PadInPlane((8, 8), "axial")(data["image"]).shape == data["image"].shape  # never crops
