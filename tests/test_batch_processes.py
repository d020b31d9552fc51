"""Batch runs as separate processes: killed half-way and resumed; split into shards."""

import json
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import pytest
from helpers import make_geometry, phantom, write_nifti

pytestmark = pytest.mark.slow


def _folder(root, n):
    g = make_geometry((40, 48, 24), (1.0, 1.0, 1.5))
    root.mkdir(parents=True)
    for i in range(n):
        write_nifti(root / f"case_{i:02d}.nii.gz", phantom(g.shape, seed=i), g)
    return root


def _command(folder, out, model, *extra):
    return [
        sys.executable,
        "-m",
        "medseg",
        "segment",
        str(folder),
        "-o",
        str(out),
        "--model",
        str(model),
        "--quiet",
        *extra,
    ]


def _records(out, name="medseg-run.json"):
    path = out / name
    return json.loads(path.read_text())["scans"] if path.is_file() else []


def test_sigkill_half_way_then_resume(tmp_path, tiny_model_dir):
    folder = _folder(tmp_path / "scans", 12)
    out = tmp_path / "out"
    proc = subprocess.Popen(_command(folder, out, tiny_model_dir), start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(_records(out)) < 3 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {r["name"] for r in _records(out) if r["status"] == "ok"}
    assert 3 <= len(finished) < 12, "the kill should land half-way"
    # Whatever is under a final name is complete; a write the kill cut short is only under
    # its hidden temporary name (pathlib's glob matches those too, so they are left out here).
    final = [p for p in out.glob("*.nii.gz") if not p.name.startswith(".")]
    assert {p.name.removesuffix(".nii.gz") for p in final} >= finished
    for path in final:
        assert nib.load(str(path)).get_fdata().shape == (40, 48, 24)

    assert subprocess.run(_command(folder, out, tiny_model_dir)).returncode == 0
    records = {r["name"]: r["status"] for r in _records(out)}
    assert len(records) == 12
    assert {n for n, s in records.items() if s == "skipped"} == finished
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    for path in out.glob("*.nii.gz"):
        assert nib.load(str(path)).get_fdata().shape == (40, 48, 24)


def test_two_shards_merge_their_reports(tmp_path, tiny_model_dir):
    folder = _folder(tmp_path / "scans", 6)
    out = tmp_path / "out"
    procs = [subprocess.Popen(_command(folder, out, tiny_model_dir, "--shard", f"{i}/2")) for i in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    parts = [_records(out, f"medseg-run.part{i}of2.json") for i in range(2)]
    assert sorted(len(p) for p in parts) == [3, 3]
    merged = _records(out)
    assert sorted(r["name"] for r in merged) == [f"case_{i:02d}" for i in range(6)]
    assert len(list(out.glob("*.nii.gz"))) == 6


def test_torchrun_splits_scans_between_ranks(tmp_path, tiny_model_dir):
    folder = _folder(tmp_path / "scans", 4)
    out = tmp_path / "out"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0"]
    args = ["-m", "medseg", "segment", str(folder), "-o", str(out), "--model", str(tiny_model_dir), "--quiet"]
    assert subprocess.run([*torchrun, *args], timeout=300).returncode == 0
    parts = [_records(out, f"medseg-run.part{i}of2.json") for i in range(2)]
    assert sorted(len(p) for p in parts) == [2, 2]
    assert sorted(r["name"] for r in _records(out)) == [f"case_{i:02d}" for i in range(4)]


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_sigterm_is_handled_as_ctrl_c(tmp_path, tiny_model_dir, executor):
    """scancel, docker stop and timeout send SIGTERM: the run ends as on Ctrl-C, exit 143."""
    if executor == "ray":
        pytest.importorskip("ray", reason="Ray is the optional extra medseg[ray]")
    folder = _folder(tmp_path / "scans", 12)
    out = tmp_path / "out"
    command = _command(folder, out, tiny_model_dir, "--executor", executor)
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and len(_records(out)) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "terminated (SIGTERM): what finished is written" in stderr and "SIGTERM received" not in stderr
    report = json.loads((out / "medseg-run.json").read_text())
    assert 2 <= len(report["scans"]) <= 12 and report["summary"]["seconds"] > 0
    assert not (out / ".medseg-run.json.lock").exists()
    for record in report["scans"]:  # every recorded scan is complete on disk
        assert nib.load(record["outputs"]["nifti"]).shape == (40, 48, 24)
