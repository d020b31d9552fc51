"""Metrics in millimetres on anisotropic grids, with known answers."""

import math

import numpy as np
import pytest

from medseg.evaluation.metrics import dice, surface_metrics


def _cube(shape, lo, hi) -> np.ndarray:
    a = np.zeros(shape, np.int64)
    a[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 1
    return a


def test_dice_known_answer():
    a = _cube((10, 10, 10), (0, 0, 0), (4, 5, 5))
    b = _cube((10, 10, 10), (2, 0, 0), (6, 5, 5))
    assert dice(a, b, 1) == pytest.approx(0.5)
    assert dice(a * 0, b * 0, 1) == 1.0


def test_hd95_is_in_millimetres():
    shape = (30, 20, 12)
    a = _cube(shape, (5, 5, 3), (15, 12, 8))
    b = _cube(shape, (8, 5, 3), (18, 12, 8))  # shifted 3 voxels along x
    hd_iso, _ = surface_metrics(a, b, 1, (1.0, 1.0, 1.0), 1.0)
    hd_aniso, _ = surface_metrics(a, b, 1, (2.5, 1.0, 1.0), 1.0)
    assert hd_iso == pytest.approx(3.0)
    assert hd_aniso == pytest.approx(7.5)


def test_surface_dice_tolerance():
    shape = (30, 20, 12)
    a = _cube(shape, (5, 5, 3), (15, 12, 8))
    b = _cube(shape, (6, 5, 3), (16, 12, 8))  # one voxel shift: 1 mm apart where faces move
    _, nsd_tight = surface_metrics(a, b, 1, (1.0, 1.0, 1.0), 0.5)
    _, nsd_loose = surface_metrics(a, b, 1, (1.0, 1.0, 1.0), 1.5)
    assert nsd_loose == pytest.approx(1.0)
    assert nsd_tight < 0.9


def test_missing_label_in_prediction():
    ref = _cube((10, 10, 10), (2, 2, 2), (5, 5, 5))
    hd, nsd = surface_metrics(ref * 0, ref, 1, (1, 1, 1), 1.0)
    assert math.isnan(hd) and nsd == 0.0
