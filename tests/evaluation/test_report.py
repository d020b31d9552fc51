"""medseg evaluate: per-case metrics, summaries, and every problem reported for its case."""

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import write_msd_dataset

from medseg.cli import main
from medseg.data.manifest import build_manifest


def test_evaluate_reports_metrics_and_problems(tmp_path):
    write_msd_dataset(tmp_path / "Task99", n_cases=6)
    manifest = tmp_path / "m.json"
    build_manifest(tmp_path / "Task99", manifest, val_fraction=0.5, seed=0)
    cases = [item["label"] for item in json.loads(manifest.read_text())["validation"]]
    labels = [(manifest.parent / c).resolve() for c in cases]
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy(labels[0], pred / labels[0].name)  # perfect prediction
    img = nib.load(str(labels[1]))  # wrong grid: shifted origin
    affine = img.affine.copy()
    affine[0, 3] += 3
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), str(pred / labels[1].name))
    # labels[2]: no prediction at all

    out = tmp_path / "report"
    code = main(["evaluate", "--pred", str(pred), "--manifest", str(manifest), "-o", str(out)])
    assert code == 3
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert {r["label"] for r in rows} == {"left", "right"}
    assert all(float(r["dice"]) == 1.0 and float(r["hd95_mm"]) == 0.0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    problems = "\n".join(summary["problems"])
    assert "on another grid" in problems and labels[1].name.split(".")[0] in problems
    assert "is missing" in problems and labels[2].name.split(".")[0] in problems
    assert summary["labels"]["left"]["dice_mean"] == 1.0
    assert (out / "dice_boxplot.png").stat().st_size > 1000
    assert "| left | 1 | 1.0000" in (out / "summary.md").read_text()


def test_unexpected_label_values_are_reported(tmp_path):
    write_msd_dataset(tmp_path / "Task99", n_cases=2)
    manifest = tmp_path / "m.json"
    build_manifest(tmp_path / "Task99", manifest, val_fraction=0.5, seed=0)
    label = (manifest.parent / json.loads(manifest.read_text())["validation"][0]["label"]).resolve()
    img = nib.load(str(label))
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 9
    (tmp_path / "pred").mkdir()
    nib.save(nib.Nifti1Image(data, img.affine), str(tmp_path / "pred" / label.name))
    code = main(["evaluate", "--pred", str(tmp_path / "pred"), "--manifest", str(manifest), "-o", str(tmp_path / "r")])
    assert code == 3
    assert "label values [9]" in json.loads((tmp_path / "r" / "summary.json").read_text())["problems"][0]


def test_evaluate_with_a_model_segments_the_split_first(tmp_path, tiny_model_dir):
    write_msd_dataset(tmp_path / "Task99", n_cases=6)
    manifest = tmp_path / "m.json"
    build_manifest(tmp_path / "Task99", manifest, val_fraction=0.5, seed=0)
    images = [(manifest.parent / item["image"]).resolve() for item in json.loads(manifest.read_text())["validation"]]
    images[1].write_bytes(b"not a nifti")  # this case's segmentation fails
    out = tmp_path / "report"
    stale = out / "predictions" / images[1].name  # an earlier run's prediction must not be scored
    stale.parent.mkdir(parents=True)
    shutil.copy(images[0], stale)

    code = main(["evaluate", "--model", str(tiny_model_dir), "--manifest", str(manifest), "-o", str(out)])
    assert code == 3
    predictions = sorted(p.name for p in (out / "predictions").glob("*.nii.gz"))
    assert predictions == sorted(image.name for image in images)
    # The stale file is left alone (medseg did not write it) but never scored: the run
    # report says this case failed, and evaluate goes by the report.
    assert stale.read_bytes() == images[0].read_bytes()
    for image in (images[0], images[2]):
        pred = nib.load(str(out / "predictions" / image.name))
        np.testing.assert_allclose(pred.affine, nib.load(str(image)).affine, atol=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    (problem,) = summary["problems"]
    assert problem.startswith(
        f"case {images[1].name.split('.')[0]}: segmentation failed at read: ScanError: {images[1]}"
    )
    assert "re-copy" in problem  # the hint, once
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 4  # two cases x two labels


@pytest.mark.realdata
def test_evaluate_with_the_bundled_model_on_real_scans(shared_data, tmp_path):
    from medseg.bundled import default_model_dir

    full = json.loads(Path("data_manifests/hippocampus.json").read_text())
    root = shared_data / "hippocampus"
    manifest = tmp_path / "five.json"
    manifest.write_text(
        json.dumps(
            {
                "name": full["name"],
                "labels": full["labels"],
                "modality": full["modality"],
                "training": [],
                "validation": [
                    {
                        "image": str(root / "imagesTr" / Path(c["image"]).name),
                        "label": str(root / "labelsTr" / Path(c["label"]).name),
                    }
                    for c in full["validation"][:5]
                ],
            }
        )
    )
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(default_model_dir()), "--manifest", str(manifest), "-o", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == []
    dice = {k.lower(): v["dice_mean"] for k, v in summary["labels"].items()}
    assert dice["anterior"] > 0.85 and dice["posterior"] > 0.85, dice


def test_a_prediction_of_a_scan_changed_since_is_stale(tmp_path, tiny_model_dir):
    write_msd_dataset(tmp_path / "Task99", n_cases=4)
    manifest = tmp_path / "m.json"
    build_manifest(tmp_path / "Task99", manifest, val_fraction=0.5, seed=0)
    out = tmp_path / "report"
    args = ["evaluate", "--model", str(tiny_model_dir), "--manifest", str(manifest), "-o", str(out)]
    assert main(args) == 0
    image = (manifest.parent / json.loads(manifest.read_text())["validation"][0]["image"]).resolve()
    img = nib.load(str(image))
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), str(image))  # rescanned since
    pred = ["evaluate", "--pred", str(out / "predictions"), "--manifest", str(manifest), "-o", str(tmp_path / "r2")]
    assert main(pred) == 3
    (problem,) = json.loads((tmp_path / "r2" / "summary.json").read_text())["problems"]
    assert "changed after it was segmented" in problem and "stale" in problem
    assert main(args) == 0  # --model segments the changed scan again (resume sees the change)


def test_evaluate_refuses_a_missing_prediction_folder_and_bad_tolerance(tmp_path, caplog, capsys):
    write_msd_dataset(tmp_path / "Task99", n_cases=2)
    manifest = tmp_path / "m.json"
    build_manifest(tmp_path / "Task99", manifest, val_fraction=0.5, seed=0)
    args = ["evaluate", "--manifest", str(manifest), "-o", str(tmp_path / "r")]
    assert main([*args, "--pred", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: is not a folder of predictions" in caplog.text
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--pred", str(tmp_path), "--tolerance-mm", "-1"])
    assert exit_.value.code == 2 and "must be a positive number" in capsys.readouterr().err
