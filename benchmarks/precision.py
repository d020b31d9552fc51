"""The bundled model in reduced precision against fp32, on its 40 validation cases.

Runs the bundled hippocampus model (an ensemble of four ArticleUNet members) with PyTorch in
fp32, bf16 and fp16 over the validation images of ``data_manifests/hippocampus.json`` (one
process, the same loaded model) and prints, for each reduced precision: voxel agreement
with fp32, cases whose masks are identical, mean Dice against the manual labels and its
change from fp32, and seconds (bf16 and fp16 are emulated, hence slow, on CPUs without them:
the point here is the agreement, which is what ``--precision auto`` relies on).

    python benchmarks/precision.py [--cases 40] [--precisions fp32,bf16,fp16] [--record] [--device cpu]

``--device cuda`` measures the same on a GPU (fp32 there is the GPU's own, the reference the
reduced precisions are compared with; its agreement with the CPU's fp32 is printed too).

``--record`` writes the figures to ``models/hippocampus-mr/precision.json``, which the model
card shows (``pipelines/train_bundled.py --card-only`` regenerates the card).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_line  # noqa: E402 (benchmarks/, beside this script)

from medseg.evaluation.metrics import dice  # noqa: E402
from medseg.inference.options import (  # noqa: E402
    InferenceOptions,
    cpu_has_native_bf16,
    resolve_device,
    resolve_precision,
)
from medseg.inference.predictor import make_predictor  # noqa: E402
from medseg.inference.segment import segment_volume  # noqa: E402
from medseg.io.readers import read_file  # noqa: E402
from medseg.model import load_model  # noqa: E402

MANIFEST = ROOT / "data_manifests" / "hippocampus.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    parser.add_argument("--record", action="store_true", help="write the model's precision.json")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    args = parser.parse_args()
    precisions = args.precisions.split(",")
    if precisions[0] != "fp32":
        precisions.insert(0, "fp32")
    cases = json.loads(MANIFEST.read_text())["validation"][: args.cases]
    print(cpu_line())
    device = resolve_device(args.device)
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    auto = resolve_precision("auto", device)
    print(f"native bf16 (CPU): {cpu_has_native_bf16()}; --precision auto on {device}: {auto}")
    model = load_model(ROOT / "models" / "hippocampus-mr")
    volumes = [read_file((MANIFEST.parent / c["image"]).resolve()) for c in cases]
    truths = [np.asarray(nib.load((MANIFEST.parent / c["label"]).resolve()).dataobj).round() for c in cases]
    masks: dict[str, list[np.ndarray]] = {}
    seconds: dict[str, float] = {}
    for precision in precisions:
        predictor = make_predictor(model, InferenceOptions(device=str(device), precision=precision, engine="torch"))
        start = time.perf_counter()
        masks[precision] = [segment_volume(v, predictor) for v in volumes]
        seconds[precision] = time.perf_counter() - start
    reference = masks["fp32"]
    if device.type == "cuda":  # the GPU's fp32 (cuDNN may use TF32) against the CPU's
        cpu_fp32 = make_predictor(model, InferenceOptions(device="cpu", precision="fp32", engine="torch"))
        agree = sum(int((segment_volume(v, cpu_fp32) == m).sum()) for v, m in zip(volumes, reference))
        print(f"{device} fp32 against CPU fp32: voxel agreement {agree / sum(m.size for m in reference):.4%}")
    ref_dice = np.mean([[dice(m, t, v) for v in (1, 2)] for m, t in zip(reference, truths)], axis=0)
    voxels = sum(m.size for m in reference)
    print(f"\n{len(cases)} validation cases, {voxels} voxels, bundled model (4 members), PyTorch engine on {device}")
    print(f"fp32: Dice anterior {ref_dice[0]:.4f}, posterior {ref_dice[1]:.4f}; {seconds['fp32']:.1f} s")
    record = {"cases": len(cases), "cpu": cpu_line(), "fp32_dice": [round(float(d), 4) for d in ref_dice]}
    record["precisions"] = {}
    for precision in precisions[1:]:
        agree = sum(int((a == b).sum()) for a, b in zip(masks[precision], reference))
        same = sum(int(np.array_equal(a, b)) for a, b in zip(masks[precision], reference))
        d = np.mean([[dice(m, t, v) for v in (1, 2)] for m, t in zip(masks[precision], truths)], axis=0)
        print(
            f"{precision}: voxel agreement with fp32 {agree / voxels:.4%} ({same}/{len(cases)} masks identical); "
            f"Dice anterior {d[0]:.4f} ({d[0] - ref_dice[0]:+.4f}), posterior {d[1]:.4f} ({d[1] - ref_dice[1]:+.4f}); "
            f"{seconds[precision]:.1f} s"
        )
        record["precisions"][precision] = {
            "voxel_agreement": agree / voxels,
            "identical_cases": same,
            "dice": [round(float(x), 4) for x in d],
            "dice_change": [round(float(x - r), 4) for x, r in zip(d, ref_dice)],
        }
    if args.record and device.type != "cpu":
        raise SystemExit("--record writes the CPU figures the model card shows; run it with --device cpu")
    if args.record:
        path = ROOT / "models" / "hippocampus-mr" / "precision.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
