"""The command line: bad input names the file, exits non-zero and leaves no output file."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import make_geometry, phantom, write_dicom_series, write_nifti

from medseg.cli import main
from medseg.model import load_spec


def _segment(scan, out, model) -> int:
    return main(["segment", str(scan), "-o", str(out), "--model", str(model)])


def _assert_refused(capsys_or_caplog, code, out_dir, *needles):
    assert code != 0
    text = capsys_or_caplog.text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    # Only the run report may be there: no label map, no partial or temporary file.
    left = [p.name for p in out_dir.iterdir()] if out_dir.exists() else []
    assert all(name.startswith("medseg-run.") for name in left), left


def test_segment_writes_label_map(tmp_path, tiny_model_dir, capsys):
    geometry = make_geometry((20, 24, 9))
    scan = write_nifti(tmp_path / "case 1.nii.gz", phantom(geometry.shape), geometry)
    assert _segment(scan, tmp_path / "out", tiny_model_dir) == 0
    assert (tmp_path / "out" / "case_1.nii.gz").is_file()
    assert (tmp_path / "out" / "case_1.seg.nrrd").is_file() and (tmp_path / "out" / "case_1.ctbl").is_file()
    assert "case_1.nii.gz" in capsys.readouterr().out


def _bad_files(tmp_path):
    geometry = make_geometry((20, 24, 9))
    good = write_nifti(tmp_path / "good.nii.gz", phantom(geometry.shape), geometry).read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(good[: len(good) // 3])
    (tmp_path / "zero.nii.gz").touch()
    (tmp_path / "text.nii").write_text("patient list\n")
    (tmp_path / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    nib.save(nib.Nifti1Image(np.zeros((30, 20), np.float32), np.eye(4)), str(tmp_path / "flat.nii.gz"))
    four = np.stack([phantom(geometry.shape)] * 2, axis=-1)
    write_nifti(tmp_path / "fourd.nii.gz", four, geometry)
    nan = np.full(geometry.shape, np.nan, np.float32)
    write_nifti(tmp_path / "nan.nii.gz", nan, geometry)


@pytest.mark.parametrize(
    ("name", "needles"),
    [
        ("truncated.nii.gz", ["truncated.nii.gz", "cannot be read", "re-copy"]),
        ("zero.nii.gz", ["zero.nii.gz", "0 bytes"]),
        ("text.nii", ["text.nii", "cannot be read"]),
        ("flat.nii.gz", ["flat.nii.gz", "2D image", "3D"]),
        ("fourd.nii.gz", ["fourd.nii.gz", "2 channel(s)", "model takes 1", "split"]),
        ("nan.nii.gz", ["nan.nii.gz", "NaN"]),
        ("picture.png", ["picture.png", "not a scan"]),
    ],
)
def test_bad_scans_are_refused_clearly(tmp_path, tiny_model_dir, caplog, name, needles):
    _bad_files(tmp_path)
    out = tmp_path / "out"
    _assert_refused(caplog, _segment(tmp_path / name, out, tiny_model_dir), out, *needles)


def test_dicom_folder_with_several_series_segments_each(tmp_path, tiny_model_dir, capsys):
    geometry = make_geometry((16, 16, 4))
    write_dicom_series(tmp_path / "study" / "s1", phantom(geometry.shape), geometry, description="T1")
    write_dicom_series(tmp_path / "study" / "s2", phantom(geometry.shape), geometry, description="T2")
    out = tmp_path / "out"
    assert _segment(tmp_path / "study", out, tiny_model_dir) == 0
    names = sorted(p.name for p in out.glob("*.nii.gz"))
    assert len(names) == 2 and names[0].startswith("s1_S3_T1_") and names[1].startswith("s2_S3_T2_")
    assert main(["segment", "--list", str(tmp_path / "study")]) == 0
    listing = capsys.readouterr().out
    assert "dicom" in listing and "16x16x4" in listing and "2 scan(s)" in listing


def test_series_uid_picks_one_series(tmp_path, tiny_model_dir, caplog):
    geometry = make_geometry((16, 16, 4))
    write_dicom_series(tmp_path / "study" / "a", phantom(geometry.shape), geometry, series_uid="1.2.3.1")
    write_dicom_series(tmp_path / "study" / "b", phantom(geometry.shape), geometry, series_uid="1.2.3.2")
    out = tmp_path / "out"
    args = ["segment", str(tmp_path / "study"), "-o", str(out), "--model", str(tiny_model_dir)]
    assert main([*args, "--series-uid", "1.2.3.2"]) == 0
    assert [p.name.startswith("b_") for p in out.glob("*.nii.gz")] == [True]
    assert main([*args, "--series-uid", "9.9"]) == 2 and "no DICOM series with UID 9.9" in caplog.text
    assert "with --list" in caplog.text  # where the UIDs are shown


def test_list_shows_each_series_uid(tmp_path, capsys):
    geometry = make_geometry((16, 16, 4))
    write_dicom_series(tmp_path / "study" / "a", phantom(geometry.shape), geometry, series_uid="1.2.3.1")
    write_dicom_series(tmp_path / "study" / "b", phantom(geometry.shape), geometry, series_uid="1.2.3.2")
    assert main(["segment", "--list", str(tmp_path / "study")]) == 0
    listing = capsys.readouterr().out
    assert "uid=1.2.3.1" in listing and "uid=1.2.3.2" in listing


def test_run_output_says_each_thing_once(tmp_path, tiny_model_dir, capsys, caplog):
    """Per-scan line, one summary, a failure's hint once, a run-wide note once, no library noise."""
    geometry = make_geometry((16, 16, 4))
    folder = tmp_path / "scans"
    write_dicom_series(folder / "series", phantom(geometry.shape), geometry)
    for name in ("a", "b"):
        write_nifti(folder / f"{name}.nii.gz", phantom(geometry.shape), geometry)
    (folder / "broken.nii.gz").write_bytes(b"not a nifti")
    args = ["segment", str(folder), "-o", str(tmp_path / "out"), "--model", str(tiny_model_dir)]
    assert main([*args, "--formats", "nifti,dicom-seg"]) == 3
    out, err = capsys.readouterr()
    logged = caplog.text
    assert out.count("ok      ") == 3 and "a -> " in out
    assert logged.count("FAILED  broken") == 1
    assert logged.count("re-export or re-copy it") == 1  # the hint, once
    assert logged.count("dicom-seg: written for DICOM inputs only; 3 of 4 scan(s) are not DICOM") == 1
    assert "4 scan(s): 3 ok, 1 failed, 0 skipped" in logged and "report: " in logged
    assert "copy attributes" not in logged + err  # highdicom's INFO chatter
    assert main([*args, "--formats", "nifti,dicom-seg", "--quiet"]) == 3
    out, _ = capsys.readouterr()
    assert out == "" and caplog.text.count("FAILED  broken") == 2  # once more for the second run


