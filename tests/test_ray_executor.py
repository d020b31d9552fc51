"""``--executor ray``: the same outputs and records as a local run, on a local Ray cluster;
a worker killed mid-run; a bad file; resume; the CLI starting its own Ray."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import make_geometry, phantom, rotation, write_dicom_series, write_itk, write_nifti

from medseg import segment
from medseg.batch.ray_executor import PoolPlan, RayUnavailable, plan_pool

ray = pytest.importorskip("ray", reason="Ray is the optional extra medseg[ray] (make setup installs it)")

pytestmark = pytest.mark.slow

# What differs between two runs of the same scans: when and how long, and where written.
_RUN_FIELDS = {"seconds", "timings", "outputs"}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (2 CPUs): medseg uses the connection it finds."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture
def mixed(tmp_path):
    """NIfTI (oblique, anisotropic), NRRD, and a DICOM series; scans of different sizes."""
    root = tmp_path / "scans"
    g = make_geometry((20, 24, 9), (0.9, 0.8, 2.5), direction=rotation((8, 0, 15)))
    big = make_geometry((40, 36, 14), (0.7, 0.9, 2.0))
    root.mkdir()
    write_nifti(root / "a.nii.gz", phantom(g.shape), g)
    write_nifti(root / "big.nii.gz", phantom(big.shape, seed=3), big)
    write_itk(root / "b.nrrd", phantom(g.shape, seed=1), g)
    write_nifti(root / "c.nii", phantom(g.shape, seed=2), g)
    write_dicom_series(root / "dicom", np.round(phantom(g.shape)), g, description="T1 axial")
    return root


def _records(report) -> dict[str, dict]:
    return {r.name: {k: v for k, v in dataclasses.asdict(r).items() if k not in _RUN_FIELDS} for r in report.records}


def test_ray_run_equals_local_run_and_resumes(mixed, tmp_path, tiny_model_dir, local_ray):
    local = segment(mixed, tmp_path / "local", tiny_model_dir, formats="nifti,seg.nrrd")
    remote = segment(mixed, tmp_path / "ray", tiny_model_dir, formats="nifti,seg.nrrd", executor="ray")
    assert remote.settings["executor"] == "ray" and remote.settings["workers"] == 1
    assert remote.settings["precision"] == local.settings["precision"]
    assert {r.status for r in remote.records} == {"ok"} and len(remote.records) == 5
    assert _records(remote) == _records(local)
    for record in local.records:
        ours = next(r for r in remote.records if r.name == record.name)
        assert {k: Path(v).name for k, v in ours.outputs.items()} == {
            k: Path(v).name for k, v in record.outputs.items()
        }
        a, b = nib.load(record.outputs["nifti"]), nib.load(ours.outputs["nifti"])
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        assert np.array_equal(a.affine, b.affine)
    # The driver's report on disk is the returned one.
    saved = json.loads((tmp_path / "ray" / "medseg-run.json").read_text())
    assert saved["settings"]["complete"] and len(saved["scans"]) == 5
    # Resume: nothing changed, nothing redone; a changed input is redone.
    again = segment(mixed, tmp_path / "ray", tiny_model_dir, formats="nifti,seg.nrrd", executor="ray")
    assert {r.status for r in again.records} == {"skipped"}
    g = make_geometry((20, 24, 9), (0.9, 0.8, 2.5))
    write_itk(mixed / "b.nrrd", phantom(g.shape, seed=7), g)
    third = segment(mixed, tmp_path / "ray", tiny_model_dir, formats="nifti,seg.nrrd", executor="ray")
    assert {r.name: r.status for r in third.records if r.status == "ok"} == {"b": "ok"}


def _actor_pids_segmenting() -> list[int]:
    """Ray workers whose process title says they are inside ``_ScanActor.segment``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"_ScanActor.segment" in title:
                pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker to kill through /proc (Linux)")
