"""`medseg ensemble`: trained model folders combined into one self-contained ensemble folder."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import make_geometry, phantom, rotation, segment_one, write_nifti

from medseg.bundled import default_model_dir
from medseg.cli import main
from medseg.errors import ModelError
from medseg.evaluation.metrics import dice
from medseg.io import read_scan
from medseg.io.files import file_digest
from medseg.model import build_ensemble, init_model, load_model, load_spec, member_name
from medseg.spec import ModelSpec, NetworkSpec, labels_from_names


def _model(folder: Path, slice_axis: str, labels=("background", "anterior", "posterior"), preset="mr") -> Path:
    spec = ModelSpec(
        labels=labels_from_names(list(labels)),
        network=NetworkSpec(out_channels=len(labels), base_channels=4),
        preset=preset,
        slice_axis=slice_axis,
        window=(48, 48),
    )
    init_model(folder, spec)
    return folder


def test_cli_builds_an_ensemble_that_segments_on_the_input_grid(tmp_path):
    a = _model(tmp_path / "run-axial" / "model", "axial")
    b = _model(tmp_path / "run-coronal" / "model", "coronal")
    out = tmp_path / "ens"
    assert main(["ensemble", str(a), str(b), "-o", str(out), "--postprocess", "largest_component"]) == 0

    model = load_model(out)
    assert model.spec.members == ("run-axial", "run-coronal")  # named after the run folders
    assert [m.spec.slice_axis for m in model.members] == ["axial", "coronal"]
    assert model.spec.postprocess == "largest_component"
    assert file_digest(out / "run-axial" / "weights.safetensors") == file_digest(a / "weights.safetensors")
    assert model.spec.provenance["trained"] is False  # untrained members
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left

    geometry = make_geometry((30, 36, 14), (0.9, 0.8, 2.5), direction=rotation((12.0, -7.0, 20.0)))
    scan = write_nifti(tmp_path / "oblique.nii.gz", phantom(geometry.shape), geometry)
    assert main(["segment", str(scan), "-o", str(tmp_path / "seg"), "--model", str(out)]) == 0
    assert read_scan(tmp_path / "seg" / "oblique.nii.gz").geometry.mismatch(geometry) is None


def test_half_stores_float16_copies_and_leaves_the_sources(tmp_path):
    a = _model(tmp_path / "a", "axial")
    b = _model(tmp_path / "b", "sagittal")
    build_ensemble({"a": a, "b": b}, tmp_path / "ens", half=True)
    before = (a / "weights.safetensors").stat().st_size
    assert (tmp_path / "ens" / "a" / "weights.safetensors").stat().st_size < 0.6 * before
    assert load_spec(a).weights_sha256 == file_digest(a / "weights.safetensors")
    load_model(tmp_path / "ens")


def test_members_with_other_labels_are_refused_and_nothing_is_written(tmp_path):
    a = _model(tmp_path / "a", "axial")
    b = _model(tmp_path / "b", "axial", labels=("background", "liver"))
    with pytest.raises(ModelError, match=rf"{tmp_path / 'b' / 'model.json'}: has other labels"):
        build_ensemble({"a": a, "b": b}, tmp_path / "ens")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_other_preset_nested_ensemble_and_existing_output_are_refused(tmp_path):
    a = _model(tmp_path / "a", "axial")
    b = _model(tmp_path / "b", "axial", preset="ct_abdomen")
    with pytest.raises(ModelError, match="another preset"):
        build_ensemble({"a": a, "b": b}, tmp_path / "ens")
    c = _model(tmp_path / "c", "sagittal")
    build_ensemble({"a": a, "c": c}, tmp_path / "ens")
    with pytest.raises(ModelError, match="already exists"):
        build_ensemble({"a": a, "c": c}, tmp_path / "ens")
    with pytest.raises(ModelError, match="is itself an ensemble"):
        build_ensemble({"a": a, "e": tmp_path / "ens"}, tmp_path / "ens2")
    with pytest.raises(ModelError, match="at least two"):
        build_ensemble({"a": a}, tmp_path / "ens3")
    build_ensemble({"c": c, "a": a}, tmp_path / "ens", overwrite=True)
    assert load_spec(tmp_path / "ens").members == ("c", "a")


def test_cli_reports_clashing_member_names(tmp_path, caplog):
    a = _model(tmp_path / "x" / "model", "axial")
    b = _model(tmp_path / "y" / "x", "coronal")
    assert main(["ensemble", str(a), str(b), "-o", str(tmp_path / "ens")]) == 2
    assert "member names must differ, got ['x', 'x']" in caplog.text
    assert main(["ensemble", str(a), str(b), "-o", str(tmp_path / "ens"), "--names", "ax,cor"]) == 0
    assert load_spec(tmp_path / "ens").members == ("ax", "cor")


def test_member_names_are_sanitised():
    assert member_name(Path("/runs/my run #3/model")) == "my_run_3"
    assert member_name(Path("/models/.hidden")) == "hidden"


@pytest.mark.realdata
def test_two_bundled_members_as_an_ensemble_on_real_scans(shared_data, tmp_path):
    bundled = default_model_dir()
    out = tmp_path / "sag-cor"
    members = [str(bundled / "sagittal-batchdice"), str(bundled / "coronal-batchdice")]
    assert main(["ensemble", *members, "-o", str(out)]) == 0
    provenance = load_spec(out).provenance
    assert provenance["trained"] is True and provenance["training_cases"] == 160  # shared by both members
    assert "validation_dice" not in provenance  # a member's own figure would mislead here
    model = load_model(out)
    manifest = json.loads(Path("data_manifests/hippocampus.json").read_text())
    scores = []
    for item in manifest["validation"][:8]:
        image = shared_data / "hippocampus" / "imagesTr" / Path(item["image"]).name
        ref = np.rint(read_scan(shared_data / "hippocampus" / "labelsTr" / Path(item["label"]).name).array[0])
        pred = np.rint(read_scan(segment_one(image, model, tmp_path / "seg")).array[0])
        scores.append([dice(pred.astype(int), ref.astype(int), v) for v in (1, 2)])
    assert np.mean(scores, axis=0).min() > 0.86, np.mean(scores, axis=0)
