"""``medseg.segment``: the one library entry point; what a run shows as it goes; one read path
and one naming rule that ``evaluate`` follows for every input kind."""

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import make_geometry, phantom, rotation, threshold_model, write_dicom_series, write_itk, write_nifti

import medseg
import medseg.errors
from medseg.batch.merge import merge_shard_reports
from medseg.errors import ScanError
from medseg.evaluation.report import evaluate
from medseg.io import read_scan

LOW, HIGH = 0.3, 0.7


@pytest.fixture
def model():
    return threshold_model(LOW, HIGH)


def _nifti_folder(root, n=3):
    g = make_geometry((18, 20, 7), (0.9, 0.8, 2.5), direction=rotation((5, 0, 10)))
    root.mkdir(parents=True)
    for i in range(n):
        write_nifti(root / f"case_{i}.nii.gz", phantom(g.shape, seed=i), g)
    return root


def test_segment_is_exported_and_returns_the_report(tmp_path, model):
    folder = _nifti_folder(tmp_path / "scans")
    report = medseg.segment(folder, tmp_path / "out", model, formats="nifti")
    assert isinstance(report, medseg.RunReport)
    assert [r.status for r in report.records] == ["ok"] * 3
    assert report.path == tmp_path / "out" / "medseg-run.json"
    saved = json.loads(report.path.read_text())
    assert [s["name"] for s in saved["scans"]] == [r.name for r in report.records]
    assert report.summary_line().startswith("3 scan(s): 3 ok, 0 failed, 0 skipped")
    # Resume: the same call keeps what is done.
    again = medseg.segment(folder, tmp_path / "out", model, formats="nifti")
    assert [r.status for r in again.records] == ["skipped"] * 3


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"formats": "nifti,bogus"}, "unknown output format 'bogus'"),
        ({"shard": (3, 2)}, "0 <= I < N"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"device": "gpu"}, "device must be"),
        ({"dicom_seg_type": "bitmap"}, "DICOM SEG type"),
        ({"probabilities": "float16"}, "probability encoding"),
    ],
)
def test_bad_options_raise_before_discovery(tmp_path, model, monkeypatch, options, needle):
    import medseg.io.discover

    monkeypatch.setattr(medseg.io.discover, "discover", lambda *a: pytest.fail("discovery ran"))
    with pytest.raises(ValueError, match=needle):
        medseg.segment(tmp_path / "nowhere", tmp_path / "out", model, **options)
    assert not (tmp_path / "out").exists()


def test_missing_input_and_empty_folder_name_the_path(tmp_path, model):
    with pytest.raises(ScanError, match="nowhere: does not exist"):
        medseg.segment(tmp_path / "nowhere", tmp_path / "out", model)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ScanError, match=r"empty: holds no scan medseg can read \(.*notes.txt: not a scan"):
        medseg.segment(tmp_path / "empty", tmp_path / "out", model)
    assert not (tmp_path / "out").exists()


class _Watcher(medseg.RunProgress):
    """Holds up the second scan's inference until the first scan's record has arrived."""

    def __init__(self, out):
        self.out = out
        self.first_done = threading.Event()
        self.scans_started = 0
        self.seen_in_report = []
        self.events = []

    def slices_done(self, done, total):
        self.events.append(("slices", done, total))
        if done == 0:
            self.scans_started += 1
            if self.scans_started == 2:
                # Under the old runner the first record arrived only after this inference: wait.
                self.first_done.wait(timeout=20)

    def scan_done(self, record):
        self.events.append(("scan", record.name))
        report = json.loads((self.out / "medseg-run.json").read_text())
        self.seen_in_report.append(record.name in [s["name"] for s in report["scans"]])
        assert all((self.out / p).is_file() for p in record.outputs.values())
        self.first_done.set()