@pytest.fixture
def scan(tmp_path):
    geometry = make_geometry((20, 24, 9))
    return write_nifti(tmp_path / "scan.nii.gz", phantom(geometry.shape), geometry)


def _copy_model(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_weights(tmp_path, tiny_model_dir, scan, caplog):
    model = _copy_model(tiny_model_dir, tmp_path / "model")
    (model / "weights.safetensors").unlink()
    out = tmp_path / "out"
    _assert_refused(caplog, _segment(scan, out, model), out, "weights.safetensors", "is missing")


def test_weights_of_another_network(tmp_path, tiny_model_dir, scan, caplog):
    model = _copy_model(tiny_model_dir, tmp_path / "model")
    spec = json.loads((model / "model.json").read_text())
    spec["network"]["base_channels"] = 8
    spec["weights_sha256"] = None  # the file is intact; it just belongs to another network
    (model / "model.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    code = _segment(scan, out, model)
    _assert_refused(caplog, code, out, "weights.safetensors", "does not fit the network", "shape mismatch")


def test_corrupted_weights_fail_checksum(tmp_path, tiny_model_dir, scan, caplog):
    model = _copy_model(tiny_model_dir, tmp_path / "model")
    data = bytearray((model / "weights.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (model / "weights.safetensors").write_bytes(bytes(data))
    out = tmp_path / "out"
    _assert_refused(caplog, _segment(scan, out, model), out, "weights.safetensors", "checksum")


def test_missing_model_json(tmp_path, scan, caplog):
    (tmp_path / "model").mkdir()
    out = tmp_path / "out"
    _assert_refused(caplog, _segment(scan, out, tmp_path / "model"), out, "model.json", "is missing")


def test_model_json_with_unknown_key(tmp_path, tiny_model_dir, scan, caplog):
    model = _copy_model(tiny_model_dir, tmp_path / "model")
    spec = json.loads((model / "model.json").read_text())
    spec["pre_set"] = "mr"
    (model / "model.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    _assert_refused(caplog, _segment(scan, out, model), out, "model.json", "unknown key", "pre_set")


def test_pickled_checkpoint_is_refused(tmp_path, tiny_model_dir, scan, caplog):
    """A .pt holding arbitrary pickled objects must never be unpickled."""
    model = _copy_model(tiny_model_dir, tmp_path / "model")
    spec = json.loads((model / "model.json").read_text())
    spec.update(weights="weights.pt", weights_sha256=None)
    (model / "model.json").write_text(json.dumps(spec))
    torch.save({"payload": PickledPayload()}, model / "weights.pt")
    out = tmp_path / "out"
    _assert_refused(caplog, _segment(scan, out, model), out, "weights.pt", "refused", "weights_only")


class PickledPayload:
    """Stands in for an object a malicious checkpoint would smuggle in."""


def test_plain_state_dict_checkpoint_loads(tmp_path, tiny_model_dir, scan):
    from safetensors.torch import load_file

    model = _copy_model(tiny_model_dir, tmp_path / "model")
    torch.save(load_file(str(model / "weights.safetensors")), model / "weights.pt")
    spec = json.loads((model / "model.json").read_text())
    spec.update(weights="weights.pt", weights_sha256=None)
    (model / "model.json").write_text(json.dumps(spec))
    assert _segment(scan, tmp_path / "out", model) == 0


def test_init_model_and_info(tmp_path, capsys):
    folder = tmp_path / "m"
    args = ["init-model", "-o", str(folder), "--labels", "background,anterior,posterior"]
    args += ["--preset", "mr", "--base-channels", "32", "--slice-axis", "sagittal"]
    assert main(args) == 0
    spec = load_spec(folder)
    assert [lab.name for lab in spec.labels] == ["background", "anterior", "posterior"]
    assert spec.network.base_channels == 32 and spec.network.out_channels == 3
    assert spec.preset == "mr" and spec.slice_axis == "sagittal"
    assert spec.provenance["trained"] is False
    assert main(["info", str(folder)]) == 0
    assert "posterior" in capsys.readouterr().out


def test_init_model_bad_preset(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["init-model", "-o", str(tmp_path / "m"), "--labels", "bg,fg", "--preset", "ct_liver"])
    assert exit_.value.code == 2 and "invalid choice: 'ct_liver'" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--formats", "nifti,bogus"], "unknown output format 'bogus'"),
        (["--formats", "nifit"], "did you mean 'nifti'?"),
        (["--precision", "fp8"], "invalid choice: 'fp8'"),
        (["--dicom-seg-type", "bitmap"], "invalid choice: 'bitmap'"),
        (["--probabilities", "float16"], "invalid choice: 'float16'"),
        (["--shard", "2/2"], "0 <= I < N"),
        (["--shard", "half"], "must look like 0/4"),
        (["--device", "gpu"], "device must be auto, cpu, cuda or cuda:N"),
        (["--batch-size", "0"], "positive integer"),
    ],
)
def test_bad_options_exit_2_before_any_discovery(tmp_path, capsys, monkeypatch, options, needle):
    """Checked while parsing: nothing is discovered, loaded or written (the input need not exist)."""
    import medseg.io.discover

    monkeypatch.setattr(medseg.io.discover, "discover", lambda *a: pytest.fail("discovery ran"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["segment", str(tmp_path / "nowhere"), "-o", str(out), *options])
    assert exit_.value.code == 2 and needle in capsys.readouterr().err
    assert not out.exists()


def test_segment_without_output_exits_2_before_discovery(tmp_path, capsys, monkeypatch):
    import medseg.io.discover

    monkeypatch.setattr(medseg.io.discover, "discover", lambda *a: pytest.fail("discovery ran"))
    with pytest.raises(SystemExit) as exit_:
        main(["segment", str(tmp_path)])
    assert exit_.value.code == 2 and "needs -o/--output" in capsys.readouterr().err


def test_version_and_defaults_in_help(capsys):
    import medseg

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"medseg {medseg.__version__}"
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: nifti,seg.nrrd)", "(default: binary)", "(default: auto)"):
        assert default in text
    assert "--engine {auto,torch,openvino,onnxruntime}" in text and "fp32 on other CPUs" in text


def _ensemble_folder(tmp_path, member_labels=("background", "anterior", "posterior")):
    from dataclasses import replace

    from medseg.model import init_model
    from medseg.spec import ModelSpec, NetworkSpec, labels_from_names

    top = tmp_path / "ensemble"
    base = ModelSpec(
        labels=labels_from_names(["background", "anterior", "posterior"]),
        network=NetworkSpec(out_channels=3, base_channels=4),
        preset="mr",
        window=(64, 64),
    )
    for i, axis in enumerate(("axial", "sagittal")):
        labels = labels_from_names(list(member_labels)) if i == 1 else base.labels
        init_model(top / f"view-{axis}", replace(base, slice_axis=axis, labels=labels), seed=i)
    replace(base, members=("view-axial", "view-sagittal")).save(top / "model.json")
    return top


def test_ensemble_model_folder_segments(tmp_path, scan):
    top = _ensemble_folder(tmp_path)
    assert main(["segment", str(scan), "-o", str(tmp_path / "out"), "--model", str(top)]) == 0
    assert (tmp_path / "out" / "scan.nii.gz").is_file()


def test_info_describes_each_ensemble_member(tmp_path, capsys):
    top = _ensemble_folder(tmp_path)
    assert main(["info", str(top)]) == 0
    out = capsys.readouterr().out
    assert "ensemble (probabilities averaged)" in out
    assert "view-axial: ArticleUNet" in out and "slice axis axial" in out
    assert "view-sagittal: ArticleUNet" in out and "slice axis sagittal" in out


def test_ensemble_member_with_other_labels_is_refused(tmp_path, scan, caplog):
    top = _ensemble_folder(tmp_path, member_labels=("background", "left", "right"))
    out = tmp_path / "out"
    code = main(["segment", str(scan), "-o", str(out), "--model", str(top)])
    _assert_refused(caplog, code, out, "view-sagittal", "disagrees", "labels")


def test_manifest_and_train_refuse_to_replace_without_overwrite(tmp_path, caplog):
    from helpers import write_msd_dataset

    write_msd_dataset(tmp_path / "Task99", n_cases=4)
    manifest = tmp_path / "m.json"
    assert main(["manifest", str(tmp_path / "Task99"), "-o", str(manifest)]) == 0
    first = manifest.read_text()
    assert main(["manifest", str(tmp_path / "Task99"), "-o", str(manifest), "--seed", "3"]) == 2
    assert manifest.read_text() == first and "m.json" in caplog.text
    assert main(["manifest", str(tmp_path / "Task99"), "-o", str(manifest), "--seed", "3", "--overwrite"]) == 0
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    assert main(["train", "--manifest", str(manifest), "-o", str(run)]) == 2
    assert "is not empty" in caplog.text and (run / "notes.txt").read_text() == "mine"


def test_verbose_after_the_subcommand(tmp_path, capsys):
    assert main(["segment", "--list", str(tmp_path), "-v"]) == 0


def test_init_model_does_not_replace_a_model_without_overwrite(tmp_path, caplog):
    args = ["init-model", "-o", str(tmp_path / "m"), "--labels", "bg,fg", "--base-channels", "4"]
    assert main(args) == 0
    before = (tmp_path / "m" / "model.json").read_text()
    assert main([*args, "--seed", "3"]) == 2 and "already holds a model" in caplog.text
    assert (tmp_path / "m" / "model.json").read_text() == before
    assert main([*args, "--seed", "3", "--overwrite"]) == 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["export", "--format", "tflite", "-o", "x"], "invalid choice: 'tflite'"),
        (["export", "-o", "x"], "the following arguments are required: --format"),
        (["import", "model.pt", "-o", "x", "--labels", "bg,fg", "--slice-axis", "axial"], "required: --preset"),
        (["import", "m.pt", "-o", "x", "--labels", "bg,fg", "--preset", "mr", "--slice-axis", "oblique"], "'oblique'"),
    ],
)
def test_export_and_import_options_are_checked_while_parsing(tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and needle in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_export_torchscript_then_segment(tmp_path, tiny_model_dir, scan, caplog, capsys):
    out = tmp_path / "ts"
    args = ["export", "--model", str(tiny_model_dir), "--format", "torchscript", "-o", str(out)]
    assert main(args) == 0 and "checked against PyTorch" in capsys.readouterr().out
    assert load_spec(out).weights == "weights.ts"
    assert main(["info", str(out)]) == 0 and "exported as torchscript from" in capsys.readouterr().out
    assert _segment(scan, tmp_path / "seg", out) == 0 and (tmp_path / "seg" / "scan.nii.gz").is_file()
    assert main(args) == 2 and f"{out}: already exists and is not empty" in caplog.text
    assert main([*args, "--overwrite"]) == 0
