"""A run under write failures, a full disk and odd arguments: clear errors, no lost record,
no file left behind that a record does not name."""

import errno
import json
import subprocess
from dataclasses import replace

import numpy as np
import pytest
from helpers import make_geometry, phantom, threshold_model, write_dicom_series, write_nifti

import medseg
from medseg.batch.runner import DiskFull
from medseg.errors import FileProblem
from medseg.io.formats import FORMATS

LOW, HIGH = 0.3, 0.7


@pytest.fixture
def model():
    return threshold_model(LOW, HIGH, window=(64, 64))


@pytest.fixture
def folder(tmp_path):
    g = make_geometry((18, 20, 7), (0.9, 0.8, 2.5))
    root = tmp_path / "scans"
    root.mkdir()
    for i in range(3):
        write_nifti(root / f"case_{i}.nii.gz", phantom(g.shape, seed=i), g)
    return root


def _failing_seg_nrrd(monkeypatch, error: OSError, on: str):
    """seg.nrrd writing fails for scan ``on`` (after its NIfTI was written)."""
    original = FORMATS["seg.nrrd"].write

    def write(seg, paths, options):
        if paths["seg.nrrd"].name.startswith(on):
            raise error
        return original(seg, paths, options)

    monkeypatch.setattr(FORMATS["seg.nrrd"], "write", write)


def test_a_failed_write_leaves_no_unnamed_file(folder, tmp_path, model, monkeypatch):
    _failing_seg_nrrd(monkeypatch, PermissionError(errno.EACCES, "Permission denied"), "case_1")
    out = tmp_path / "out"
    report = medseg.segment(folder, out, model)
    status = {r.name: r for r in report.records}
    assert status["case_1"].status == "failed" and status["case_1"].stage == "write"
    assert status["case_0"].status == status["case_2"].status == "ok"
    assert not list(out.glob("case_1*"))  # its NIfTI and colour table were removed with it
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_full_disk_stops_the_run_and_keeps_what_finished(folder, tmp_path, model, monkeypatch):
    _failing_seg_nrrd(monkeypatch, OSError(errno.ENOSPC, "No space left on device"), "case_1")
    out = tmp_path / "out"
    with pytest.raises(DiskFull, match="disk is full"):
        medseg.segment(folder, out, model)
    saved = {s["name"]: s["status"] for s in json.loads((out / "medseg-run.json").read_text())["scans"]}
    assert saved == {"case_0": "ok", "case_1": "failed"}  # case_2 was never started
    assert not list(out.glob("case_1*")) and not list(out.glob("case_2*"))
    monkeypatch.undo()
    again = medseg.segment(folder, out, model)  # space freed: the same call goes on
    assert {r.name: r.status for r in again.records} == {"case_0": "skipped", "case_1": "ok", "case_2": "ok"}


def test_a_report_that_cannot_be_written_names_the_file(folder, tmp_path, model, monkeypatch):
    from medseg.batch import report as report_module

    def write(self, out_dir, name="medseg-run.json"):
        if self.records:
            raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(report_module.RunReport, "write", write)
    with pytest.raises(FileProblem, match=r"medseg-run.json: cannot be written \(Read-only file system\)"):
        medseg.segment(folder, tmp_path / "out", model)


