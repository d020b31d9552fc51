"""`make demo`: segment example scans with medseg and say where the outputs are.

Uses the real MR scans in ../shared/data (hippocampus DICOM crop series and MSD NIfTI
volumes). Until the bundled trained model lands (training issue), the model is a freshly
initialised ArticleUNet and its masks are meaningless: the demo shows the pipeline (reading,
orientation, normalisation, slice inference, writing back on each scan's grid) and says so.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WORK = ROOT / ".demo"


def example_scans() -> list[Path]:
    scans = sorted(SHARED.glob("dicom_mr_studies/Study*/*HCropVolume"))
    scans += sorted((SHARED / "hippocampus" / "imagesTr").glob("hippocampus_0*.nii.gz"))[:3]
    return scans


def synthetic_scan() -> Path:
    """A small MR-like phantom, for clones without ../shared/data."""
    import nibabel as nib
    import numpy as np

    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (36, 50, 35)], indexing="ij")
    image = 400.0 * ((x / 0.5) ** 2 + (y / 0.7) ** 2 + (z / 0.6) ** 2 < 1) + 50.0
    path = WORK / "scans" / "phantom.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), str(path))
    return path


def demo_model() -> Path:
    from medseg.model import SPEC_FILE, init_model
    from medseg.spec import ModelSpec, NetworkSpec, labels_from_names

    folder = WORK / "model-untrained"
    if not (folder / SPEC_FILE).is_file():
        spec = ModelSpec(
            labels=labels_from_names(["background", "anterior", "posterior"]),
            network=NetworkSpec(out_channels=3, base_channels=16),
            preset="mr",
            slice_axis="sagittal",
            window=(64, 64),
            name="demo-untrained",
        )
        init_model(folder, spec)
    return folder


def main() -> int:
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from tqdm import tqdm

    from medseg.errors import MedsegError
    from medseg.inference import SlicePredictor, segment_scan
    from medseg.model import load_model

    scans = example_scans() if SHARED.is_dir() else []
    if not scans:
        print(f"{SHARED} is absent: segmenting a synthetic phantom instead of real scans.")
        scans = [synthetic_scan()]
    model_dir = demo_model()
    print(
        f"model: {model_dir} (UNTRAINED ArticleUNet, freshly initialised: its masks are "
        "meaningless until the bundled trained model lands)"
    )
    predictor = SlicePredictor(load_model(model_dir))
    out_dir = WORK / "output"
    failures = 0
    results = []
    for scan in tqdm(scans, desc="segmenting", unit="scan"):
        try:
            results.append(segment_scan(scan, predictor, out_dir))
        except MedsegError as err:
            failures += 1
            tqdm.write(f"FAILED {err}")
    for r in results:
        g = r.geometry
        print(
            f"{r.output}  <- {r.source}  {g.shape[0]}x{g.shape[1]}x{g.shape[2]} "
            f"@ {'x'.join(f'{s:.3g}' for s in g.spacing)} mm  {r.seconds:.2f} s"
        )
    print(f"{len(results)} scan(s) segmented into {out_dir}, {failures} failed")
    return 0 if failures == 0 else 3


if __name__ == "__main__":
    sys.exit(main())
