"""TorchScript and ONNX exports of a model folder against the PyTorch folder, on real scans.

Exports the model (default: the bundled hippocampus-mr ensemble) with ``medseg export``'s
library function, segments every case of a manifest split with the PyTorch folder and with
each export through ``medseg.segment`` (NIfTI output), and prints one row per format: export
seconds, segmentation seconds (all cases, one call), voxels whose label agrees with
PyTorch's, per-label Dice against PyTorch's labels (mean and lowest over cases), and mean
Dice against the manifest's reference labels (unchanged accuracy).

    python benchmarks/export_agreement.py [--manifest data_manifests/hippocampus.json]
        [--split validation] [--model MODEL_DIR] [--formats torchscript,onnx] [--repeats 1]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")

from machine import cpu_line  # noqa: E402 (benchmarks/, beside this script)
from validation import segment_labels, validation_set  # noqa: E402

from medseg.evaluation.metrics import dice  # noqa: E402
from medseg.export.networks import export_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=Path("data_manifests/hippocampus.json"))
    parser.add_argument("--split", default="validation")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--formats", default="torchscript,onnx")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of segmentation (formats take turns)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = validation_set(args.manifest, args.split, args.model)
    model, values, names, images, refs = data.model, data.values, data.names, data.images, data.refs

    import onnxruntime

    print(cpu_line())  # every figure comes with the CPU that made it
    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; {data.describe()} "
        f"({args.split} of {args.manifest})"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders, export_seconds = {"pytorch": model}, {"pytorch": None}
        for fmt in args.formats.split(","):
            start = time.perf_counter()
            export_model(model, tmp / fmt, fmt)
            export_seconds[fmt] = time.perf_counter() - start
            folders[fmt] = tmp / fmt
        segment_labels(images[:1], model, tmp / "warm-up")  # imports and thread pools, not timed
        # Formats take turns in each round, so a burst of load on a shared machine does not
        # fall on one format only; the best round counts.
        labels, seconds = {}, dict.fromkeys(folders, float("inf"))
        for round_ in range(args.repeats):
            for fmt, folder in folders.items():
                labels[fmt], took = segment_labels(images, folder, tmp / f"seg-{fmt}-{round_}")
                seconds[fmt] = min(seconds[fmt], took)
    reference = labels["pytorch"]
    rows = [(fmt, export_seconds[fmt], seconds[fmt], labels[fmt]) for fmt in folders]

    header = ["format", "export s", "segment s", "voxels agreeing with PyTorch"]
    header += [f"Dice vs PyTorch {names[v]} (mean / min)" for v in values]
    header += [f"Dice vs reference {names[v]}" for v in values]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    total = sum(v.size for v in reference.values())
    for fmt, exported, took, maps in rows:
        same = sum(int((maps[k] == reference[k]).sum()) for k in reference)
        cells = [fmt, "-" if exported is None else f"{exported:.1f}", f"{took:.1f}"]
        cells.append(f"{100 * same / total:.4f}% ({total - same} of {total} differ)")
        for v in values:
            scores = [dice(maps[k], reference[k], v) for k in reference]
            cells.append(f"{np.mean(scores):.6f} / {np.min(scores):.6f}")
        for v in values:
            cells.append(f"{np.mean([dice(maps[k], refs[k], v) for k in refs]):.4f}")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