def test_a_real_full_disk(folder, tmp_path, model):
    """A 300 kB tmpfs as the output folder (needs mount rights: skipped elsewhere)."""
    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        (disk / "filler").write_bytes(b"\0" * 240_000)
        with pytest.raises(FileProblem, match=r"disk is full|full disk"):
            medseg.segment(folder, disk / "out", model, formats="nifti,seg.nrrd,qc")
        left = sorted(p.name for p in (disk / "out").iterdir()) if (disk / "out").exists() else []
        report = disk / "out" / "medseg-run.json"
        named = set()
        if report.is_file():
            named = {p.split("/")[-1] for s in json.loads(report.read_text())["scans"] for p in s["outputs"].values()}
        assert set(left) - named <= {"medseg-run.json", "medseg-run.csv"}, left  # nothing unnamed
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_output_folder_problems_are_found_before_the_model_loads(folder, tmp_path, monkeypatch):
    import medseg.batch.run

    monkeypatch.setattr(medseg.batch.run, "_loaded", lambda m: pytest.fail("the model loaded"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileProblem, match="is a file, not a folder"):
        medseg.segment(folder, tmp_path / "afile", None)
    with pytest.raises(FileProblem, match="cannot be used as the output folder"):
        medseg.segment(folder, tmp_path / "afile" / "sub", None)


def test_dicom_seg_alone_over_nifti_inputs_is_refused(folder, tmp_path, model):
    with pytest.raises(ValueError, match="writes DICOM inputs only, and none of the 3 scan"):
        medseg.segment(folder, tmp_path / "out", model, formats="dicom-seg")
    assert not (tmp_path / "out").exists()


def test_dicom_seg_alone_over_mixed_inputs_warns_on_the_others(folder, tmp_path, model):
    g = make_geometry((18, 20, 7), (0.9, 0.8, 2.5))
    write_dicom_series(folder / "dicom", np.round(phantom(g.shape)), g)
    report = medseg.segment(folder, tmp_path / "out", model, formats="dicom-seg")
    nifti = [r for r in report.records if r.kind == "nifti"]
    assert all("nothing written" in r.warnings[-1] for r in nifti) and all(not r.outputs for r in nifti)


@pytest.mark.parametrize(
    ("inputs", "kwargs", "error", "needle"),
    [
        ([], {}, ValueError, "no inputs given"),
        (None, {}, TypeError, "inputs must be"),
        (b"/tmp", {}, TypeError, "inputs must be"),
        ("x", {"shard": "0/2"}, TypeError, "shard must be"),
        ("x", {"overwrite": "no"}, TypeError, "overwrite must be True or False"),
    ],
)
def test_python_callers_get_plain_errors(tmp_path, model, inputs, kwargs, error, needle):
    with pytest.raises(error, match=needle):
        medseg.segment(inputs, tmp_path / "out", model, **kwargs)
    with pytest.raises(TypeError, match="output_dir must be"):
        medseg.segment(tmp_path, None, model)


def test_records_carry_volumes_and_doubts(folder, tmp_path, model):
    from medseg.io import read_scan

    domain = {
        "modality": "MR",
        "spacing": {"min": [1, 1, 1], "max": [1, 1, 1]},
        "shape": {"min": [10] * 3, "max": [50] * 3},
    }
    doubtful = replace(model, spec=replace(model.spec, provenance={"training_data": domain}))
    report = medseg.segment(folder, tmp_path / "out", doubtful, formats="nifti")
    record = report.records[0]
    labels = np.rint(read_scan(record.outputs["nifti"]).array[0]).astype(int)
    voxel_ml = 0.9 * 0.8 * 2.5 / 1000
    assert record.volumes_ml["low"] == pytest.approx((labels == 1).sum() * voxel_ml, abs=1e-3)
    assert record.volumes_ml["high"] == pytest.approx((labels == 2).sum() * voxel_ml, abs=1e-3)
    # 2.5 mm slices lie more than twice the training spacing (1 mm): said; the size is in range.
    assert any("spacing" in w and "outside the training data" in w for w in record.warnings)
    assert not any(w.startswith("shape") for w in record.warnings)


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_runs(folder, tmp_path, model):
    import sys

    out = tmp_path / "out"
    out.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".medseg-run.json.lock").write_text(str(alive.pid))  # the first run's lock
        with pytest.raises(FileProblem, match=rf"another medseg run \(process {alive.pid}\)"):
            medseg.segment(folder, out, model, formats="nifti")
    finally:
        alive.kill()
        alive.wait()
    # Its process is gone (killed): the lock is stale and taken over.
    report = medseg.segment(folder, out, model, formats="nifti")
    assert len(report.records) == 3 and not (out / ".medseg-run.json.lock").exists()


def test_a_scan_that_became_unreadable_names_its_stale_outputs(folder, tmp_path, model):
    out = tmp_path / "out"
    medseg.segment(folder, out, model, formats="nifti")
    (folder / "case_1.nii.gz").write_bytes(b"broken since")
    record = next(r for r in medseg.segment(folder, out, model, formats="nifti").records if r.name == "case_1")
    assert record.status == "failed" and record.stage == "read"
    assert record.warnings == ("outputs of an earlier run remain and are stale: case_1.nii.gz, case_1.ctbl",)


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"device": None}, ValueError, "device must be"),
        ({"model": 123}, TypeError, "model must be a model folder"),
        ({"progress": object()}, TypeError, "progress must be a medseg.RunProgress"),
        ({"batch_size": True}, ValueError, "batch_size must be"),
    ],
)
def test_more_python_argument_errors(folder, tmp_path, model, kwargs, error, needle):
    kwargs = {"model": model, **kwargs}
    with pytest.raises(error, match=needle):
        medseg.segment(folder, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
