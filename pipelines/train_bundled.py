"""Reproduce the bundled ``models/hippocampus-mr`` model and its model card, in one command.

    .venv/bin/python pipelines/train_bundled.py            # about 45 min per network here

1. trains ArticleUNet with ``pipelines/configs/hippocampus.json`` on the 160 training cases
   of ``data_manifests/hippocampus.json`` (``medseg train``; an interrupted run resumes);
2. trains MONAI's UNet with the same configuration and budget (``--compare``) for the card,
   and a 2.5D ArticleUNet member (``--ensemble``, ``hippocampus-context1.json``) whose
   probabilities are averaged with the first model's; the ensemble ships if it scores higher;
3. segments the 40 validation cases through ``medseg segment``'s code path, with and
   without largest-component post-processing, and evaluates them (``medseg evaluate``);
4. installs the better ArticleUNet variant as ``models/hippocampus-mr`` and writes
   ``MODEL_CARD.md`` from the measured numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import warnings
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "pipelines" / "configs" / "hippocampus.json"
CONFIG_CONTEXT = ROOT / "pipelines" / "configs" / "hippocampus-context1.json"
MANIFEST = ROOT / "data_manifests" / "hippocampus.json"
TARGET = ROOT / "models" / "hippocampus-mr"


def train_run(config_path: Path, run_dir: Path, network: str | None = None) -> Path:
    from medseg.training.config import TrainConfig
    from medseg.training.trainer import train

    config = TrainConfig.load(config_path)
    if network:
        config = replace(config, network=network)
    result = train(config, MANIFEST, run_dir, resume=True)
    return result.model_dir


def evaluate_variant(model_dir: Path, postprocess: str, work: Path) -> dict:
    """Segment the validation cases with ``model_dir`` (and ``postprocess``), evaluate."""
    from medseg.data.manifest import load_manifest
    from medseg.evaluation.report import evaluate
    from medseg.inference import make_predictor, segment_scan
    from medseg.model import load_model

    model = load_model(model_dir)
    model = replace(model, spec=replace(model.spec, postprocess=postprocess))
    predictor = make_predictor(model)
    pred_dir = work / f"pred-{postprocess}"
    seconds = 0.0
    cases = load_manifest(MANIFEST).cases("validation")
    for case in cases:
        seconds += segment_scan(case.image, predictor, pred_dir).seconds
    result = evaluate(pred_dir, MANIFEST, work / f"report-{postprocess}")
    return {
        "postprocess": postprocess,
        "summary": result.summary,
        "problems": result.problems,
        "seconds_per_case": seconds / len(cases),
    }


def best_variant(model_dir: Path, work: Path) -> dict:
    variants = [evaluate_variant(model_dir, p, work) for p in ("none", "largest_component")]

    def mean_dice(v: dict) -> float:
        return sum(s["dice_mean"] for s in v["summary"].values()) / len(v["summary"])

    for v in variants:
        v["mean_dice"] = mean_dice(v)
    return max(variants, key=lambda v: v["mean_dice"]) | {"all": variants}


def row(name: str, variant: dict, spec_provenance: dict) -> str:
    # Evaluation names labels as the manifest does (MSD: "Anterior", "Posterior").
    s = {k.lower(): v for k, v in variant["summary"].items()}
    return (
        f"| {name} | {variant['postprocess']} | "
        f"{s['anterior']['dice_mean']:.4f} | {s['posterior']['dice_mean']:.4f} | "
        f"{s['anterior']['hd95_mm_mean']:.2f} / {s['posterior']['hd95_mm_mean']:.2f} | "
        f"{s['anterior']['nsd_mean']:.4f} / {s['posterior']['nsd_mean']:.4f} | "
        f"{spec_provenance.get('training_minutes', '?')} |"
    )


def build_ensemble(members: dict[str, Path], folder: Path, postprocess: str) -> Path:
    """A model folder averaging ``members`` (name -> model folder), copied inside it."""
    from medseg.model import load_spec

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name, member in members.items():
        shutil.copytree(member, folder / name)
    first = load_spec(next(iter(members.values())))
    network = replace(first.network, in_channels=first.image_channels)
    spec = replace(
        first, network=network, context_slices=0, members=tuple(members), postprocess=postprocess, weights_sha256=None
    )
    spec.save(folder / "model.json")
    return folder


def model_card(
    article: dict, article_spec, monai: dict | None, monai_spec, ensemble: dict | None = None, ensemble_spec=None
) -> str:
    best = ensemble if ensemble is not None and ensemble["mean_dice"] > article["mean_dice"] else article
    shipped = {k.lower(): v for k, v in best["summary"].items()}
    ant, post = shipped["anterior"]["dice_mean"], shipped["posterior"]["dice_mean"]
    lines = [
        "# hippocampus-mr",
        "",
        "medseg's bundled model: the article's 2D U-Net (`ArticleUNet`, base 16 channels, depth 4,",
        "shipped alone or as the ensemble named in the table below;",
        f"{article_spec.network.in_channels} input channel, 3 outputs) segmenting the anterior and posterior",
        "hippocampus on T1-weighted MR crops, slice by slice along the sagittal axis (after RAS orientation).",
        "",
        "## Data and licence",
        "Medical Segmentation Decathlon Task04 (Vanderbilt hippocampus, 260 annotated MR crops; the",
        "200 in `../shared/data/hippocampus`), CC-BY-SA 4.0. Labels: 0 background, 1 anterior,",
        "2 posterior. The weights are a derivative of that data and carry its licence.",
        "",
        "## Split",
        "`data_manifests/hippocampus.json`: 160 training / 40 validation cases, one case per subject;",
        "seeded shuffle (numpy `default_rng(0)`) of the sorted case ids, the last 20% validation.",
        "Validation cases were never trained on; the best epoch was chosen on them, so these are",
        "validation (not held-out test) figures.",
        "",
        "## Configuration and reproduction",
        "`pipelines/configs/hippocampus.json` (MR preset: 0.5-99.5 percentile clip + z-score per volume;",
        "sagittal slices padded to 64x48; 67% of samples from slices with foreground; rotation +-15 deg,",
        "scale 0.85-1.15, gain/offset/gamma/noise, no flips since flipping the sagittal plane swaps",
        "anterior and posterior; Dice + CE, AdamW 2e-3, 1 warm-up epoch then cosine, 40 x 150 steps of 32).",
        "Reproduce with one command: `.venv/bin/python pipelines/train_bundled.py`.",
        "",
        "## Validation metrics (40 cases, 3D, on each case's original grid)",
        "",
        "| network | post-processing | Dice anterior | Dice posterior | HD95 mm (ant / post) "
        "| NSD@1mm (ant / post) | training min |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in article["all"]:
        lines.append(row("ArticleUNet (this model)", v, article_spec.provenance))
    if ensemble is not None:
        for v in ensemble["all"]:
            lines.append(
                row("ensemble: ArticleUNet 2D + ArticleUNet 2.5D (k=1, 25 epochs)", v, ensemble_spec.provenance)
            )
    if monai is not None:
        for v in monai["all"]:
            lines.append(row("MONAI UNet (BN, 2 res units)", v, monai_spec.provenance))
    if monai is not None:
        lines += [
            "",
            "Both networks ran the same pipeline, configuration and number of steps (40 x 150 x 32 slices);",
            "MONAI's UNet (1.6 M parameters against 2.4 M) takes about a third of the time per step here, so",
            "this is a same-steps comparison: a same-wall-clock run of MONAI's UNet is still to be measured.",
            "Training minutes include time the CPU was shared with other work during this session.",
        ]
    lines += [
        "",
        f"Shipped: {'the ensemble' if best is ensemble else 'the single ArticleUNet'}, post-processing "
        f"`{best['postprocess']}`. Inference: {best['seconds_per_case']:.2f} s per case on the CPU below, "
        "read to write.",
        "",
        "## Hardware and time",
        f"{platform.machine()} CPU, 2 cores, no GPU, PyTorch {__import__('torch').__version__}, fp32 "
        "(this CPU has no native bf16; emulated bf16 trained ~10x slower). Training minutes above are",
        "wall-clock on that machine, including validation every 2 epochs.",
        "",
        "## Limits",
        "Trained on crops around the hippocampus (about 35x50x40 mm at 1 mm): give it such crops",
        "(the DICOM `HCropVolume` series in `../shared/data/dicom_mr_studies` are of that kind),",
        "not whole-brain scans.",
        "",
        "## Against the goal",
        f"Goal: mean Dice >= 0.89 anterior and >= 0.87 posterior. Shipped: {ant:.4f} / {post:.4f}: "
        + (
            "met."
            if ant >= 0.89 and post >= 0.87
            else "NOT met yet: one 2D model plateaus below it here and averaging a 2.5D member gained about "
            "+0.005 / +0.004; the levers left are more members (other seeds, k=2 context, other slice axes) "
            "and augmentation aimed at the worst cases."
        ),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs")
    parser.add_argument("--compare", action="store_true", help="also train MONAI's UNet for the card")
    parser.add_argument("--ensemble", action="store_true", help="also train a 2.5D member; ship the ensemble if better")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("monai").setLevel(logging.ERROR)
    from medseg.model import load_spec

    article_dir = train_run(CONFIG, args.runs / "hippocampus-article")
    article = best_variant(article_dir, args.runs / "hippocampus-article" / "eval")
    monai, monai_spec = None, None
    if args.compare:
        monai_dir = train_run(CONFIG, args.runs / "hippocampus-monai-unet", network="MonaiUNet")
        monai = best_variant(monai_dir, args.runs / "hippocampus-monai-unet" / "eval")
        monai_spec = load_spec(monai_dir)

    ensemble, ensemble_dir = None, None
    if args.ensemble:
        context_dir = train_run(CONFIG_CONTEXT, args.runs / "hippocampus-context1")
        members = {"sagittal-2d": article_dir, "sagittal-context1": context_dir}
        ensemble_dir = build_ensemble(members, args.runs / "hippocampus-ensemble", "none")
        ensemble = best_variant(ensemble_dir, args.runs / "hippocampus-ensemble-eval")

    use_ensemble = ensemble is not None and ensemble["mean_dice"] > article["mean_dice"]
    if TARGET.exists():
        shutil.rmtree(TARGET)
    if use_ensemble:
        build_ensemble(
            {"sagittal-2d": article_dir, "sagittal-context1": args.runs / "hippocampus-context1" / "model"},
            TARGET,
            ensemble["postprocess"],
        )
        shipped, shipped_spec = ensemble, load_spec(TARGET)
    else:
        shutil.copytree(article_dir, TARGET)
        shipped, shipped_spec = article, load_spec(article_dir)
    measured = {k.lower(): round(v["dice_mean"], 4) for k, v in shipped["summary"].items()}
    provenance = {**shipped_spec.provenance, "validation_dice": measured, "validation": "40 cases, MODEL_CARD.md"}
    chosen = replace(shipped_spec, name="hippocampus-mr", postprocess=shipped["postprocess"], provenance=provenance)
    chosen.save(TARGET / "model.json")
    ensemble_spec = load_spec(ensemble_dir) if ensemble_dir else None
    card = model_card(article, load_spec(article_dir), monai, monai_spec, ensemble, ensemble_spec)
    (TARGET / "MODEL_CARD.md").write_text(card)
    results = {"article": article, "monai_unet": monai, "ensemble": ensemble}
    (TARGET / "validation.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"installed {TARGET}")
    print((TARGET / "MODEL_CARD.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
