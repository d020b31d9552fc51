"""Discovery: every path passed over is accounted for; names are short, stable and unique;
``ScanSource.files`` lists every file a scan's voxels come from."""

import os

import numpy as np
import pytest
from helpers import make_geometry, phantom, write_dicom_series, write_itk, write_nifti

import medseg.io.discover as discover_module
from medseg.io.discover import MAX_NAME_CHARS, ScanInput, discover, discover_all, read_source
from medseg.io.files import atomic_path

GEOMETRY = make_geometry((6, 5, 4))


def nifti(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_nifti(path, phantom(GEOMETRY.shape), GEOMETRY)


def reasons(found) -> dict[str, str]:
    return {s.path.name: s.reason for s in found.skipped}


# --- every path passed over is listed -------------------------------------------------


def test_symlinked_folder_is_listed_not_followed(tmp_path):
    nifti(tmp_path / "elsewhere" / "a.nii.gz")
    (tmp_path / "tree").mkdir()
    nifti(tmp_path / "tree" / "b.nii.gz")
    (tmp_path / "tree" / "linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "tree" / "loop").symlink_to(tmp_path / "tree")
    found = discover(tmp_path / "tree")
    assert [s.name for s in found.scans] == ["b"]
    assert reasons(found) == {
        "linked": "symbolic link to a folder, not followed",
        "loop": "symbolic link to a folder, not followed",
    }


def test_symlinked_root_is_followed(tmp_path):
    nifti(tmp_path / "real" / "a.nii.gz")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert [s.name for s in discover(tmp_path / "link").scans] == ["a"]


def test_dangling_link_and_fifo_are_listed(tmp_path):
    nifti(tmp_path / "a.nii.gz")
    (tmp_path / "gone.nii.gz").symlink_to(tmp_path / "missing.nii.gz")
    os.mkfifo(tmp_path / "pipe.nii.gz")
    found = discover(tmp_path)  # must not block on the FIFO
    assert [s.name for s in found.scans] == ["a"]
    assert "dangling symbolic link to" in reasons(found)["gone.nii.gz"]
    assert "named pipe (FIFO)" in reasons(found)["pipe.nii.gz"]


def test_fifo_given_as_the_input_is_listed(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    found = discover(tmp_path / "pipe")
    assert found.scans == () and "named pipe" in found.skipped[0].reason


def test_unreadable_folder_is_listed_with_the_system_reason(tmp_path, monkeypatch):
    nifti(tmp_path / "ok" / "a.nii.gz")
    nifti(tmp_path / "locked" / "b.nii.gz")
    real_scandir = os.scandir

    def scandir(path):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    # Root may read any folder, so the refusal is simulated where discovery lists folders.
    monkeypatch.setattr(discover_module.os, "scandir", scandir)
    found = discover(tmp_path)
    assert [s.name for s in found.scans] == ["ok__a"]
    assert reasons(found)["locked"] == "folder cannot be listed (Permission denied); its files were not searched"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may read a folder without permissions")
def test_folder_without_permissions_is_listed(tmp_path):
    nifti(tmp_path / "locked" / "b.nii.gz")
    (tmp_path / "locked").chmod(0)
    try:
        assert "cannot be listed" in reasons(discover(tmp_path))["locked"]
    finally:
        (tmp_path / "locked").chmod(0o755)


def test_same_file_twice_is_segmented_once(tmp_path):
    path = nifti(tmp_path / "a.nii.gz")
    (tmp_path / "sub").mkdir()
    found = discover_all([path, tmp_path / "." / "a.nii.gz", tmp_path])
    assert [s.name for s in found.scans] == ["a"]
    assert len(found.skipped) == 2 and all("found twice; segmented once" in s.reason for s in found.skipped)


def test_link_to_a_file_of_the_tree_is_segmented_once(tmp_path):
    nifti(tmp_path / "a.nii.gz")
    (tmp_path / "latest.nii.gz").symlink_to(tmp_path / "a.nii.gz")
    found = discover(tmp_path)
    assert [s.name for s in found.scans] == ["a"]
    assert "the same file(s) as" in reasons(found)["latest.nii.gz"]


def test_same_series_folder_twice_is_segmented_once(tmp_path):
    write_dicom_series(tmp_path / "s", np.round(phantom(GEOMETRY.shape)), GEOMETRY)
    found = discover_all([tmp_path / "s", ScanInput(tmp_path / "s")])
    assert len(found.scans) == 1 and len(found.skipped) == 1


def test_analyze_pair_is_named_as_such(tmp_path):
    (tmp_path / "brain.hdr").write_bytes(bytes(348))
    (tmp_path / "brain.img").write_bytes(bytes(64))
    (tmp_path / "orphan.raw").write_bytes(bytes(64))
    found = discover(tmp_path)
    assert "Analyze 7.5 / NIfTI pair" in reasons(found)["brain.hdr"]
    assert "Analyze 7.5 / NIfTI pair" in reasons(found)["brain.img"]
    assert "no header found here names it" in reasons(found)["orphan.raw"]


# --- ScanSource.files -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "compress", "data"),
    [("scan.mhd", False, "scan.raw"), ("scan.mhd", True, "scan.zraw"), ("scan.nhdr", True, "scan.raw.gz")],
)
def test_files_of_a_header_include_its_data_file(tmp_path, header, compress, data):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(phantom(GEOMETRY.shape).T), str(tmp_path / header), useCompression=compress)
    found = discover(tmp_path)
    (scan,) = found.scans
    assert scan.files == (tmp_path / header, tmp_path / data)
    assert reasons(found) == {data: f"data file of {header} (read through it)"}


def test_files_of_a_header_naming_a_list_of_data_files(tmp_path):
    for k in range(4):
        np.zeros((5, 6), np.float32).tofile(tmp_path / f"slice{k:02d}.raw")
    (tmp_path / "stack.nhdr").write_text(
        "NRRD0004\ntype: float\ndimension: 3\nsizes: 6 5 4\nencoding: raw\nendian: little\n"
        "data file: slice%02d.raw 0 3 1 2\n\n"
    )
    (scan,) = discover(tmp_path).scans
    assert [p.name for p in scan.files] == ["stack.nhdr"] + [f"slice{k:02d}.raw" for k in range(4)]
    assert read_source(scan).geometry.shape == (6, 5, 4)


def test_files_of_a_series_and_of_a_nifti(tmp_path):
    paths = write_dicom_series(tmp_path / "s", np.round(phantom(GEOMETRY.shape)), GEOMETRY)
    path = nifti(tmp_path / "a.nii")
    by_kind = {s.kind: s for s in discover(tmp_path).scans}
    assert sorted(by_kind["dicom"].files) == sorted(paths)
    assert by_kind["nifti"].files == (path,)


def test_files_name_a_missing_data_file_too(tmp_path):
    write_itk(tmp_path / "scan.mhd", phantom(GEOMETRY.shape), GEOMETRY)
    (tmp_path / "scan.raw").unlink()
    (scan,) = discover(tmp_path).scans
    assert [p.name for p in scan.files] == ["scan.mhd", "scan.raw"]


# --- names --------------------------------------------------------------------------------


def test_long_names_are_capped_and_keep_temporary_names_short(tmp_path):
    stem = "x" * 240
    nifti(tmp_path / f"{stem}.nii.gz")
    nifti(tmp_path / f"{stem}y.nii.gz")
    names = [s.name for s in discover(tmp_path).scans]
    assert len(set(names)) == 2 and all(len(n) <= MAX_NAME_CHARS for n in names)
    final = tmp_path / f"{names[0]}.prob-posterior_hippocampus.nii.gz"
    with atomic_path(final) as tmp:
        assert len(tmp.name.encode()) < 255
        tmp.write_bytes(b"fits")  # "File name too long" before names were capped
    assert final.read_bytes() == b"fits"


def test_long_series_name_is_capped(tmp_path):
    folder = tmp_path / ("study_" * 40)
    write_dicom_series(folder, np.round(phantom(GEOMETRY.shape)), GEOMETRY, description="T1 axial")
    (scan,) = discover(tmp_path).scans
    assert len(scan.name) <= MAX_NAME_CHARS and scan.name.startswith("study_study_")


def test_adding_a_file_never_hands_a_name_to_another_scan(tmp_path):
    nifti(tmp_path / "a b.nii.gz")
    nifti(tmp_path / "a_b.nii")
    before = {s.path.name: s.name for s in discover(tmp_path).scans}
    nifti(tmp_path / "a+b.nii.gz")  # sorts first: a running number would renumber the others
    after = {s.path.name: s.name for s in discover(tmp_path).scans}
    assert {k: after[k] for k in before} == before
    assert len(set(after.values())) == 3 and all(n.startswith("a_b-") for n in after.values())


def test_case_folding_clash_is_disambiguated(tmp_path):
    nifti(tmp_path / "Scan.nii.gz")
    nifti(tmp_path / "scan.nii.gz")
    names = [s.name for s in discover(tmp_path).scans]
    assert len({n.lower() for n in names}) == 2


def test_unique_names_keep_plain_names_and_hash_clashes_only(tmp_path):
    nifti(tmp_path / "one" / "a.nii.gz")
    nifti(tmp_path / "two" / "a.nii.gz")
    nifti(tmp_path / "two" / "c.nii.gz")
    found = discover_all([tmp_path / "one", tmp_path / "two"])
    names = sorted(s.name for s in found.scans)
    assert names[2] == "c" and names[0].startswith("a-") and names[1].startswith("a-") and names[0] != names[1]
    again = discover_all([tmp_path / "one", tmp_path / "two"])
    assert sorted(s.name for s in again.scans) == names
