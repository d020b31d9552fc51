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


class _Bar:
    """Progress for the demo: a scan bar (medseg.RunProgress callbacks)."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(desc="segmenting", unit="scan")

    def run_started(self, scans: int) -> None:
        self.bar.reset(total=scans)

    def slices_done(self, done: int, total: int) -> None:
        pass

    def scan_done(self, record) -> None:
        self.bar.update()


def main() -> int:
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("monai").setLevel(logging.ERROR)
    logging.getLogger("highdicom").setLevel(logging.ERROR)
    import numpy as np

    import medseg
    from medseg.errors import MedsegError
    from medseg.evaluation.metrics import dice

    try:
        pairs = example_scans()
    except MedsegError as err:
        print(f"cannot get example scans: {err}")
        return 2
    labels = dict(pairs)
    out_dir = WORK / "output"
    # The main job in one call: discovery, the bundled model, outputs, resume and run report.
    bar = _Bar()
    report = medseg.segment([scan for scan, _ in pairs], out_dir, progress=bar)
    bar.bar.close()
    model = report.settings["model"]
    print(f"model: {model} (bundled default)")
    label_table = medseg.load_model(model).spec.labels[1:]
    for record in report.records:
        if record.status == "failed":
            print(f"FAILED {record.input}: {record.error} ({record.hint})")
            continue
        line = f"{record.outputs['nifti']}  <- {record.input}  {'x'.join(map(str, record.shape))}"
        line += f"  {record.seconds:.2f} s" if record.status == "ok" else "  (done before)"
        label = labels.get(Path(record.input))
        if label is not None:
            pred = np.rint(medseg.read_scan(record.outputs["nifti"]).array[0]).astype(int)
            ref = np.rint(medseg.read_scan(label).array[0]).astype(int)
            line += "  Dice " + ", ".join(f"{lab.name} {dice(pred, ref, lab.value):.3f}" for lab in label_table)
        print(line)
    print(report.summary_line())
    print(f"outputs and run report ({report.path.name}) in {out_dir}")
    return 3 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