def test_each_record_arrives_as_soon_as_its_outputs_are_written(tmp_path, model):
    out = tmp_path / "out"
    watcher = _Watcher(out)
    medseg.segment(_nifti_folder(tmp_path / "scans"), out, model, formats="nifti", progress=watcher)
    assert watcher.seen_in_report == [True, True, True]  # in the report file when announced
    second_start = [i for i, e in enumerate(watcher.events) if e[0] == "slices" and e[1] == 0][1]
    second_end = next(i for i, e in enumerate(watcher.events) if i > second_start and e[0] == "slices" and e[1] == e[2])
    first_record = watcher.events.index(("scan", "case_0"))
    assert first_record < second_end  # scan 1 is announced while scan 2 is still being segmented


def test_slice_progress_totals_for_ensembles_and_single_batches():
    from dataclasses import replace

    from medseg.inference import make_predictor
    from medseg.inference.segment import segment_volume
    from medseg.io.volume import Volume
    from medseg.model import Model

    g = make_geometry((14, 18, 9), (1.0, 1.0, 2.0))
    volume = Volume(phantom(g.shape)[None], g, Path("phantom"))
    axial = threshold_model(LOW, HIGH, "axial", window=(64, 64))
    sagittal = threshold_model(LOW, HIGH, "sagittal", window=(64, 64))
    ensemble = Model(replace(axial.spec, members=("a", "s")), None, axial.folder, (axial, sagittal))
    calls = []
    segment_volume(volume, make_predictor(ensemble), lambda done, total: calls.append((done, total)))
    assert {total for _, total in calls} == {9 + 14}  # each member's own slice count, summed
    assert calls[0] == (0, 23) and calls[-1] == (23, 23)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    calls.clear()
    segment_volume(volume, make_predictor(axial), lambda done, total: calls.append((done, total)))
    assert calls == [(0, 9), (9, 9)]  # one batch: the bar starts at 0 and ends full


def test_shard_parts_merge_once_and_the_report_names_the_merged_file(tmp_path, model, caplog):
    folder = _nifti_folder(tmp_path / "scans", n=4)
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="medseg")
    first = medseg.segment(folder, out, model, formats="nifti", shard=(0, 2))
    assert first.path.name == "medseg-run.part0of2.json"  # the other shard has not finished
    second = medseg.segment(folder, out, model, formats="nifti", shard=(1, 2))
    assert second.path == out / "medseg-run.json"
    assert len(second.records) == 4 and second.summary_line().startswith("4 scan(s): 4 ok")  # the whole run
    assert len(json.loads(second.path.read_text())["scans"]) == 4
    assert merge_shard_reports(out, 2) == out / "medseg-run.json"  # a second finisher: no new merge
    assert caplog.text.count("merged 2 shard reports") == 1


def _multiframe(path, source):
    import pydicom

    ds = pydicom.dcmread(source)
    ds.NumberOfFrames = 2
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


def test_multiframe_dicom_is_judged_the_same_by_every_reader(tmp_path, model):
    g = make_geometry((12, 10, 4))
    slices = write_dicom_series(tmp_path / "series", np.round(phantom(g.shape)), g)
    enhanced = _multiframe(tmp_path / "scans" / "enhanced.dcm", slices[0])
    with pytest.raises(ScanError, match="multi-frame"):
        read_scan(enhanced)
    write_nifti(tmp_path / "scans" / "ok.nii.gz", phantom(g.shape), g)
    report = medseg.segment(tmp_path / "scans", tmp_path / "out", model, formats="nifti")
    assert [r.name for r in report.records] == ["ok"]
    (skipped,) = report.skipped_files
    assert skipped["path"].endswith("enhanced.dcm") and "multi-frame" in skipped["reason"]


def _labels_for(image_geometry, seed):
    """A label map 0/1/2 on the grid (its agreement with predictions does not matter here)."""
    values = phantom(image_geometry.shape, seed=seed)
    return ((values > np.median(values)).astype(np.uint8) + (values > np.percentile(values, 90))).astype(np.uint8)


