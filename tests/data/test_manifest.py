"""Manifests: built from MSD folders, split by subject, validated with every problem named."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from helpers import make_geometry, phantom, write_msd_dataset, write_nifti
from monai.data import load_decathlon_datalist

from medseg.cli import main
from medseg.data.manifest import ManifestError, build_manifest, load_manifest
from medseg.errors import ConfigError, FileProblem
from medseg.spec import split_label_names


@pytest.fixture
def msd(tmp_path):
    return write_msd_dataset(tmp_path / "Task99_Blobs", n_cases=10)


def test_build_split_by_subject_and_readable_by_monai(msd, tmp_path):
    out = tmp_path / "manifests" / "blobs.json"
    assert main(["manifest", str(msd), "-o", str(out), "--val-fraction", "0.3", "--seed", "1"]) == 0
    manifest = load_manifest(out)
    train = {c.id for c in manifest.cases("training")}
    val = {c.id for c in manifest.cases("validation")}
    assert len(train) == 7 and len(val) == 3 and not train & val
    assert manifest.labels == {0: "background", 1: "left", 2: "right"}
    # MONAI reads the same file and resolves the same paths (relative to the manifest).
    monai_list = load_decathlon_datalist(str(out), data_list_key="validation")
    monai_paths = sorted(os.path.normpath(m["image"]) for m in monai_list)
    assert monai_paths == sorted(str(c.image) for c in manifest.cases("validation"))
    # The same seed gives the same split, wherever the manifest is written.
    again = tmp_path / "again.json"
    main(["manifest", str(msd), "-o", str(again), "--val-fraction", "0.3", "--seed", "1"])
    assert [c.image for c in load_manifest(again).cases("validation")] == [
        c.image for c in manifest.cases("validation")
    ]


def test_all_problems_reported_at_once(msd, tmp_path):
    out = tmp_path / "m.json"
    main(["manifest", str(msd), "-o", str(out)])
    content = json.loads(out.read_text())
    content["training"].append(dict(content["training"][0]))  # duplicate case
    (msd / "imagesTr" / "case_001.nii.gz").unlink()  # missing file
    bad = np.zeros((20, 24, 16), np.float32)
    bad[0, 0, 0] = 7  # undeclared label value
    nib.save(
        nib.Nifti1Image(bad, nib.load(str(msd / "labelsTr" / "case_002.nii.gz")).affine),
        str(msd / "labelsTr" / "case_002.nii.gz"),
    )
    nib.save(
        nib.Nifti1Image(np.zeros((20, 24, 15), np.float32), np.eye(4)),
        str(msd / "labelsTr" / "case_003.nii.gz"),
    )
    out.write_text(json.dumps(content))
    with pytest.raises(ManifestError) as info:
        load_manifest(out)
    text = str(info.value)
    assert "listed twice" in text
    assert "case case_001" in text and "is missing" in text
    assert ("case case_002" in text and "[7.0]" in text) or "[7]" in text
    assert "case case_003" in text and "shape" in text
    assert len(info.value.problems) == 4


def test_hippocampus_manifest_is_fixed(shared_data):
    manifest = load_manifest("data_manifests/hippocampus.json")
    assert len(manifest.cases("training")) == 160 and len(manifest.cases("validation")) == 40
    assert manifest.cases("validation")[0].image.is_file()


def _paired_folders(root, values=(1, 3), n_cases=4):
    """images/ + labels/ (no dataset.json): label maps holding 0 and ``values``."""
    shape = (8, 7, 5)
    geometry = make_geometry(shape)
    for folder in ("images", "labels"):
        (root / folder).mkdir(parents=True)
    for i in range(n_cases):
        label = np.zeros(shape, np.uint8)
        for k, value in enumerate(values):
            label[k + 1, 1:4, 1:3] = value
        write_nifti(root / "images" / f"s{i}.nii.gz", phantom(shape, seed=i), geometry)
        write_nifti(root / "labels" / f"s{i}.nii.gz", label, geometry)
    return root


def test_paired_folders_declare_the_label_values_their_files_hold(tmp_path):
    data = _paired_folders(tmp_path / "data")
    content = build_manifest(data, tmp_path / "m.json", val_fraction=0.25)
    assert content["labels"] == {"0": "background", "1": "label_1", "3": "label_3"}
    manifest = load_manifest(tmp_path / "m.json")
    assert manifest.labels == {0: "background", 1: "label_1", 3: "label_3"}
    assert len(manifest.cases("training")) == 3 and len(manifest.cases("validation")) == 1
    # Named labels: values 0, 1, 2, 3 in order, background first.
    names = ["background", "a", "b", "c"]
    build_manifest(data, tmp_path / "named.json", labels=names)
    assert load_manifest(tmp_path / "named.json").labels == dict(enumerate(names))


def test_a_manifest_that_fails_its_check_is_never_written(tmp_path):
    data = _paired_folders(tmp_path / "data")
    out = tmp_path / "m.json"
    with pytest.raises(ManifestError) as info:
        build_manifest(data, out, labels=["background", "a"])  # the files also hold 3
    assert "label values [3] are not among the declared labels [0, 1]" in str(info.value)
    assert "nothing was written" in str(info.value) and len(info.value.problems) == 4
    assert not out.exists() and list(tmp_path.iterdir()) == [data]  # no temporary file left
    msd = write_msd_dataset(tmp_path / "Task99", n_cases=3)
    meta = json.loads((msd / "dataset.json").read_text())
    (msd / "dataset.json").write_text(json.dumps({**meta, "labels": {"0": "background", "1": "left"}}))
    with pytest.raises(ManifestError, match=r"label values \[2"):
        build_manifest(msd, out)
    assert not out.exists()


def test_an_existing_manifest_is_replaced_only_when_asked(tmp_path):
    data = _paired_folders(tmp_path / "data")
    out = tmp_path / "m.json"
    out.write_text("{}")
    with pytest.raises(FileProblem, match=r"already exists.*--overwrite") as info:
        build_manifest(data, out)
    assert info.value.path == out and out.read_text() == "{}"
    build_manifest(data, out, overwrite=True)
    assert load_manifest(out).labels == {0: "background", 1: "label_1", 3: "label_3"}


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ([], "at least one name"),
        (["background", "a\nb"], "holds a newline"),
        (["background", "x" * 65], "at most 64"),
        (["background", "a", "a"], "must be unique"),
    ],
)
def test_bad_label_names_are_refused(tmp_path, names, message):
    data = _paired_folders(tmp_path / "data")
    with pytest.raises(ConfigError, match=message):
        build_manifest(data, tmp_path / "m.json", labels=names)
    assert not (tmp_path / "m.json").exists()


def test_label_names_from_the_command_line():
    assert split_label_names(" background, left ,right,") == ("background", "left", "right")


def test_broken_manifest_content_is_reported_not_raised(tmp_path):
    path = tmp_path / "m.json"
    raw = {"labels": {"zero": "background", "1": "a\nb"}, "training": [{"label": "x.nii.gz"}, 3]}
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    text = str(info.value)
    assert "key 'zero' is not a label value" in text and 'training[0]: needs an "image" path' in text
    assert "labels: name of 1 'a\\nb' holds a newline" in text
    assert "training[1]" in text
    path.write_text("[" * 100_000)
    with pytest.raises(ManifestError, match="cannot be read as JSON"):
        load_manifest(path)
