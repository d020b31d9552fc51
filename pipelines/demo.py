"""`make demo`: segment real example scans with the bundled model; print outputs and Dice.

Scans: the hippocampus DICOM crop series in ../shared/data/dicom_mr_studies and a few
validation volumes of data_manifests/hippocampus.json (never seen in training), whose Dice
against their manual labels is printed. Where ../shared/data is absent, the public MSD
Task04 archive is fetched into ~/.cache/medseg (checksum checked) and a few of its volumes
are used instead.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WORK = ROOT / ".demo"
CACHE = Path.home() / ".cache" / "medseg"
N_VALIDATION = 4


def example_scans() -> list[tuple[Path, Path | None]]:
    """(scan, label or None) pairs to segment."""
    if SHARED.is_dir():
        pairs: list[tuple[Path, Path | None]] = [
            (p, None) for p in sorted(SHARED.glob("dicom_mr_studies/Study*/*HCropVolume"))
        ]
        manifest = ROOT / "data_manifests" / "hippocampus.json"
        for item in json.loads(manifest.read_text())["validation"][:N_VALIDATION]:
            pairs.append(((manifest.parent / item["image"]).resolve(), (manifest.parent / item["label"]).resolve()))
        return pairs
    from medseg.data.download import fetch_task04

    print(f"{SHARED} is absent: fetching MSD Task04 (hippocampus) into {CACHE}")
    folder = fetch_task04(CACHE)
    images = sorted((folder / "imagesTr").glob("hippocampus_*.nii.gz"))[-N_VALIDATION:]
    return [(p, folder / "labelsTr" / p.name) for p in images]


def main() -> int:
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("monai").setLevel(logging.ERROR)
    import numpy as np
    from tqdm import tqdm

    from medseg.bundled import default_model_dir
    from medseg.errors import MedsegError
    from medseg.evaluation.metrics import dice
    from medseg.inference import make_predictor, segment_scan
    from medseg.io.readers import read_scan
    from medseg.model import load_model

    try:
        pairs = example_scans()
    except MedsegError as err:
        print(f"cannot get example scans: {err}")
        return 2
    model = load_model(default_model_dir())
    trained = model.spec.provenance.get("trained", False)
    print(f"model: {model.folder} ({model.spec.name}, {'trained' if trained else 'UNTRAINED'})")
    predictor = make_predictor(model)
    out_dir = WORK / "output"
    failures = 0
    lines = []
    for scan, label in tqdm(pairs, desc="segmenting", unit="scan"):
        try:
            result = segment_scan(scan, predictor, out_dir)
        except MedsegError as err:
            failures += 1
            tqdm.write(f"FAILED {err}")
            continue
        g = result.geometry
        line = f"{result.output}  <- {scan}  {'x'.join(map(str, g.shape))}  {result.seconds:.2f} s"
        if label is not None:
            pred = np.rint(read_scan(result.output).array[0]).astype(int)
            ref = np.rint(read_scan(label).array[0]).astype(int)
            scores = [f"{lab.name} {dice(pred, ref, lab.value):.3f}" for lab in model.spec.labels[1:]]
            line += "  Dice " + ", ".join(scores)
        lines.append(line)
    print("\n".join(lines))
    print(f"{len(lines)} scan(s) segmented into {out_dir}, {failures} failed")
    return 0 if failures == 0 else 3


if __name__ == "__main__":
    sys.exit(main())