def test_worker_killed_mid_run_every_scan_ok(tmp_path, tiny_model_dir, local_ray):
    folder = tmp_path / "scans"
    folder.mkdir()
    g = make_geometry((48, 40, 24), (1.0, 1.0, 1.5))
    for i in range(8):
        write_nifti(folder / f"case_{i}.nii.gz", phantom(g.shape, seed=i), g)
    out = tmp_path / "out"
    result = {}
    run = threading.Thread(target=lambda: result.update(report=segment(folder, out, tiny_model_dir, executor="ray")))
    run.start()
    killed = []
    deadline = time.time() + 120
    while not killed and time.time() < deadline and run.is_alive():
        for pid in _actor_pids_segmenting():
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        time.sleep(0.005)
    run.join(300)
    assert killed, "no worker was seen segmenting"
    report = result["report"]
    assert sorted(r.name for r in report.records) == [f"case_{i}" for i in range(8)]  # each recorded once
    assert {r.status for r in report.records} == {"ok"}
    retried = [r for r in report.records if any("worker died" in w for w in r.warnings)]
    assert retried, "the killed worker's scan should say it was segmented again"
    assert all("segmented again, on attempt 2" in " ".join(r.warnings) for r in retried)
    for record in report.records:
        labels = nib.load(record.outputs["nifti"])
        assert labels.shape == g.shape
    # No half-written file: every output is complete under its name, no temporary is left.
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_bad_file_is_one_failed_record_not_retried(mixed, tmp_path, tiny_model_dir, local_ray):
    good = (mixed / "a.nii.gz").read_bytes()
    (mixed / "broken.nii.gz").write_bytes(good[: len(good) // 3])
    report = segment(mixed, tmp_path / "out", tiny_model_dir, executor="ray")
    failed = [r for r in report.records if r.status == "failed"]
    assert [r.name for r in failed] == ["broken"]
    assert failed[0].stage == "read" and "broken.nii.gz" in failed[0].error
    assert not any("attempt" in w for r in report.records for w in r.warnings)  # nothing was retried
    assert sum(r.status == "ok" for r in report.records) == 5


def test_unusable_model_folder_on_workers_is_named(mixed, tmp_path, tiny_model_dir, local_ray):
    from medseg.errors import ModelError
    from medseg.model import load_model

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    model = load_model(copy)
    spec = json.loads((copy / "model.json").read_text())
    spec["postprocess"] = "largest_component" if spec.get("postprocess") != "largest_component" else "none"
    (copy / "model.json").write_text(json.dumps(spec))  # the workers would load another model
    with pytest.raises(ModelError, match="differs on node"):
        segment(mixed, tmp_path / "out", model, executor="ray")


def test_more_workers_than_the_cluster_has_room_for_go_on_with_those_that_start(
    mixed, tmp_path, tiny_model_dir, local_ray, monkeypatch, caplog
):
    import medseg.batch.ray_executor as ray_executor

    monkeypatch.setattr(ray_executor, "PARTIAL_START_GRACE_S", 3.0)  # 60 s in earnest
    report = segment(mixed, tmp_path / "out", tiny_model_dir, executor="ray", ray_workers=5)
    assert report.settings["workers"] == 2  # 1 CPU each on a 2-CPU cluster
    assert {r.status for r in report.records} == {"ok"} and len(report.records) == 5
    assert "2 of 5 Ray workers started" in caplog.text


def test_pool_from_cluster_resources():
    assert plan_pool([{"CPU": 2.0}], "auto") == PoolPlan(1, 2.0, 0)
    assert plan_pool([{"CPU": 16.0}, {"CPU": 8.0}], "auto") == PoolPlan(6, 4.0, 0)
    assert plan_pool([{"CPU": 16.0, "GPU": 2.0}, {"CPU": 8.0}], "auto") == PoolPlan(2, 8.0, 1)
    assert plan_pool([{"CPU": 16.0, "GPU": 2.0}], "cpu") == PoolPlan(4, 4.0, 0)
    assert plan_pool([{"CPU": 16.0}], "auto", workers=8) == PoolPlan(8, 2.0, 0)
    with pytest.raises(RayUnavailable, match="no GPU"):
        plan_pool([{"CPU": 4.0}], "cuda")
    with pytest.raises(RayUnavailable, match="no alive node"):
        plan_pool([], "auto")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ray_workers": 2}, "need executor 'ray'"),
        ({"executor": "dask"}, "executor must be one of"),
        ({"executor": "ray", "shard": (0, 2)}, "do not combine"),
        ({"executor": "ray", "ray_workers": 0}, "positive integer"),
    ],
)
def test_bad_executor_options_are_refused_before_work(mixed, tmp_path, tiny_model_dir, options, message):
    with pytest.raises(ValueError, match=message):
        segment(mixed, tmp_path / "out", tiny_model_dir, **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("address", "message"), [("127.0.0.1:1", "nothing answers at 127.0.0.1:1"), ("garbage", "is not a Ray address")]
)
def test_unreachable_or_malformed_address_is_said_at_once(mixed, tmp_path, tiny_model_dir, address, message):
    # A fresh process: this module's own Ray connection would be used instead of any address.
    command = [sys.executable, "-m", "medseg", "segment", str(mixed), "-o", str(tmp_path / "out")]
    command += ["--model", str(tiny_model_dir), "--executor", "ray", "--ray-address", address]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)  # ray.init alone: minutes
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "medseg-run.json").exists()


def test_without_ray_installed_the_message_says_how(mixed, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(RayUnavailable, match=r"pip install 'medseg\[ray\]'"):
        segment(mixed, tmp_path / "out", tiny_model_dir, executor="ray")


def test_cli_starts_a_local_ray(mixed, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "medseg", "segment", str(mixed), "-o", str(out), "--model", str(tiny_model_dir)]
    done = subprocess.run([*command, "--executor", "ray", "--quiet"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "medseg-run.json").read_text())
    assert report["settings"]["executor"] == "ray" and report["settings"]["ray_address"] == "local"
    assert len(report["scans"]) == 5 and {s["status"] for s in report["scans"]} == {"ok"}
    bad = subprocess.run([*command, "--ray-workers", "2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "need executor 'ray'" in bad.stderr and "Traceback" not in bad.stderr
