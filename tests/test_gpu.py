"""On a CUDA GPU: device and precision choices, exact geometry and known labels, agreement
with the CPU, the command line, and training (skipped where PyTorch sees no GPU, as on CI).

Run them where a GPU is: ``pytest -m gpu tests/test_gpu.py``; benchmarks/RESULTS.md ("GPU")
records the last such run.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_geometry, phantom, rotation, threshold_labels, threshold_model, write_msd_dataset, write_nifti

from medseg import segment
from medseg.cli import main
from medseg.data.manifest import build_manifest
from medseg.evaluation.metrics import dice
from medseg.inference.engines import load_engine
from medseg.inference.options import InferenceOptions, resolve_device, resolve_precision
from medseg.inference.predictor import make_predictor
from medseg.inference.segment import segment_volume
from medseg.io import read_scan
from medseg.io.readers import read_file
from medseg.model import load_model
from medseg.training.config import TrainConfig
from medseg.training.trainer import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (PyTorch sees none here)"),
]

CUDA = torch.device("cuda")


def test_auto_picks_the_gpu_and_reduced_precision():
    assert resolve_device("auto").type == "cuda"
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert resolve_precision("auto", CUDA) == expected
    engine = load_engine(threshold_model(0.0, 1.0), CUDA)
    assert (engine.name, engine.precision) == ("torch", expected)


@pytest.mark.parametrize("window", [(512, 512), (32, 32)], ids=["whole-slices", "sliding-window"])
def test_gpu_labels_are_exact_on_the_input_grid(tmp_path, window):
    """Oblique, anisotropic, distinct axis sizes: labels back on the input's grid, to the voxel,
    with the run report saying where and how the network ran."""
    geometry = make_geometry((45, 61, 23), (0.7, 1.3, 3.0), direction=rotation((12, -7, 25)))
    array = phantom(geometry.shape)
    scan = write_nifti(tmp_path / "oblique.nii.gz", array, geometry)
    report = segment(scan, tmp_path / "out", threshold_model(50, 200, window=window), formats="nifti")
    (record,) = report.records
    assert record.status == "ok", record.error
    out = read_scan(record.outputs["nifti"])
    assert out.geometry.mismatch(geometry) is None
    np.testing.assert_array_equal(out.array[0], threshold_labels(array, 50, 200))
    assert report.settings["device"] == "cuda:0"
    assert report.settings["precision"] == resolve_precision("auto", CUDA)


@pytest.fixture(scope="module")
def gpu_trained(tmp_path_factory):
    """An ArticleUNet trained on the GPU (precision auto) on synthetic blobs, and its data."""
    root = tmp_path_factory.mktemp("blobs")
    write_msd_dataset(root / "Task99", n_cases=5)
    manifest = root / "blobs.json"
    build_manifest(root / "Task99", manifest, val_fraction=0.4, seed=0)
    config = TrainConfig(
        labels=("background", "left", "right"),
        base_channels=8,
        window=(32, 16),
        epochs=6,
        steps_per_epoch=10,
        batch_size=8,
        val_every=6,
        lr=0.01,
        device="cuda",
    )
    result = train(config, manifest, root / "run", show_progress=False)
    return result, root / "Task99"


def test_training_on_the_gpu_learns(gpu_trained):
    result, _ = gpu_trained
    provenance = load_model(result.model_dir).spec.provenance
    assert provenance["hardware"] == torch.cuda.get_device_name()
    assert provenance["precision"] == resolve_precision("auto", CUDA)
    assert min(result.best_dice.values()) > 0.5, result.best_dice


def test_gpu_agrees_with_the_cpu_on_a_trained_network(gpu_trained, tmp_path):
    """GPU at precision auto against the CPU in fp32, same weights: the bound --precision auto
    is held to (99.9% of voxels)."""
    result, data = gpu_trained
    model = load_model(result.model_dir)
    images = sorted((data / "imagesTr").glob("*.nii.gz"))
    gpu = make_predictor(model, InferenceOptions(device="cuda"))
    cpu = make_predictor(model, InferenceOptions(device="cpu", precision="fp32", engine="torch"))
    agree = total = 0
    for image in images:
        volume = read_file(image)
        a, b = segment_volume(volume, gpu), segment_volume(volume, cpu)
        agree, total = agree + int((a == b).sum()), total + a.size
    assert agree / total >= 0.999, agree / total


def test_cli_segments_on_the_gpu(gpu_trained, tmp_path):
    result, data = gpu_trained
    image = sorted((data / "imagesTr").glob("*.nii.gz"))[0]
    out = tmp_path / "seg"
    assert main(["segment", str(image), "-o", str(out), "--model", str(result.model_dir), "--device", "cuda"]) == 0
    run = json.loads((out / "medseg-run.json").read_text())
    assert run["settings"]["device"] == "cuda:0"
    assert [r["status"] for r in run["scans"]] == ["ok"]
    assert read_scan(out / image.name).geometry.mismatch(read_scan(image).geometry) is None


@pytest.mark.realdata
def test_bundled_ensemble_on_the_gpu_agrees_with_the_cpu(shared_data):
    """The bundled four-member ensemble on 8 real validation cases: GPU (precision auto)
    against CPU fp32, the goal --precision auto is held to: >= 99.9% of voxels, Dice change
    <= 0.002 per label."""
    manifest = json.loads(Path("data_manifests/hippocampus.json").read_text())
    cases = [
        (
            shared_data / "hippocampus/imagesTr" / Path(c["image"]).name,
            shared_data / "hippocampus/labelsTr" / Path(c["label"]).name,
        )
        for c in manifest["validation"][:8]
    ]
    model = load_model(Path("models/hippocampus-mr"))
    gpu = make_predictor(model, InferenceOptions(device="cuda"))
    cpu = make_predictor(model, InferenceOptions(device="cpu", precision="fp32", engine="torch"))
    agree = total = 0
    change = []
    for image, label in cases:
        volume = read_file(image)
        truth = np.rint(read_scan(label).array[0]).astype(int)
        a, b = segment_volume(volume, gpu), segment_volume(volume, cpu)
        agree, total = agree + int((a == b).sum()), total + a.size
        change.append([dice(a, truth, v) - dice(b, truth, v) for v in (1, 2)])
    assert agree / total >= 0.999, agree / total
    assert np.all(np.abs(np.mean(change, axis=0)) <= 0.002), np.mean(change, axis=0)


def test_a_gpu_run_and_a_cpu_run_do_not_share_resume_keys(tmp_path):
    """A folder segmented on the CPU in fp32 is segmented again on the GPU in reduced precision
    (the resume key holds the resolved precision), not skipped as done."""
    geometry = make_geometry((30, 20, 12))
    scan = write_nifti(tmp_path / "s.nii.gz", phantom(geometry.shape), geometry)
    model = threshold_model(50, 200)
    first = segment(scan, tmp_path / "out", model, formats="nifti", device="cpu", precision="fp32")
    again = segment(scan, tmp_path / "out", model, formats="nifti", device="cuda")
    assert first.records[0].status == "ok"
    assert again.records[0].status == "ok", again.records[0]
    # The same settings a second time: done, skipped.
    third = segment(scan, tmp_path / "out", model, formats="nifti", device="cuda")
    assert third.records[0].status == "skipped"