def test_evaluate_finds_outputs_for_every_input_kind(tmp_path, model):
    """NIfTI, NRRD, MHA, a DICOM folder and one series of a two-series folder, segmented as a
    tree (names carry the relative path) or one by one: evaluate finds each case's output."""
    g = make_geometry((16, 18, 6), (0.9, 0.8, 2.0), direction=rotation((0, 0, 12)))
    data, labels = tmp_path / "data", tmp_path / "labels"
    cases = []
    write_nifti((data / "nii").mkdir(parents=True) or data / "nii" / "a.nii.gz", phantom(g.shape, seed=1), g)
    cases.append({"image": "data/nii/a.nii.gz"})
    write_itk(data / "b.nrrd", phantom(g.shape, seed=2), g)
    cases.append({"image": "data/b.nrrd"})
    write_itk(data / "c.mha", phantom(g.shape, seed=3), g)
    cases.append({"image": "data/c.mha"})
    write_dicom_series(data / "dicom" / "d", np.round(phantom(g.shape, seed=4) * 100), g)
    cases.append({"image": "data/dicom/d"})
    uid = "1.2.826.0.1.3680043.8.498.777"
    write_dicom_series(data / "study", np.round(phantom(g.shape, seed=5) * 100), g, series_uid=uid, description="T1")
    write_dicom_series(data / "study", np.round(phantom(g.shape, seed=6) * 100), g, description="T2", prefix="t2_")
    cases.append({"image": "data/study", "series_uid": uid})
    labels.mkdir()
    for i, case in enumerate(cases):
        case["label"] = f"labels/case{i}.nii.gz"
        write_nifti(tmp_path / case["label"], _labels_for(g, i).astype(np.float32), g)
    manifest = tmp_path / "manifest.json"
    names = {"0": "background", "1": "low", "2": "high"}
    manifest.write_text(json.dumps({"labels": names, "validation": cases}))
    from medseg.data.manifest import load_manifest

    load_manifest(manifest)  # a DICOM folder (and one of its series) is a valid case image

    tree = tmp_path / "tree"
    medseg.segment(data, tree, model, formats="nifti")  # the whole tree: names like nii__a
    result = evaluate(tree, manifest, tmp_path / "report-tree")
    assert result.problems == [] and len(result.rows) == 2 * len(cases)

    one_by_one = tmp_path / "each"
    for case in cases:
        request = medseg.ScanInput(tmp_path / case["image"], case.get("series_uid"))
        medseg.segment(request, one_by_one, model, formats="nifti")
    (one_by_one / "medseg-run.json").unlink()  # no report: the naming rule alone finds them
    (one_by_one / "medseg-run.csv").unlink()
    result = evaluate(one_by_one, manifest, tmp_path / "report-each")
    assert result.problems == [] and len(result.rows) == 2 * len(cases)
    # Same scores either way: the same scans were found.
    tree_rows = evaluate(tree, manifest, tmp_path / "again").rows
    for metric in ("dice", "hd95_mm", "nsd"):
        np.testing.assert_array_equal([r[metric] for r in result.rows], [r[metric] for r in tree_rows])


def test_inputs_in_the_output_folder_are_refused_and_never_overwritten(tmp_path, model):
    folder = _nifti_folder(tmp_path / "scans", n=2)
    before = {p: p.read_bytes() for p in folder.iterdir()}
    for out in (folder, tmp_path):  # the input folder itself, or a folder above it
        with pytest.raises(medseg.errors.FileProblem, match="could overwrite the scans"):
            medseg.segment(folder, out, model, formats="nifti")
    assert {p: p.read_bytes() for p in folder.iterdir()} == before


