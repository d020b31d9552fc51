"""Training throughput and quality: fp32 against bf16 autocast, same steps, same process.

Trains the hippocampus configuration (ArticleUNet, base 16, sagittal slices) from the same
seed for the same number of steps in each precision, then validates both on whole 3D
volumes through the segment path. Prints training slices per second, the ratio bf16/fp32
and the validation Dice of each. On CPUs without native bf16 (no AVX512-BF16 or AMX) bf16
is emulated and much slower: medseg's "auto" precision then trains in fp32.

    python benchmarks/training.py [--steps 150] [--validation-cases 10]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

from machine import cpu_line  # noqa: E402 (benchmarks/, beside this script)

from medseg.data.manifest import load_manifest  # noqa: E402
from medseg.training.config import TrainConfig  # noqa: E402
from medseg.training.trainer import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--validation-cases", type=int, default=10)
    parser.add_argument("--manifest", type=Path, default=ROOT / "data_manifests" / "hippocampus.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("monai").setLevel(logging.ERROR)

    base = TrainConfig.load(ROOT / "pipelines" / "configs" / "hippocampus.json")
    config = replace(base, epochs=1, steps_per_epoch=args.steps, warmup_epochs=0, val_every=1)
    print(cpu_line())  # every figure comes with the CPU that made it
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    print(f"CPU native bf16: {native}; {torch.get_num_threads()} threads; {args.steps} steps of {config.batch_size}")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "subset.json"
        raw = json.loads(args.manifest.read_text())
        raw["validation"] = raw["validation"][: args.validation_cases]
        base_dir = args.manifest.resolve().parent
        for split in ("training", "validation"):
            for item in raw[split]:
                item.update({k: str(base_dir / v) for k, v in item.items()})
        manifest.write_text(json.dumps(raw))
        load_manifest(manifest)
        results = {}
        for precision in ("fp32", "bf16"):
            t = time.perf_counter()
            result = train(
                replace(config, precision=precision),
                manifest,
                Path(tmp) / precision,
                show_progress=False,
            )
            rows = (Path(tmp) / precision / "log.csv").read_text().splitlines()
            header, last = rows[0].split(","), rows[-1].split(",")
            speed = float(last[header.index("slices_per_s")])
            results[precision] = (speed, result.best_dice, time.perf_counter() - t)
    for precision, (speed, dice, seconds) in results.items():
        scores = ", ".join(f"{k} {v:.4f}" for k, v in dice.items())
        print(f"{precision}: {speed:7.1f} training slices/s   validation Dice {scores}   ({seconds:.0f} s)")
    print(f"bf16 / fp32 throughput: {results['bf16'][0] / results['fp32'][0]:.2f}x")


if __name__ == "__main__":
    main()
