"""Training end to end on a tiny synthetic MSD dataset: model folder, logs, resume, DDP."""

import json
import logging
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import write_msd_dataset

from medseg.cli import main
from medseg.data.manifest import build_manifest
from medseg.errors import ConfigError, FileProblem
from medseg.model import load_model
from medseg.training.augment import augment_batch
from medseg.training.config import AugmentConfig, TrainConfig
from medseg.training.trainer import check_run_folder, train

TINY = TrainConfig(
    labels=("background", "left", "right"),
    base_channels=4,
    window=(32, 16),
    epochs=2,
    steps_per_epoch=3,
    batch_size=8,
    val_every=1,
    lr=0.01,
    precision="fp32",
)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_msd_dataset(root / "Task99", n_cases=5)
    path = root / "blobs.json"
    build_manifest(root / "Task99", path, val_fraction=0.4, seed=0)
    return path


def test_training_writes_a_model_folder_segment_takes(manifest, tmp_path):
    result = train(TINY, manifest, tmp_path / "run", show_progress=False)
    run = tmp_path / "run"
    for name in ("config.json", "log.csv", "curves.png", "summary.json", "checkpoint.pt"):
        assert (run / name).is_file(), name
    rows = (run / "log.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,lr,loss") and "dice_left" in rows[0] and len(rows) == 3
    model = load_model(result.model_dir)
    assert [lab.name for lab in model.spec.labels] == ["background", "left", "right"]
    assert model.spec.provenance["trained"] is True and model.spec.slice_axis == "sagittal"
    assert model.spec.provenance["precision"] == "fp32" and "CPU" in model.spec.provenance["hardware"]
    domain = model.spec.provenance["training_data"]  # what runs compare new scans with
    shape = sorted(nib.load(str(manifest.parent / "Task99" / "imagesTr" / "case_000.nii.gz")).shape)
    assert domain["cases"] == 3
    assert all(lo <= v <= hi for lo, v, hi in zip(domain["shape"]["min"], shape, domain["shape"]["max"]))
    assert set(result.best_dice) == {"left", "right"}
    image = manifest.parent / "Task99" / "imagesTr" / "case_000.nii.gz"
    assert main(["segment", str(image), "-o", str(tmp_path / "seg"), "--model", str(result.model_dir)]) == 0
    out = nib.load(str(tmp_path / "seg" / "case_000.nii.gz"))
    np.testing.assert_allclose(out.affine, nib.load(str(image)).affine, atol=1e-5)


@pytest.mark.parametrize("batch_dice", [False, True])
def test_training_learns_the_blobs(manifest, tmp_path, batch_dice):
    config = replace(TINY, epochs=6, steps_per_epoch=10, val_every=6, base_channels=8, batch_dice=batch_dice)
    result = train(config, manifest, tmp_path / "run", show_progress=False)
    assert min(result.best_dice.values()) > 0.5, result.best_dice


def test_resume_continues_exactly(manifest, tmp_path):
    straight = train(TINY, manifest, tmp_path / "a", show_progress=False)
    interrupted = replace(TINY, time_limit_minutes=0.0)  # stops after every epoch
    train(interrupted, manifest, tmp_path / "b", show_progress=False)
    first = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert first["epochs_run"] == 1
    # A run folder written before an option existed resumes with that option's default.
    saved = tmp_path / "b" / "config.json"
    saved.write_text(json.dumps({k: v for k, v in json.loads(saved.read_text()).items() if k != "batch_dice"}))
    train(interrupted, manifest, tmp_path / "b", resume=True, show_progress=False)
    # Time spent counts across the resume (the model card reports it).
    second = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert second["seconds"] > first["seconds"] > 0
    # Reloading the finished run (as pipelines/train_bundled.py does) adds no time.
    train(interrupted, manifest, tmp_path / "b", resume=True, show_progress=False)
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["seconds"] == second["seconds"]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1 and straight.epochs_run == 2
    for key, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][key], tensor, rtol=0, atol=0, msg=key)


def test_resume_with_another_config_names_the_keys_that_differ(manifest, tmp_path):
    train(replace(TINY, epochs=1), manifest, tmp_path / "run", show_progress=False)
    changed = replace(TINY, epochs=1, lr=0.5, augment=replace(TINY.augment, rotate_degrees=5.0))
    with pytest.raises(ConfigError, match="different configuration") as info:
        train(changed, manifest, tmp_path / "run", resume=True)
    text = str(info.value)
    assert "lr: saved 0.01, now 0.5" in text and "augment.rotate_degrees: saved 15.0, now 5.0" in text
    assert "epochs" not in text and str(tmp_path / "run" / "config.json") in text


def _fingerprint(run):
    """The run's files that a refused or finished call must leave as they were."""
    return {name: (run / name).read_bytes() for name in ("config.json", "checkpoint.pt", "summary.json", "log.csv")}