def test_an_output_folder_inside_the_input_tree_is_not_segmented_next_time(tmp_path, model):
    folder = _nifti_folder(tmp_path / "scans", n=2)
    out = folder / "out"
    medseg.segment(folder, out, model, formats="nifti")
    again = medseg.segment(folder, out, model, formats="nifti")
    assert sorted(r.name for r in again.records) == ["case_0", "case_1"]
    assert {r.status for r in again.records} == {"skipped"}
    assert any("in a medseg output folder" in s["reason"] for s in again.skipped_files)


def test_start_up_clean_up_removes_only_this_runs_temporaries_of_dead_writers(tmp_path, model):
    import subprocess
    import sys

    folder = _nifti_folder(tmp_path / "scans", n=1)
    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        leftover = out / f".case_0.nii.gz.medseg-{dead}-0badc0de.tmp.nii.gz"  # a killed run's
        in_flight = out / f".case_0.seg.nrrd.medseg-{alive.pid}-0badc0de.tmp.seg.nrrd"  # a live writer's
        users = [out / ".notes.tmp.txt", out / ".backup.tmp", out / f".other.nii.gz.medseg-{dead}-0badc0de.tmp.nii.gz"]
        for path in (leftover, in_flight, *users):
            path.write_text("x")
        medseg.segment(folder, out, model, formats="nifti,seg.nrrd")  # both are this run's files
        assert not leftover.exists() and in_flight.exists() and all(p.exists() for p in users)
    finally:
        alive.kill()


def test_resume_redoes_scans_after_model_json_changes_or_an_output_is_emptied(tmp_path, tiny_model_dir):
    import shutil as sh

    folder = _nifti_folder(tmp_path / "scans", n=2)
    model_dir = tmp_path / "model"
    sh.copytree(tiny_model_dir, model_dir)
    out = tmp_path / "out"
    medseg.segment(folder, out, model_dir, formats="nifti")
    (out / "case_0.nii.gz").write_bytes(b"")  # emptied since
    again = {r.name: r.status for r in medseg.segment(folder, out, model_dir, formats="nifti").records}
    assert again == {"case_0": "ok", "case_1": "skipped"}
    spec = json.loads((model_dir / "model.json").read_text())
    spec["postprocess"] = "largest_component"  # same weights, other outputs
    (model_dir / "model.json").write_text(json.dumps(spec))
    redone = {r.name: r.status for r in medseg.segment(folder, out, model_dir, formats="nifti").records}
    assert redone == {"case_0": "ok", "case_1": "ok"}


def test_automatic_batches_count_what_the_network_receives():
    """A thin 32x32 slice runs as 32x32 (not blown up to a 512 window); a 40x30 slice that fits
    a trained 64x48 window runs as 64x48: the automatic batch size counts those pixels."""
    import torch

    from medseg.inference import SlicePredictor
    from medseg.inference.predictor import auto_batch_size
    from medseg.inference.regions import plan_region

    predictor = SlicePredictor(threshold_model(LOW, HIGH, window=(512, 512)))
    assert predictor.model.spec.trained_window is None
    region = plan_region((32, 32), None, multiple=16, window=(512, 512), trained_window=None)
    assert region.size == (32, 32)
    assert auto_batch_size(torch.device("cpu"), 32 * 32) == 256
    trained = plan_region((40, 30), None, multiple=16, window=(512, 512), trained_window=(64, 48))
    assert trained.size == (64, 48)
    assert auto_batch_size(torch.device("cpu"), 512 * 512) == 1


def test_a_shard_part_left_by_another_run_is_not_merged(tmp_path, model):
    folder = _nifti_folder(tmp_path / "scans", n=3)
    out = tmp_path / "out"
    for index in (0, 1):
        medseg.segment(folder, out, model, formats="nifti", shard=(index, 2))
    g = read_scan(folder / "case_0.nii.gz").geometry
    write_nifti(folder / "case_3.nii.gz", phantom(g.shape, seed=3), g)  # the folder grew since
    report = medseg.segment(folder, out, model, formats="nifti", shard=(0, 2))
    assert report.path.name == "medseg-run.part0of2.json"  # part 1 is stale: no merge
    merged = json.loads((out / "medseg-run.json").read_text())
    assert len(merged["scans"]) == 3  # the earlier, consistent merge stands
    final = medseg.segment(folder, out, model, formats="nifti", shard=(1, 2))
    assert final.path.name == "medseg-run.json" and len(final.records) == 4


