"""Batch segmentation of a folder that mixes good scans with broken ones; resume."""

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import slicerio
from helpers import make_geometry, phantom, rotation, write_dicom_series, write_itk, write_nifti

from medseg import segment
from medseg.io import read_scan
from medseg.model import load_model

PIR = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "scans"
    g = make_geometry((20, 24, 9), (0.9, 0.8, 2.5), direction=rotation((8, 0, 15)))
    write_nifti((root / "sub-01").mkdir(parents=True) or root / "sub-01" / "t1.nii.gz", phantom(g.shape), g)
    write_itk(root / "sub-02.nrrd", phantom(g.shape, seed=1), g)
    for orientation, direction in (("lps", np.eye(3)), ("ras", np.diag([-1.0, -1.0, 1.0])), ("pir", PIR)):
        geometry = make_geometry((17, 21, 7), (1.1, 0.7, 3.0), direction=direction)
        write_nifti(
            (root / "more").mkdir(exist_ok=True) or root / "more" / f"{orientation}.nii",
            phantom(geometry.shape),
            geometry,
        )
    write_dicom_series(root / "dicom" / "study", np.round(phantom(g.shape)), g, description="T1 axial")
    write_dicom_series(root / "dicom" / "study", np.round(phantom(g.shape)), g, description="T2 axial", prefix="t2_")
    bad = root / "bad"
    bad.mkdir()
    good_bytes = (root / "sub-01" / "t1.nii.gz").read_bytes()
    (bad / "truncated.nii.gz").write_bytes(good_bytes[: len(good_bytes) // 3])
    (bad / "zero.nii.gz").touch()
    (bad / "notes.nii").write_text("not an image")
    (bad / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50))
    write_nifti(bad / "nan.nii.gz", np.full(g.shape, np.nan, np.float32), g)
    paths = write_dicom_series(bad / "gap", np.round(phantom(g.shape)), g)
    paths[4].unlink()
    paths = write_dicom_series(bad / "dup", np.round(phantom(g.shape)), g)
    shutil.copy(paths[2], bad / "dup" / "copy")
    write_nifti(bad / "fourd.nii.gz", np.stack([phantom(g.shape)] * 2, axis=-1), g)
    return root


def test_batch_survives_bad_scans_and_resumes(folder, tmp_path, tiny_model_dir):
    model = load_model(tiny_model_dir)
    out = tmp_path / "out"
    report = segment(folder, out, model)
    by_name = {r.name: r for r in report.records}
    ok = sorted(n for n, r in by_name.items() if r.status == "ok")
    failed = {n: r for n, r in by_name.items() if r.status == "failed"}
    assert len(ok) == 7, ok  # 4 NIfTI, NRRD and the two series sharing one folder
    # (the duplicated file keeps its SOP UID: it joins the "dup" series and breaks it)
    assert {r.kind for n, r in by_name.items() if r.status == "ok"} == {"nifti", "nrrd", "dicom"}
    names = sorted(failed)
    assert names[0].startswith("bad__dup_S3_synthetic_") and names[2].startswith("bad__gap_S3_synthetic_")
    assert names[1] == "bad__fourd" and names[3:] == ["bad__nan", "bad__notes", "bad__truncated", "bad__zero"]
    assert "duplicate slice position" in failed[names[0]].error
    assert failed["bad__fourd"].stage == "preprocess" and "2 channel(s)" in failed["bad__fourd"].error
    assert failed["bad__truncated"].stage == "read" and "re-copy" in failed["bad__truncated"].hint
    assert "missing slices" in next(r.error for n, r in failed.items() if n.startswith("bad__gap"))
    assert any(s["path"].endswith("photo.png") for s in report.skipped_files)
    for name in ok:
        record = by_name[name]
        labels = read_scan(record.outputs["nifti"])
        source = read_scan(record.input) if record.kind != "dicom" else None
        if source is not None:
            assert labels.geometry.mismatch(source.geometry) is None
        seg = slicerio.read_segmentation(str(out / f"{name}.seg.nrrd"))
        np.testing.assert_array_equal(seg["voxels"], np.rint(labels.array[0]).astype(np.uint8))
        assert (out / f"{name}.seg.nrrd").is_file() and (out / f"{name}.ctbl").is_file()
    saved = json.loads((out / "medseg-run.json").read_text())
    assert saved["summary"]["failed"] == 7 and saved["summary"]["ok"] == 7
    assert saved["settings"]["model_sha256"] == model.sha256 and "torch" in saved["settings"]
    assert (out / "medseg-run.csv").read_text().count("\n") == 15
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    again = segment(folder, out, model)
    assert sorted(r.name for r in again.records if r.status == "skipped") == ok
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")} == mtimes

    redo = segment(folder, out, model, overwrite=True)
    assert sorted(r.name for r in redo.records if r.status == "ok") == ok


def test_changed_input_is_redone(folder, tmp_path, tiny_model_dir):
    model = load_model(tiny_model_dir)
    out = tmp_path / "out"
    shutil.rmtree(folder / "bad")
    segment(folder, out, model)
    g = make_geometry((20, 24, 9), (0.9, 0.8, 2.5))
    write_itk(folder / "sub-02.nrrd", phantom(g.shape, seed=5), g)
    again = {r.name: r.status for r in segment(folder, out, model).records}
    assert again["sub-02"] == "ok" and again["sub-01__t1"] == "skipped"
    assert nib.load(str(out / "sub-02.nii.gz")).shape == g.shape


def test_other_precision_is_redone_other_engine_is_not(folder, tmp_path, tiny_model_dir):
    # bf16 labels may differ from fp32 ones: a rerun in another precision must not keep them;
    # the engines agree exactly, so switching engine keeps finished scans.
    model = load_model(tiny_model_dir)
    out = tmp_path / "out"
    shutil.rmtree(folder / "bad")
    first = segment(folder, out, model, precision="fp32", engine="torch")
    assert first.settings["precision"] == "fp32" and first.settings["overlap"] == 0.25
    again = segment(folder, out, model, precision="fp32", engine="onnxruntime")
    assert {r.status for r in again.records} == {"skipped"}
    redone = segment(folder, out, model, precision="bf16", engine="torch")
    assert redone.settings["precision"] == "bf16"
    assert {r.status for r in redone.records} == {"ok"}


def test_dicom_seg_output_for_dicom_inputs_only(folder, tmp_path, tiny_model_dir):
    import highdicom as hd

    model = load_model(tiny_model_dir)
    shutil.rmtree(folder / "bad")
    report = segment(folder, tmp_path / "out", model, formats=("nifti", "dicom-seg"))
    dicom_records = [r for r in report.records if r.kind == "dicom"]
    assert len(dicom_records) == 2
    for record in dicom_records:
        seg = hd.seg.segread(record.outputs["dicom-seg"])
        assert seg.SegmentationType == "BINARY" and seg.NumberOfFrames > 0
    nifti_record = next(r for r in report.records if r.kind == "nifti")
    assert "dicom-seg" not in nifti_record.outputs and not nifti_record.warnings
    # Said once for the run, not once per scan.
    assert report.notes == ["dicom-seg: written for DICOM inputs only; 5 of 7 scan(s) are not DICOM"]


def test_write_failure_is_recorded_and_others_continue(folder, tmp_path, tiny_model_dir):
    model = load_model(tiny_model_dir)
    shutil.rmtree(folder / "bad")
    out = tmp_path / "out"
    (out / "sub-02.nii.gz").mkdir(parents=True)  # a folder where the output file must go
    report = segment(folder, out, model)
    status = {r.name: r for r in report.records}
    assert status["sub-02"].status == "failed" and status["sub-02"].stage == "write"
    assert "permissions and free space" in status["sub-02"].hint
    assert status["sub-01__t1"].status == "ok"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_recorded(folder, tmp_path, tiny_model_dir):
    model = load_model(tiny_model_dir)
    shutil.rmtree(folder / "bad")
    (folder / "sub-02.nrrd").chmod(0)
    report = segment(folder, tmp_path / "out", model)
    record = next(r for r in report.records if r.name == "sub-02")
    assert record.status == "failed" and record.stage in ("discover", "read")


def test_probability_maps_match_labels_and_grid(folder, tmp_path, tiny_model_dir):
    model = load_model(tiny_model_dir)
    shutil.rmtree(folder / "bad")
    shutil.rmtree(folder / "dicom")
    report = segment(folder, tmp_path / "out", model, formats="nifti", probabilities="uint8")
    record = next(r for r in report.records if r.name == "sub-01__t1")
    labels = nib.load(record.outputs["nifti"])
    maps = [nib.load(record.outputs[f"prob-{name}"]) for name in ("anterior", "posterior")]
    for m in maps:
        np.testing.assert_allclose(m.affine, labels.affine, atol=1e-6)
        assert m.get_data_dtype() == np.uint8
        values = m.get_fdata()
        assert values.min() >= 0 and values.max() <= 1.0 + 1e-6
    # The label map is the argmax of the probabilities wherever the winner is clear.
    lab = np.asarray(labels.dataobj)
    p1, p2 = (m.get_fdata() for m in maps)
    probs = np.stack([1 - p1 - p2, p1, p2])
    top2 = np.sort(probs, axis=0)[-2:]
    clear = top2[1] - top2[0] > 3 / 255
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(probs.argmax(axis=0)[clear], lab[clear])


def test_qc_montages_and_index(folder, tmp_path, tiny_model_dir):
    model = load_model(tiny_model_dir)
    shutil.rmtree(folder / "dicom")
    out = tmp_path / "out"
    report = segment(folder, out, model, formats=("nifti", "qc"))
    ok = [r for r in report.records if r.status == "ok"]
    for record in ok:
        assert record.outputs["qc"].endswith(".qc.png") and (out / f"{record.name}.qc.png").stat().st_size > 2000
    page = (out / "index.html").read_text()
    assert all(r.name in page for r in report.records)
    assert "bad__truncated" in page and "failed" in page and 'src="sub-02.qc.png"' in page


@pytest.mark.realdata
def test_real_dicom_series_in_a_batch(shared_data, tmp_path, tiny_model_dir):
    """Real series: the MR crop gets a SEG equal to its NIfTI position by position; the CT
    without UIDs gets NIfTI and seg.nrrd and a warning instead of a SEG."""
    import highdicom as hd
    import pydicom

    from medseg.io.dicom import ordered_slices
    from medseg.io.discover import discover

    root = tmp_path / "scans"
    shutil.copytree(shared_data / "dicom_mr_studies/Study1/13_HCropVolume", root / "mr")
    shutil.copytree(shared_data / "totalsegmentator/example_ct_dicom", root / "ct")
    from dataclasses import replace

    from medseg.model import init_model, load_spec

    # A 512 window runs the CT's 512x512 slices whole (the 64 window would slide 81 times).
    init_model(tmp_path / "model", replace(load_spec(tiny_model_dir), window=(512, 512)))
    model = load_model(tmp_path / "model")
    report = segment(root, tmp_path / "out", model, formats=("nifti", "seg.nrrd", "dicom-seg"))
    records = {r.input.split("/")[-1]: r for r in report.records}
    assert {r.status for r in records.values()} == {"ok"}
    ct = records["ct"]
    assert "dicom-seg" not in ct.outputs and "empty" in ct.warnings[0] and "seg.nrrd" in ct.outputs
    mr = records["mr"]
    series = discover(root / "mr").scans[0].series
    nifti = np.asarray(nib.load(mr.outputs["nifti"]).dataobj)
    seg = hd.seg.segread(mr.outputs["dicom-seg"])
    uids = [str(pydicom.dcmread(s.path, stop_before_pixels=True).SOPInstanceUID) for s in ordered_slices(series)]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2], combine_segments=True)
    np.testing.assert_array_equal(pixels.transpose(2, 1, 0), nifti)
