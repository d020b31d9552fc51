"""Manifests: built from MSD folders, split by subject, validated with every problem named."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from helpers import write_msd_dataset
from monai.data import load_decathlon_datalist

from medseg.cli import main
from medseg.data.manifest import ManifestError, load_manifest


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
