"""Seeded fuzzing: single-byte changes and truncations of real DICOM slices and of NIfTI and
NRRD headers never make discovery raise, and every changed file ends up either in a scan
whose read succeeds or raises ScanError, or in the skipped list.

The cases are drawn first from ``numpy.random.default_rng(SEED)`` and then applied, so a
failure names a case that can be replayed exactly.
"""

import gzip
import shutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import make_geometry, phantom, write_itk, write_nifti

from medseg.errors import ScanError
from medseg.io.dicom import ordered_slices
from medseg.io.discover import discover, read_source

SEED = 20_250_610
# pydicom and nibabel warn about every odd value they meet; the outcome is what is tested.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")
MR_CROP = "dicom_mr_studies/Study1/13_HCropVolume"  # about 50 x 35 pixels per slice


@dataclass(frozen=True)
class Case:
    """One change to a file: set byte ``offset`` to ``value``, or keep only ``offset`` bytes."""

    kind: str  # "byte" or "truncate"
    offset: int
    value: int = 0

    def apply(self, data: bytes) -> bytes:
        if self.kind == "truncate":
            return data[: self.offset]
        return data[: self.offset] + bytes([self.value]) + data[self.offset + 1 :]


def draw_cases(rng: np.random.Generator, size: int, hot: int, n_bytes: int, n_cuts: int) -> list[Case]:
    """``n_bytes`` byte changes (half of them in the first ``hot`` bytes, where the header
    is) and ``n_cuts`` truncations of a file of ``size`` bytes."""
    cases = []
    for i in range(n_bytes):
        offset = int(rng.integers(0, hot if i % 2 == 0 else size))
        cases.append(Case("byte", offset, int(rng.integers(0, 256))))
    cases += [Case("truncate", int(rng.integers(0, size))) for _ in range(n_cuts)]
    return cases


def outcome(folder: Path, target: Path) -> str | None:
    """None when discovery and reading behave for ``folder`` and the changed ``target``;
    otherwise what went wrong."""
    try:
        found = discover(folder)
    except Exception:
        return "discover raised:\n" + traceback.format_exc(limit=-3)
    placed = [s for s in found.scans if target in s.files] + [k for k in found.skipped if k.path == target]
    if len(placed) != 1:
        return f"the changed file is in {len(placed)} scans or skipped entries"
    for scan in found.scans:
        try:
            read_source(scan)
        except ScanError:
            pass
        except Exception:
            return f"read_source({scan.name}) raised:\n" + traceback.format_exc(limit=-3)
    return None


def run_cases(
    folder: Path, target: Path, original: bytes, cases: list[Case], encode: Callable[[bytes], bytes] = bytes
) -> list[str]:
    """Each case applied to ``original``, ``encode``-d into ``target`` in ``folder``; what escaped."""
    failures = []
    for case in cases:
        if case.kind == "byte" and original[case.offset] == case.value:
            continue  # not a change
        target.write_bytes(encode(case.apply(original)))
        problem = outcome(folder, target)
        if problem:
            failures.append(f"{case}: {problem}")
    target.write_bytes(original)
    return failures


def pixel_offset(path: Path) -> int:
    with path.open("rb") as f:
        pydicom.dcmread(f, stop_before_pixels=True)
        return f.tell()


@pytest.mark.realdata
def test_changed_dicom_slices_never_break_discovery(shared_data, tmp_path):
    (scan,) = discover(shared_data / MR_CROP).scans
    middle = ordered_slices(scan.series)[10:13]  # three neighbours: a series of its own
    folder = tmp_path / "series"
    folder.mkdir()
    for s in middle:
        shutil.copy(s.path, folder / s.path.name)
    target = folder / middle[1].path.name
    original = target.read_bytes()
    rng = np.random.default_rng(SEED)
    cases = draw_cases(rng, len(original), pixel_offset(target) + 12, n_bytes=400, n_cuts=80)
    failures = run_cases(folder, target, original, cases)
    assert not failures, f"{len(failures)} of {len(cases)} cases escaped:\n" + "\n".join(failures[:5])


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_changed_nifti_headers_never_break_discovery(tmp_path, suffix):
    geometry = make_geometry((12, 10, 8))
    plain = write_nifti(tmp_path / "a.nii", (phantom(geometry.shape) * 10).astype(np.int16), geometry)
    original = plain.read_bytes()
    folder = tmp_path / "scans"
    folder.mkdir()
    rng = np.random.default_rng(SEED + 1)
    cases = draw_cases(rng, len(original), 352, n_bytes=200, n_cuts=40)
    # .nii.gz: the changed bytes inside an intact gzip stream, as nibabel sees them.
    encode = gzip.compress if suffix == ".nii.gz" else bytes
    failures = run_cases(folder, folder / f"a{suffix}", original, cases, encode)
    assert not failures, f"{len(failures)} of {len(cases)} cases escaped:\n" + "\n".join(failures[:5])


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_changed_itk_headers_never_break_discovery(tmp_path, suffix):
    geometry = make_geometry((9, 8, 7))
    folder = tmp_path / "scans"
    folder.mkdir()
    target = write_itk(folder / f"a{suffix}", phantom(geometry.shape), geometry)
    original = target.read_bytes()
    header = original.index(b"\n\n") + 2 if suffix == ".nrrd" else original.index(b"LOCAL") + 6
    rng = np.random.default_rng(SEED + 2)
    failures = run_cases(folder, target, original, draw_cases(rng, len(original), header, n_bytes=120, n_cuts=30))
    assert not failures, f"{len(failures)} cases escaped:\n" + "\n".join(failures[:5])
