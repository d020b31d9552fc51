"""The region each slice goes through the network as: no more pixels than the result needs.

Known-answer networks (per-pixel thresholds) make the right label map exact whatever the
region, so a crop or padding placed wrongly shows up as wrong voxels; a recording engine
shows the sizes the network was really given.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ThresholdNet, threshold_labels, threshold_model

from medseg.inference.options import InferenceOptions
from medseg.inference.predictor import SlicePredictor, argmax_labels
from medseg.inference.regions import SliceRegion, content_box, cut_region, paste_region, plan_region
from medseg.inference.segment import segment_volume
from medseg.io.volume import Geometry, Volume
from medseg.transforms.slices import pad_slices

LOW, HIGH = 50.0, 200.0


class Recording:
    """An engine that thresholds per pixel and records the (H, W) of every call."""

    name, precision = "recording", "fp32"

    def __init__(self) -> None:
        self.net, self.sizes = ThresholdNet(LOW, HIGH), []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[-2:]))
        return self.net(x)


def _volume(array: np.ndarray) -> Volume:
    geometry = Geometry(array.shape, (0.8, 0.9, 2.5), (10.0, -20.0, 5.0), tuple(np.eye(3).ravel()))
    return Volume(array[None].astype(np.float32), geometry, source=Path("synthetic.nii.gz"))


def _segment(array: np.ndarray, **model_args) -> tuple[np.ndarray, list[tuple[int, int]]]:
    model = threshold_model(LOW, HIGH, **model_args)
    predictor = SlicePredictor(model, InferenceOptions(device="cpu", precision="fp32", engine="torch"))
    predictor.engine = Recording()
    return segment_volume(_volume(array), predictor), predictor.engine.sizes


def _ct_like(shape: tuple[int, int, int]) -> np.ndarray:
    """Air (exactly 0, the minimum) around an off-centre body (100) holding a core (300)."""
    x, y, _ = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = ((x - 0.1) / 0.5) ** 2 + ((y + 0.2) / 0.3) ** 2 < 1
    core = ((x - 0.2) / 0.15) ** 2 + ((y + 0.25) / 0.1) ** 2 < 1
    return (100.0 * body + 200.0 * core).astype(np.float32)


def test_small_slices_of_an_untrained_model_are_not_blown_up_to_its_window():
    """init-model's 512 window: a 36x52 slice runs as 48x64, not 512x512 (10x the pixels)."""
    rng = np.random.default_rng(0)
    array = rng.normal(120, 80, size=(36, 52, 7)).astype(np.float32)  # axial slices of 36x52
    labels, sizes = _segment(array, window=(512, 512))
    np.testing.assert_array_equal(labels, threshold_labels(array, LOW, HIGH))
    assert set(sizes) == {(48, 64)}


def test_slices_that_fit_the_trained_window_are_padded_as_training_padded_them():
    region = plan_region((40, 30), None, multiple=16, window=(64, 48), trained_window=(64, 48))
    x = torch.arange(40 * 30, dtype=torch.float32).reshape(1, 1, 40, 30)
    padded, _ = pad_slices(x, (64, 48), -1.0)
    assert region.whole and region.size == (64, 48)
    torch.testing.assert_close(cut_region(x, region, -1.0), padded)  # training's pad_slices, exactly
    back = paste_region(cut_region(x, region, -1.0), region, (40, 30), torch.zeros(1))
    torch.testing.assert_close(back, x)


def test_content_crop_gives_the_uncropped_labels_with_fewer_pixels():
    array = _ct_like((200, 160, 6))
    labels, sizes = _segment(array, window=(512, 512))
    np.testing.assert_array_equal(labels, threshold_labels(array, LOW, HIGH))
    ((rows, cols),) = set(sizes)
    box = content_box(torch.from_numpy(array)[None], 2, 0.0)
    assert rows % 16 == 0 and cols % 16 == 0
    assert box[0][1] - box[0][0] <= rows < 200 and box[1][1] - box[1][0] <= cols < 160


def test_content_crop_with_a_sliding_window():
    """Slices larger than the window: the crop goes through MONAI's sliding window."""
    array = _ct_like((150, 130, 3))
    labels, sizes = _segment(array, window=(32, 32))
    np.testing.assert_array_equal(labels, threshold_labels(array, LOW, HIGH))
    assert set(sizes) == {(32, 32)}


def test_no_crop_without_a_background_label():
    """Outside a crop is background, label 0: a model without one runs whole slices."""
    array = _ct_like((64, 48, 2))
    labels, sizes = _segment(array, values=(3, 1, 2), window=(512, 512))
    np.testing.assert_array_equal(labels, np.array([3, 1, 2], np.uint8)[threshold_labels(array, LOW, HIGH)])
    assert set(sizes) == {(64, 48)}


def test_uniform_volume_runs_whole():
    array = np.full((20, 30, 2), 7.0, np.float32)
    labels, sizes = _segment(array, window=(512, 512))
    assert (labels == 0).all() and set(sizes) == {(32, 32)}


@pytest.mark.parametrize(
    ("size", "box", "expected"),
    [
        ((512, 512), ((40, 476), (100, 410)), ((18, 498), (79, 431))),  # a body: 480x352 around it
        ((512, 512), ((0, 512), (0, 512)), ((0, 512), (0, 512))),  # filled: whole
        ((500, 37), None, ((-6, 506), (-5, 43))),  # no crop: padded evenly to multiples of 16
        ((512, 512), ((0, 5), (500, 512)), ((0, 32), (480, 512))),  # at the edges: kept inside
    ],
)
def test_plan_region(size, box, expected):
    region = plan_region(size, box, multiple=16, window=(512, 512), trained_window=None)
    assert region == SliceRegion(*expected, whole=True)


@pytest.mark.parametrize("dim", [0, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int16])
def test_argmax_labels_is_the_argmax_with_its_ties(dim, dtype):
    """Label values of torch.argmax, first class on ties (small integers make many ties),
    along any axis, in the dtypes scores come in."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (3, 4, 5, 6), generator=generator).to(dtype)
    values = (0, 7, 2, 255, 9, 1)[: scores.shape[dim]]
    expected = torch.tensor(values, dtype=torch.uint8)[scores.float().argmax(dim=dim)]
    got = argmax_labels(scores, values, dim=dim)
    assert got.dtype == torch.uint8 and torch.equal(got, expected)
    # A channels-last (N, classes, H, W) batch, as engines return.
    if dim == 1:
        assert torch.equal(argmax_labels(scores.contiguous(memory_format=torch.channels_last), values), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_argmax_labels_lets_nan_win_as_torch_argmax_does(dtype):
    nan = float("nan")
    scores = torch.tensor([[1, nan, 2], [1, 3, nan], [0, nan, nan], [nan, 5, 6], [2, 1, 0]], dtype=dtype).T[None]
    values = (0, 1, 2)
    expected = torch.tensor(values, dtype=torch.uint8)[scores.float().argmax(dim=1)]
    assert torch.equal(argmax_labels(scores, values), expected)
    assert expected.tolist() == [[1, 2, 1, 0, 0]]
