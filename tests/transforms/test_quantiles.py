"""Exact percentiles without a copy: numpy's numbers, bit for bit."""

import numpy as np
import pytest
import torch

import medseg.transforms.quantiles as quantiles
from medseg.transforms.intensity import normalize_intensity
from medseg.transforms.quantiles import order_statistics, percentiles

QS = (0.0, 0.5, 12.345, 50.0, 99.5, 100.0)


@pytest.fixture(params=[False, True], ids=["one-slab", "many-slabs"])
def slabs(request, monkeypatch):
    if request.param:
        monkeypatch.setattr(quantiles, "_SLAB_ELEMENTS", 7)


@pytest.mark.parametrize("n", [1, 2, 3, 199, 200, 201, 4099])
@pytest.mark.parametrize("kind", ["normal", "ties", "signed-zeros", "huge"])
def test_percentiles_equal_numpys_bit_for_bit(slabs, n, kind):
    rng = np.random.default_rng(n)
    x = {
        "normal": rng.normal(300, 1000, n),
        "ties": rng.integers(-3, 4, n),
        "signed-zeros": rng.choice([-0.0, 0.0, 1.5, -2.5], n),
        "huge": rng.normal(0, 1, n) * 10.0 ** rng.integers(-30, 30, n),
    }[kind].astype(np.float32)
    # assert_array_equal holds -0.0 equal to 0.0: a zero's sign may differ (module docstring).
    np.testing.assert_array_equal(percentiles(x, QS), np.percentile(x, QS))


def test_percentiles_refuse_what_numpy_refuses_and_take_what_it_takes():
    x = np.arange(10, dtype=np.float32)
    for bad in ((-1.0,), (101.0,), (float("nan"),)):
        with pytest.raises(ValueError, match=r"range \[0, 100\]"):
            percentiles(x, bad)
    assert percentiles(x, 50.0) == np.percentile(x, 50.0)  # a scalar q, as numpy takes it


def test_percentiles_of_a_strided_view_need_no_copy_of_it(slabs):
    rng = np.random.default_rng(0)
    volume = rng.normal(100, 50, (23, 17, 11)).astype(np.float32)
    view = volume.transpose(2, 0, 1)[::-1]  # as after orientation: permuted and flipped
    np.testing.assert_array_equal(percentiles(view, (0.5, 99.5)), np.percentile(view, (0.5, 99.5)))


def test_order_statistics_are_the_sorted_values(slabs):
    x = np.random.default_rng(1).normal(size=(9, 8, 7)).astype(np.float32)
    ranks = [0, 5, 250, 503]
    assert [float(v) for v in order_statistics(x, ranks)] == [float(v) for v in np.sort(x, axis=None)[ranks]]


def test_the_mr_preset_gives_the_values_it_gave_with_numpy(monkeypatch):
    """The MR preset through the new percentiles: the same network input as with numpy's."""
    x = torch.from_numpy(np.random.default_rng(2).gamma(2.0, 300.0, (2, 19, 13, 8)).astype(np.float32))
    new = normalize_intensity(x, "mr")
    monkeypatch.setattr(quantiles, "percentiles", lambda a, q: np.percentile(a, q))
    import medseg.transforms.intensity as intensity

    monkeypatch.setattr(intensity, "percentiles", lambda a, q: np.percentile(a, q))
    assert torch.equal(new, normalize_intensity(x, "mr"))
