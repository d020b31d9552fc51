"""2D slice cutting: slice_stack (training and inference) and the seeded sampler."""

import numpy as np
import pytest
import torch
from helpers import make_geometry
from monai.data import MetaTensor

from medseg.transforms.slices import RandSliceSamplerd, slice_stack


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
