"""--precision auto: decided per machine at run time, recorded in the run report."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import make_geometry, phantom, threshold_model, write_nifti

import medseg
import medseg.inference.options as options
from medseg.inference.options import DEFAULT_INFERENCE, InferenceOptions, resolve_device, resolve_precision
from medseg.training.config import TrainConfig
from medseg.training.optimisation import autocast_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_is_the_default():
    assert DEFAULT_INFERENCE.precision == "auto" and DEFAULT_INFERENCE.engine == "auto"


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpus_takes_bf16_only_where_it_is_native(monkeypatch, native, expected):
    monkeypatch.setattr(options, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", CPU) == expected
    # Training decides the same way.
    assert autocast_dtype(TrainConfig(precision="auto"), CPU) == (torch.bfloat16 if native else None)


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16"), (False, "fp16")])
def test_auto_on_gpus_takes_autocast(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_precision("auto", CUDA) == expected


@pytest.mark.parametrize(("asked", "expected"), [("auto", "cuda:1"), ("cuda", "cuda:1"), ("cuda:0", "cuda:0")])
def test_devices_resolve_to_an_indexed_gpu(monkeypatch, asked, expected):
    """Reports say which GPU ran: "cuda" and "auto" are the current GPU, with its index."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert str(resolve_device(asked)) == expected


def test_a_gpu_that_is_not_there_is_refused_by_name(monkeypatch):
    with pytest.raises(ValueError, match="sees no CUDA GPU; use --device cpu"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"--device cuda:3 was asked for but PyTorch sees 1 GPU\(s\), cuda:0 to"):
        resolve_device("cuda:3")
    assert str(resolve_device("cpu")) == "cpu"


@pytest.mark.parametrize("asked", ["fp32", "bf16", "fp16"])
def test_explicit_precision_is_kept(monkeypatch, asked):
    monkeypatch.setattr(options, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision(asked, CPU) == asked


def test_bad_precision_and_engine_are_refused_by_name():
    with pytest.raises(ValueError, match="precision must be one of"):
        InferenceOptions(precision="int8")
    with pytest.raises(ValueError, match="engine must be one of"):
        InferenceOptions(engine="tensorrt")


@pytest.mark.parametrize("native", [True, False])
def test_run_report_records_the_precision_used(tmp_path, monkeypatch, native):
    monkeypatch.setattr(options, "cpu_has_native_bf16", lambda: native)
    geometry = make_geometry((20, 18, 5), (0.9, 1.1, 3.0))
    scan = write_nifti(tmp_path / "scan.nii.gz", phantom(geometry.shape), geometry)
    report = medseg.segment(scan, tmp_path / "out", threshold_model(50.0, 200.0), formats="nifti", device="cpu")
    assert report.records[0].status == "ok"
    assert report.settings["precision"] == ("bf16" if native else "fp32")
    assert report.settings["device"] == "cpu" and report.settings["engine"]
    saved = json.loads(report.path.read_text())
    assert saved["settings"]["precision"] == report.settings["precision"]
    assert np.asarray(nib.load(report.records[0].outputs["nifti"]).dataobj).any()
