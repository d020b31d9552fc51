"""Reproduce the bundled ``models/hippocampus-mr`` model and its model card, in one command.

    .venv/bin/python pipelines/train_bundled.py --compare --ensemble

1. trains ArticleUNet with ``pipelines/configs/hippocampus.json`` on the 160 training cases
   of ``data_manifests/hippocampus.json`` (``medseg train``; an interrupted run resumes);
2. ``--ensemble``: trains the four networks of ``MEMBERS`` (2.5D and 2D sagittal, axial and
   coronal: all three slice axes, all with batch Dice) and averages their probabilities; the ensemble
   ships if it scores higher than the first network alone;
   ``--compare``: trains MONAI's UNet with the same configuration for the card, for the same
   number of steps (and ``--compare-time``: for the same wall-clock time as the first network);
3. segments the 40 validation cases through ``medseg segment``'s code path, with and
   without largest-component post-processing, and evaluates them (``medseg evaluate``);
4. installs the better variant as ``models/hippocampus-mr`` (float16 weights, to stay small)
   and writes ``MODEL_CARD.md`` and ``validation.json`` from the measured numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = ROOT / "pipelines" / "configs"
MANIFEST = ROOT / "data_manifests" / "hippocampus.json"
TARGET = ROOT / "models" / "hippocampus-mr"


@dataclass(frozen=True)
class Run:
    """One training run: ``name`` inside the shipped ensemble, its config file in
    ``pipelines/configs``, its folder under ``--runs`` and what the card calls it."""

    name: str
    config: str
    folder: str
    description: str
    network: str | None = None


FIRST = Run("sagittal-2d", "hippocampus.json", "hippocampus-article", "ArticleUNet 2D, sagittal, 40 epochs, seed 0")
# Chosen on the validation cases among six 25-epoch runs (these four, and a 2.5D sagittal and
# an axial network trained without batch Dice, configs hippocampus-context1.json and
# hippocampus-axial.json): every set of four with the coronal member met the goal; these four
# scored best. All three views are in it, and four float16 members fit the 20 MB budget.
MEMBERS = (
    Run(
        "sagittal-context1-batchdice",
        "hippocampus-context1-batchdice.json",
        "hippocampus-context1-batchdice",
        "ArticleUNet 2.5D (one neighbouring slice each side as input channels), sagittal, Dice over the "
        "batch (`batch_dice`), 25 epochs, seed 7",
    ),
    Run(
        "sagittal-batchdice",
        "hippocampus-batchdice.json",
        "hippocampus-batchdice",
        "ArticleUNet 2D, sagittal, Dice over the batch, 25 epochs, seed 4",
    ),
    Run(
        "axial-batchdice",
        "hippocampus-axial-batchdice.json",
        "hippocampus-axial-batchdice",
        "ArticleUNet 2D, axial slices padded to 48x64, left-right flips (they keep anterior and posterior), "
        "Dice over the batch, 25 epochs, seed 5",
    ),
    Run(
        "coronal-batchdice",
        "hippocampus-coronal-batchdice.json",
        "hippocampus-coronal-batchdice",
        "ArticleUNet 2D, coronal slices padded to 48x48, left-right flips, Dice over the batch, 25 epochs, seed 6",
    ),
)
SAME_STEPS = Run("monai-unet", "hippocampus.json", "hippocampus-monai-unet", "MONAI UNet, same steps", "MonaiUNet")
COMPARISONS = (
    SAME_STEPS,
    Run(
        "monai-unet-time",
        "hippocampus-monai-time.json",
        "hippocampus-monai-unet-time",
        "MONAI UNet, same wall-clock (100 epochs)",
    ),
)


def train_run(run: Run, runs: Path) -> Path:
    """Train (or resume, or just reload when finished) ``run``; its best model folder."""
    from medseg.training.config import TrainConfig
    from medseg.training.trainer import train

    config = TrainConfig.load(CONFIGS / run.config)
    if run.network:
        config = replace(config, network=run.network)
    return train(config, MANIFEST, runs / run.folder, resume=True).model_dir


def run_minutes(model_dir: Path) -> float:
    """Wall-clock minutes of the whole training run (all epochs and validations, across resumes)."""
    summary = json.loads((model_dir.parent / "summary.json").read_text())
    return round(summary["seconds"] / 60, 1)


def evaluate_variant(model_dir: Path, postprocess: str, work: Path) -> dict:
    """Segment the validation cases with ``model_dir`` (and ``postprocess``), evaluate
    (what ``medseg evaluate --model`` does)."""
    import time

    from medseg.data.manifest import load_manifest
    from medseg.evaluation.predict import predict_split
    from medseg.evaluation.report import evaluate
    from medseg.model import load_model

    model = load_model(model_dir)
    model = replace(model, spec=replace(model.spec, postprocess=postprocess))
    pred_dir = work / f"pred-{postprocess}"
    start = time.perf_counter()
    failures = predict_split(model, MANIFEST, pred_dir)
    seconds = time.perf_counter() - start
    result = evaluate(pred_dir, MANIFEST, work / f"report-{postprocess}", failures=failures)
    return {
        "postprocess": postprocess,
        "summary": result.summary,
        "problems": result.problems,
        "seconds_per_case": seconds / len(load_manifest(MANIFEST, check=False).cases("validation")),
    }


def best_variant(model_dir: Path, work: Path, description: str, minutes: float) -> dict:
    """Both post-processing variants of ``model_dir`` evaluated; the better one, with all in ``all``."""
    variants = [evaluate_variant(model_dir, p, work) for p in ("none", "largest_component")]
    for v in variants:
        v["mean_dice"] = sum(s["dice_mean"] for s in v["summary"].values()) / len(v["summary"])
    return max(variants, key=lambda v: v["mean_dice"]) | {
        "all": variants,
        "description": description,
        "training_minutes": minutes,
    }


def dice_of(variant: dict) -> tuple[float, float]:
    # Evaluation names labels as the manifest does (MSD: "Anterior", "Posterior").
    s = {k.lower(): v for k, v in variant["summary"].items()}
    return s["anterior"]["dice_mean"], s["posterior"]["dice_mean"]


def rows(result: dict) -> list[str]:
    out = []
    for v in result["all"]:
        s = {k.lower(): x for k, x in v["summary"].items()}
        out.append(
            f"| {result['description']} | {v['postprocess']} | "
            f"{s['anterior']['dice_mean']:.4f} | {s['posterior']['dice_mean']:.4f} | "
            f"{s['anterior']['hd95_mm_mean']:.2f} / {s['posterior']['hd95_mm_mean']:.2f} | "
            f"{s['anterior']['nsd_mean']:.4f} / {s['posterior']['nsd_mean']:.4f} | "
            f"{result['training_minutes']} |"
        )
    return out


def model_card(shipped: dict, results: list[dict], same_time_note: str) -> str:
    ant, post = dice_of(shipped)
    lines = [
        "# hippocampus-mr",
        "",
        "medseg's bundled model: the article's 2D U-Net (`ArticleUNet`, base 16 channels, depth 4,",
        "3 outputs) segmenting the anterior and posterior hippocampus on T1-weighted MR crops, slice",
        "by slice (after RAS orientation). Shipped as: " + shipped["description"] + ".",
        "",
        "## Data and licence",
        "Medical Segmentation Decathlon Task04 (Vanderbilt hippocampus, 260 annotated MR crops; the",
        "200 in `../shared/data/hippocampus`), CC-BY-SA 4.0. Labels: 0 background, 1 anterior,",
        "2 posterior. The weights are a derivative of that data and carry its licence.",
        "",
        "## Split",
        "`data_manifests/hippocampus.json`: 160 training / 40 validation cases, one case per subject;",
        "seeded shuffle (numpy `default_rng(0)`) of the sorted case ids, the last 20% validation.",
        "Validation cases were never trained on; the best epoch of each run and the shipped variant",
        "were chosen on them, so these are validation (not held-out test) figures.",
        "",
        "## Configuration and reproduction",
        "`pipelines/configs/hippocampus.json` (MR preset: 0.5-99.5 percentile clip + z-score per volume;",
        "sagittal slices padded to 64x48; 67% of samples from slices with foreground; rotation +-15 deg,",
        "scale 0.85-1.15, gain/offset/gamma/noise, no flips since flipping the sagittal plane swaps",
        "anterior and posterior; Dice + CE, AdamW 2e-3, 1 warm-up epoch then cosine, 40 x 150 steps of 32).",
        "Ensemble members (each config differs from `hippocampus.json` only where its description says):",
        *(f"- `{run.name}`: `pipelines/configs/{run.config}`: {run.description}" for run in MEMBERS),
        "",
        "The ensemble averages the members' softmax probabilities on each scan's grid, each member",
        "slicing along its own axis (sagittal, axial, coronal: a multi-view ensemble). Reproduce everything",
        "with one command: `.venv/bin/python pipelines/train_bundled.py --compare --ensemble`.",
        "",
        "## Validation metrics (40 cases, 3D, on each case's original grid)",
        "",
        "| network | post-processing | Dice anterior | Dice posterior | HD95 mm (ant / post) "
        "| NSD@1mm (ant / post) | training min |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        lines += rows(result)
    lines += [
        "",
        "Training minutes are wall-clock for the whole run (every epoch and validation); an",
        "ensemble's are the sum of its members'. Some runs shared the CPU with evaluations for a",
        "few minutes, which those minutes include. " + same_time_note,
        "",
        f"Shipped: {shipped['description']}, post-processing `{shipped['postprocess']}`, weights stored",
        f"as float16 (validation Dice unchanged to 4 decimals). Inference: {shipped['seconds_per_case']:.2f} s",
        "per case on the CPU below, read to write.",
        "",
        "## Hardware and time",
        f"{platform.machine()} CPU, 2 cores, no GPU, PyTorch {__import__('torch').__version__}, fp32 "
        "(this CPU has no native bf16; emulated bf16 trained ~10x slower).",
        "",
        "## Limits",
        "Trained on crops around the hippocampus (about 35x50x40 mm at 1 mm): give it such crops",
        "(the DICOM `HCropVolume` series in `../shared/data/dicom_mr_studies` are of that kind),",
        "not whole-brain scans.",
        "",
        "## Against the goal",
        f"Goal: mean Dice >= 0.89 anterior and >= 0.87 posterior. Shipped: {ant:.4f} / {post:.4f}: "
        + ("met." if ant >= 0.89 and post >= 0.87 else "NOT met.")
        + " One 2D network plateaus below the goal here (table). What helped most: slicing along all"
        " three axes (the coronal member added the most), Dice over the batch, and averaging four"
        " networks. Measured and not kept: left-right flip test-time augmentation (on the previous ensemble: +0.0001 /"
        " -0.00002, noise), training without augmentation (worse); every ensemble tried is in"
        " `benchmarks/RESULTS.md`.",
    ]
    return "\n".join(lines) + "\n"


def same_time_note(results: dict[str, dict]) -> str:
    same_steps, same_time = results.get("monai-unet"), results.get("monai-unet-time")
    if same_steps is None:
        return ""
    note = (
        "MONAI's UNet (1.6 M parameters against 2.4 M) takes about 40% of the time per step here; "
        "it ran the same pipeline and configuration for the same steps"
    )
    if same_time is None:
        return note + "."
    return note + (
        " and, for 100 epochs, for about the wall-clock the first ArticleUNet needs on an idle CPU"
        " (40 epochs of about 50 s plus validation, 35-40 min; the minutes recorded for it include"
        " time it shared the CPU)."
    )


def install(result: dict, members: dict[str, Path]) -> None:
    """Copy the chosen model (one folder, or the ensemble of ``members``) to TARGET as float16."""
    from medseg.model import build_ensemble, load_spec, store_half

    if len(members) > 1:
        build_ensemble(members, TARGET, result["postprocess"], half=True, overwrite=True)
    else:
        if TARGET.exists():
            shutil.rmtree(TARGET)
        shutil.copytree(next(iter(members.values())), TARGET)
        store_half(TARGET)
    spec = load_spec(TARGET)
    a, p = dice_of(result)
    provenance = {
        # Where the members were trained is this machine's business; the recipe is the card's.
        **{k: v for k, v in spec.provenance.items() if k != "ensemble_of"},
        "recipe": "pipelines/train_bundled.py",
        "validation_dice": {"anterior": round(a, 4), "posterior": round(p, 4)},
        "training_minutes": result["training_minutes"],
        "validation": "40 cases, MODEL_CARD.md",
    }
    spec = replace(spec, name="hippocampus-mr", postprocess=result["postprocess"], provenance=provenance)
    spec.save(TARGET / "model.json")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs")
    parser.add_argument("--compare", action="store_true", help="also train MONAI's UNet (same steps) for the card")
    parser.add_argument(
        "--compare-time", action="store_true", help="and MONAI's UNet for the same wall-clock time (~35 min more)"
    )
    parser.add_argument("--ensemble", action="store_true", help="also train the other members; ship if better")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("monai").setLevel(logging.ERROR)

    compared = COMPARISONS if args.compare_time else (SAME_STEPS,) if args.compare else ()
    runs = [FIRST, *(MEMBERS if args.ensemble else ()), *compared]
    model_dirs = {run.name: train_run(run, args.runs) for run in runs}
    results = {
        run.name: best_variant(
            model_dirs[run.name], args.runs / run.folder / "eval", run.description, run_minutes(model_dirs[run.name])
        )
        for run in runs
    }
    candidates = [(results[FIRST.name], {FIRST.name: model_dirs[FIRST.name]})]
    comparisons = {run.name: results.pop(run.name) for run in runs if run in COMPARISONS}
    if args.ensemble:
        from medseg.model import build_ensemble

        members = {run.name: model_dirs[run.name] for run in MEMBERS}
        folder = args.runs / "hippocampus-ensemble"
        build_ensemble(members, folder, overwrite=True)
        minutes = round(sum(results[name]["training_minutes"] for name in members), 1)
        description = "ensemble of the " + ", ".join(run.name for run in MEMBERS) + " networks"
        results["ensemble"] = best_variant(folder, args.runs / "hippocampus-ensemble-eval", description, minutes)
        candidates.append((results["ensemble"], members))
    results |= comparisons  # the card lists them last
    shipped, members = max(candidates, key=lambda c: c[0]["mean_dice"])
    install(shipped, members)
    card = model_card(shipped, list(results.values()), same_time_note(results))
    (TARGET / "MODEL_CARD.md").write_text(card)
    (TARGET / "validation.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"installed {TARGET}")
    print(card)
    return 0


if __name__ == "__main__":
    sys.exit(main())