def test_an_existing_run_is_never_trained_over_by_mistake(manifest, tmp_path, caplog):
    run = tmp_path / "run"
    first = train(replace(TINY, epochs=1), manifest, run, show_progress=False)
    before = _fingerprint(run)
    with pytest.raises(FileProblem, match=r"holds an earlier training run.*--resume.*--overwrite") as info:
        train(replace(TINY, epochs=1), manifest, run, show_progress=False)
    assert info.value.path == run
    assert _fingerprint(run) == before
    # Resuming the finished run says so, trains nothing and gives its result back.
    with caplog.at_level(logging.WARNING, logger="medseg.training.trainer"):
        again = train(replace(TINY, epochs=1), manifest, run, resume=True, show_progress=False)
    assert "is finished: all 1 epochs are trained" in caplog.text and "nothing to resume" in caplog.text
    assert (again.best_epoch, again.best_dice, again.epochs_run) == (first.best_epoch, first.best_dice, 1)
    assert again.seconds == pytest.approx(first.seconds)
    assert _fingerprint(run) == before
    with pytest.raises(ConfigError, match="exclude each other"):
        train(TINY, manifest, run, resume=True, overwrite=True)
    # overwrite replaces the run's own outputs and leaves other files alone.
    (run / "notes.txt").write_text("mine")
    train(replace(TINY, epochs=1, seed=3), manifest, run, show_progress=False, overwrite=True)
    assert json.loads((run / "config.json").read_text())["seed"] == 3
    assert (run / "notes.txt").read_text() == "mine"
    assert _fingerprint(run)["checkpoint.pt"] != before["checkpoint.pt"]


def test_check_run_folder_refuses_without_touching_anything(tmp_path):
    check_run_folder(tmp_path / "new")  # absent: fine, and not created
    assert not (tmp_path / "new").exists()
    (tmp_path / "run").mkdir()
    check_run_folder(tmp_path / "run")  # empty: fine
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(FileProblem, match="holds an earlier training run"):
        check_run_folder(tmp_path / "run")
    check_run_folder(tmp_path / "run", resume=True)
    check_run_folder(tmp_path / "run", overwrite=True)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == b"x"
    with pytest.raises(ConfigError, match="exclude each other"):
        check_run_folder(tmp_path / "run", resume=True, overwrite=True)


def test_a_folder_that_is_not_empty_is_refused(manifest, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "scan.nii.gz").write_bytes(b"")
    with pytest.raises(FileProblem, match="is not empty"):
        train(TINY, manifest, tmp_path / "data", show_progress=False)
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["scan.nii.gz"]
    (tmp_path / "file").write_text("")
    with pytest.raises(FileProblem, match="is a file"):
        train(TINY, manifest, tmp_path / "file", show_progress=False)


@pytest.mark.slow
def test_two_cpu_processes_hold_identical_weights(manifest, tmp_path):
    config = tmp_path / "tiny.yaml"
    import yaml

    config.write_text(yaml.safe_dump(json.loads(json.dumps(TINY.to_dict()))))
    run = tmp_path / "ddp"
    code = main(
        [
            "train",
            "--manifest",
            str(manifest),
            "-o",
            str(run),
            "--config",
            str(config),
            "--nproc",
            "2",
        ]
    )
    assert code == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replicas_in_sync"] is True
    assert load_model(run / "model").spec.network.base_channels == 4


def test_config_rejects_unknown_keys(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"epochs": 3, "learning_rate": 0.1}))
    with pytest.raises(ConfigError, match=r"unknown key.*learning_rate"):
        TrainConfig.load(path)
    path.write_text(json.dumps({"augment": {"rotate": 5}}))
    with pytest.raises(ConfigError, match=r"augment.*rotate"):
        TrainConfig.load(path)


def test_augmentation_is_seeded_and_keeps_labels_valid():
    images = torch.randn(6, 1, 32, 16)
    labels = torch.randint(0, 3, (6, 1, 32, 16))
    config = AugmentConfig(flip_axes=(1,))
    a = augment_batch(images, labels, config, torch.Generator().manual_seed(3))
    b = augment_batch(images, labels, config, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a[0], b[0])
    assert torch.equal(a[1], b[1])
    assert set(a[1].unique().tolist()) <= {0, 1, 2}
    assert not torch.equal(a[0], images)


def test_augmentation_identity_when_disabled():
    images = torch.randn(4, 1, 32, 16)
    labels = torch.randint(0, 3, (4, 1, 32, 16))
    off = AugmentConfig(probability=0.0, intensity_scale=0, intensity_shift=0, noise_std=0)
    out_images, out_labels = augment_batch(images, labels, off, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out_images, images, atol=1e-5, rtol=0)
    assert torch.equal(out_labels, labels)
