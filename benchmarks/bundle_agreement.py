"""The bundled model's MONAI bundle against `medseg segment` on the 40 validation cases.

Runs ``python -m monai.bundle run --config_file pipelines/bundles/hippocampus_mr/configs/inference.json``
and ``medseg segment`` (the bundled model folder) over the validation images of
``data_manifests/hippocampus.json``, each as its own process, and compares the masks voxel by
voxel (and the affines). Prints identical cases, voxel agreement, Dice of each against the
manual labels, and the seconds of each run.

    python benchmarks/bundle_agreement.py [--cases 40]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_line  # noqa: E402 (benchmarks/, beside this script)

from medseg.evaluation.metrics import dice  # noqa: E402
from medseg.export.bundle import export_bundle  # noqa: E402

MANIFEST = ROOT / "data_manifests" / "hippocampus.json"


def _timed(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(args, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=40)
    args = parser.parse_args()
    cases = json.loads(MANIFEST.read_text())["validation"][: args.cases]
    print(cpu_line())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scans = tmp / "scans"
        scans.mkdir()
        labels = {}
        for case in cases:
            image = (MANIFEST.parent / case["image"]).resolve()
            (scans / image.name).symlink_to(image)
            labels[image.name.removesuffix(".nii.gz")] = (MANIFEST.parent / case["label"]).resolve()
        # The shipped bundle's configs with its weights written from the bundled model
        # (models/model.pt is derived, not committed).
        bundle = tmp / "bundle"
        export_bundle(ROOT / "models" / "hippocampus-mr", bundle)
        bundle_s = _timed(
            [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
             "--dataset_dir", str(scans), "--output_dir", str(tmp / "bundle")],
            bundle,
        )  # fmt: skip
        medseg_s = _timed(
            [sys.executable, "-m", "medseg", "segment", str(scans), "-o", str(tmp / "medseg"), "--formats", "nifti",
             "-q"],
            ROOT,
        )  # fmt: skip
        identical, agree, voxels, worst_affine = 0, 0, 0, 0.0
        scores = {"bundle": [], "medseg": []}
        for name, label_path in sorted(labels.items()):
            a_img = nib.load(tmp / "bundle" / f"{name}_seg.nii.gz")
            b_img = nib.load(tmp / "medseg" / f"{name}.nii.gz")
            a, b = np.asarray(a_img.dataobj), np.asarray(b_img.dataobj)
            truth = np.asarray(nib.load(label_path).dataobj).round()
            identical += int(np.array_equal(a, b))
            agree, voxels = agree + int((a == b).sum()), voxels + a.size
            worst_affine = max(worst_affine, float(np.abs(a_img.affine - b_img.affine).max()))
            scores["bundle"].append([dice(a, truth, v) for v in (1, 2)])
            scores["medseg"].append([dice(b, truth, v) for v in (1, 2)])
    print(f"{len(labels)} validation cases: {identical} identical masks; voxel agreement {agree / voxels:.6%}; "
          f"largest affine difference {worst_affine:g}")  # fmt: skip
    for who in ("bundle", "medseg"):
        mean = np.mean(scores[who], axis=0)
        print(f"  {who:7s} Dice anterior {mean[0]:.4f}, posterior {mean[1]:.4f}")
    print(f"  seconds (whole process): monai.bundle run {bundle_s:.1f}, medseg segment {medseg_s:.1f}")


if __name__ == "__main__":
    main()