def test_relative_and_absolute_spellings_are_the_same_scan(tmp_path, model, monkeypatch):
    """segment with relative paths, evaluate and resume with absolute ones (or from another
    working directory): the same files, not stale ones."""
    folder = _nifti_folder(tmp_path / "scans", n=2)
    monkeypatch.chdir(tmp_path)
    first = medseg.segment("scans", "out", model, formats="nifti")
    assert Path(first.records[0].input).is_absolute() and Path(first.records[0].outputs["nifti"]).is_absolute()
    monkeypatch.chdir(folder)
    again = medseg.segment(folder, tmp_path / "out", model, formats="nifti")
    assert {r.status for r in again.records} == {"skipped"}


def test_another_runs_output_folder_is_not_segmented(tmp_path, model):
    folder = _nifti_folder(tmp_path / "scans", n=2)
    medseg.segment(folder, folder / "out", model, formats="nifti")
    report = medseg.segment(folder, folder / "out2", model, formats="nifti")  # another -o, same tree
    assert sorted(r.name for r in report.records) == ["case_0", "case_1"]


def test_an_empty_input_path_is_refused(tmp_path, model):
    with pytest.raises(ValueError, match="empty path"):
        medseg.segment("", tmp_path / "out", model)


def test_report_file_is_the_json_of_the_whole_report_and_records_are_encoded_once(tmp_path):
    import dataclasses
    import json

    from medseg.batch.report import RunReport, ScanRecord

    def record(i, status="ok"):
        return ScanRecord(
            name=f"case_{i}",
            input=f"/in/case_{i}.nii.gz",
            kind="nifti",
            status=status,
            shape=(3, 4, 5),
            spacing=(1.0, 0.5, 2.5),
            outputs={"nifti": f"/out/case_{i}.nii.gz"},
            warnings=('a "quoted" warning\nover two lines',),
            timings={"read": 0.01},
            volumes_ml={"liver": 1.5},
        )

    for records, skipped in (([], []), ([record(0), record(1)], []), ([record(0)], [{"path": "x", "reason": "y"}])):
        report = RunReport(records=list(records), skipped_files=skipped, settings={"a": [1, 2]}, notes=["n"])
        for _ in range(2):  # the second write uses the records' kept encodings
            report.write(tmp_path)
            text = (tmp_path / "medseg-run.json").read_text()
            expected = {
                "settings": report.settings,
                "summary": json.loads(text)["summary"],
                "notes": report.notes,
                "scans": [dataclasses.asdict(r) for r in records],
                "non_scan_files": skipped,
            }
            assert text == json.dumps(expected, indent=1) + "\n"
            assert len((tmp_path / "medseg-run.csv").read_text().splitlines()) == 1 + 2 * len(records)
    # A record replaced by another (resume marks it skipped) is written as it is now.
    report.records[0] = dataclasses.replace(report.records[0], status="skipped")
    report.write(tmp_path)
    assert json.loads((tmp_path / "medseg-run.json").read_text())["scans"][0]["status"] == "skipped"


def test_report_pace_rewrites_small_reports_every_time_and_large_ones_at_most_a_tenth():
    from medseg.batch.runner import _ReportPace

    pace = _ReportPace()
    assert pace.due()
    with pace.timed():
        pass  # a cheap report: always due
    assert pace.due()
    pace.last_cost, pace.last_end = 0.5, time.perf_counter()  # a report that took 0.5 s to write
    assert not pace.due()
    pace.last_end -= 5.0  # ten times its cost has passed
    assert pace.due()
