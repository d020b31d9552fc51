"""Each inference engine against PyTorch fp32 on real scans: labels, Dice and run time.

Segments every case of a manifest split (default: the bundled model's 40 validation cases)
through ``medseg.segment`` (NIfTI output) once per engine and precision installed here, and
prints one row each: the run's seconds (all cases in one call, which loads the model and its
engines from a filled cache), voxels whose label agrees with torch fp32's, per-label Dice
against torch fp32's labels (mean and lowest over cases), mean Dice against the manifest's
reference labels and its change from torch fp32's, and whether the engine meets issue 12's
bound (voxel agreement >= 99.9% and |Dice change| <= 0.002 for every label).

    python benchmarks/engine_agreement.py [--manifest data_manifests/hippocampus.json]
        [--split validation] [--model MODEL_DIR] [--repeats 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")

from machine import cpu_line  # noqa: E402 (benchmarks/, beside this script)
from validation import segment_labels, validation_set  # noqa: E402

from medseg.evaluation.metrics import dice  # noqa: E402
from medseg.inference.engines import load_engine  # noqa: E402
from medseg.inference.options import cpu_has_native_bf16  # noqa: E402
from medseg.model import load_model  # noqa: E402

AGREEMENT_BOUND = 99.9  # percent of voxels
DICE_BOUND = 0.002


def runs() -> list[tuple[str, str]]:
    """(engine, precision) pairs to compare, torch fp32 (the reference) first."""
    native = cpu_has_native_bf16()
    pairs = [("torch", "fp32")] + ([("torch", "bf16")] if native else [])
    if importlib.util.find_spec("openvino"):
        pairs += [("openvino", "fp32")] + ([("openvino", "bf16")] if native else [])
    if importlib.util.find_spec("onnxruntime"):
        pairs.append(("onnxruntime", "fp32"))
    return [*pairs, ("auto", "auto")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=Path("data_manifests/hippocampus.json"))
    parser.add_argument("--split", default="validation")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of segmentation (engines take turns)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = validation_set(args.manifest, args.split, args.model)
    model, values, names, images, refs = data.model, data.values, data.names, data.images, data.refs

    print(cpu_line())  # every figure comes with the CPU that made it
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {data.describe()} "
        f"({args.split} of {args.manifest})"
    )
    pairs = runs()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["MEDSEG_CACHE_DIR"] = str(tmp / "cache")
        loaded = load_model(model)
        picked = load_engine(loaded.members[0] if loaded.members else loaded, torch.device("cpu"))
        print(f"--engine auto --precision auto runs {picked.name} {picked.precision} here")
        for engine, precision in pairs:  # conversions into the cache and warm-up, not timed
            options = {"device": "cpu", "engine": engine, "precision": precision}
            segment_labels(images[:1], model, tmp / f"warm-{engine}-{precision}", **options)
        labels, seconds = {}, dict.fromkeys(pairs, float("inf"))
        for round_ in range(args.repeats):
            for engine, precision in pairs:
                out = tmp / f"seg-{engine}-{precision}-{round_}"
                options = {"device": "cpu", "engine": engine, "precision": precision}
                labels[engine, precision], took = segment_labels(images, model, out, **options)
                seconds[engine, precision] = min(seconds[engine, precision], took)
    reference = labels["torch", "fp32"]
    reference_dice = {v: np.mean([dice(reference[k], refs[k], v) for k in refs]) for v in values}

    header = ["engine", "precision", "segment s", "voxels agreeing with torch fp32"]
    header += [f"Dice vs torch fp32 {names[v]} (mean / min)" for v in values]
    header += [f"Dice vs reference {names[v]} (change)" for v in values]
    header += ["within bound"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    total = sum(v.size for v in reference.values())
    for engine, precision in pairs:
        maps = labels[engine, precision]
        same = sum(int((maps[k] == reference[k]).sum()) for k in reference)
        agreement = 100 * same / total
        cells = [engine, precision, f"{seconds[engine, precision]:.1f}"]
        cells.append(f"{agreement:.4f}% ({total - same} of {total} differ)")
        for v in values:
            scores = [dice(maps[k], reference[k], v) for k in reference]
            cells.append(f"{np.mean(scores):.6f} / {np.min(scores):.6f}")
        changes = []
        for v in values:
            mean = np.mean([dice(maps[k], refs[k], v) for k in refs])
            changes.append(mean - reference_dice[v])
            cells.append(f"{mean:.4f} ({changes[-1]:+.5f})")
        ok = agreement >= AGREEMENT_BOUND and all(abs(c) <= DICE_BOUND for c in changes)
        cells.append("yes" if ok else "NO")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
