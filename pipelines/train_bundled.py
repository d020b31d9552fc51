"""Reproduce the bundled ``models/hippocampus-mr`` model and its model card, in one command.

    .venv/bin/python pipelines/train_bundled.py --compare --ensemble

The runs are data: ``pipelines/configs/hippocampus-recipe.json`` names the first network,
the ensemble's members and the comparison runs (each with its training configuration), and
holds the card's prose. This script:

1. trains the recipe's first network (ArticleUNet, ``pipelines/configs/hippocampus.json``) on
   the 160 training cases of ``data_manifests/hippocampus.json`` (``medseg train``; an
   interrupted run resumes);
2. ``--ensemble``: trains the recipe's members (2.5D and 2D sagittal, axial and coronal: all
   three slice axes, all with batch Dice) and averages their probabilities; the ensemble ships
   if it scores higher than the first network alone;
   ``--compare``: trains the recipe's first comparison for the card (MONAI's UNet with the same
   configuration and steps), ``--compare-time``: every comparison (also MONAI's UNet for the
   first network's wall-clock time);
3. segments the 40 validation cases through ``medseg segment``'s code path, with and
   without largest-component post-processing, and evaluates them (``medseg evaluate``);
4. installs the better variant as ``models/hippocampus-mr`` (float16 weights, to stay small),
   writes ``validation.json`` with the measured numbers and ``MODEL_CARD.md`` from the
   installed folder, those numbers and the recipe (``medseg.evaluation.card``).

``--card-only`` trains nothing: it rewrites ``MODEL_CARD.md`` from the installed folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from medseg.training.recipe import Recipe, Run

RECIPE = ROOT / "pipelines" / "configs" / "hippocampus-recipe.json"
ENSEMBLE = "ensemble"  # the ensemble's entry in validation.json


def train_run(run: Run, recipe: Recipe, runs: Path) -> Path:
    """Train (or resume, or just reload when finished) ``run``; its best model folder."""
    from medseg.training.config import TrainConfig
    from medseg.training.trainer import train

    config = TrainConfig.load(ROOT / run.config)
    if run.network:
        config = replace(config, network=run.network)
    return train(config, ROOT / recipe.manifest, runs / run.folder, resume=True).model_dir


def run_minutes(model_dir: Path) -> float:
    """Wall-clock minutes of the whole training run (all epochs and validations, across resumes)."""
    summary = json.loads((model_dir.parent / "summary.json").read_text())
    return round(summary["seconds"] / 60, 1)


def evaluate_variant(model_dir: Path, postprocess: str, work: Path, manifest: Path) -> dict:
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
    failures = predict_split(model, manifest, pred_dir)
    seconds = time.perf_counter() - start
    result = evaluate(pred_dir, manifest, work / f"report-{postprocess}", failures=failures)
    return {
        "postprocess": postprocess,
        "summary": result.summary,
        "problems": result.problems,
        "seconds_per_case": seconds / len(load_manifest(manifest, check=False).cases("validation")),
    }


def best_variant(model_dir: Path, work: Path, description: str, minutes: float, manifest: Path) -> dict:
    """Both post-processing variants of ``model_dir`` evaluated; the better one, with all in ``all``."""
    variants = [evaluate_variant(model_dir, p, work, manifest) for p in ("none", "largest_component")]
    for v in variants:
        v["mean_dice"] = sum(s["dice_mean"] for s in v["summary"].values()) / len(v["summary"])
    return max(variants, key=lambda v: v["mean_dice"]) | {
        "all": variants,
        "description": description,
        "training_minutes": minutes,
    }


def install(result: dict, run_name: str, members: dict[str, Path], target: Path) -> None:
    """Copy the chosen model (one folder, or the ensemble of ``members``) to ``target`` as
    float16; ``run_name`` is its entry in validation.json (the card reads its figures there)."""
    from medseg.model import build_ensemble, load_spec, store_half

    if len(members) > 1:
        build_ensemble(members, target, result["postprocess"], half=True, overwrite=True)
    else:
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(next(iter(members.values())), target)
        store_half(target)
    spec = load_spec(target)
    provenance = {
        # Where the members were trained is this machine's business; the recipe is the card's.
        **{k: v for k, v in spec.provenance.items() if k != "ensemble_of"},
        "recipe": "pipelines/train_bundled.py",
        # Evaluation names labels as the manifest does (MSD: "Anterior"); the model in lower case.
        "validation_dice": {k.lower(): round(v["dice_mean"], 4) for k, v in result["summary"].items()},
        "training_minutes": result["training_minutes"],
        "validation": f"{spec.provenance.get('validation_cases')} cases, MODEL_CARD.md",
        "validation_run": run_name,
    }
    spec = replace(spec, name=target.name, postprocess=result["postprocess"], provenance=provenance)
    spec.save(target / "model.json")


def write_card(target: Path, recipe: Recipe) -> str:
    """Write ``target/MODEL_CARD.md`` from the installed folder, its validation.json and ``recipe``."""
    from medseg.evaluation.card import model_card

    validation = json.loads((target / "validation.json").read_text())
    card = model_card(target, validation, recipe)
    (target / "MODEL_CARD.md").write_text(card)
    return card


def train_and_install(args: argparse.Namespace, recipe: Recipe) -> None:
    """Train the runs the options ask for, evaluate them, install the best and its figures."""
    comparisons = recipe.comparisons if args.compare_time else recipe.comparisons[:1] if args.compare else ()
    runs = [recipe.first, *(recipe.members if args.ensemble else ()), *comparisons]
    manifest = ROOT / recipe.manifest
    model_dirs = {run.name: train_run(run, recipe, args.runs) for run in runs}
    results = {
        run.name: best_variant(
            model_dirs[run.name],
            args.runs / run.folder / "eval",
            run.description,
            run_minutes(model_dirs[run.name]),
            manifest,
        )
        for run in runs
    }
    first = recipe.first.name
    candidates = [(first, {first: model_dirs[first]})]
    compared = {run.name: results.pop(run.name) for run in comparisons}
    if args.ensemble:
        from medseg.model import build_ensemble

        members = {run.name: model_dirs[run.name] for run in recipe.members}
        folder = args.runs / "hippocampus-ensemble"
        build_ensemble(members, folder, overwrite=True)
        minutes = round(sum(results[name]["training_minutes"] for name in members), 1)
        description = "ensemble of the " + ", ".join(members) + " networks"
        results[ENSEMBLE] = best_variant(
            folder, args.runs / "hippocampus-ensemble-eval", description, minutes, manifest
        )
        candidates.append((ENSEMBLE, members))
    results |= compared  # the card lists them last
    shipped, members = max(candidates, key=lambda c: results[c[0]]["mean_dice"])
    target = ROOT / recipe.target
    install(results[shipped], shipped, members, target)
    (target / "validation.json").write_text(json.dumps(results, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="the recipe JSON (runs and card prose)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs")
    parser.add_argument("--compare", action="store_true", help="also train the first comparison (MONAI's UNet)")
    parser.add_argument(
        "--compare-time", action="store_true", help="and every other comparison (same wall-clock: ~35 min more)"
    )
    parser.add_argument("--ensemble", action="store_true", help="also train the members; ship if better")
    parser.add_argument(
        "--card-only", action="store_true", help="train nothing: rewrite MODEL_CARD.md of the installed model"
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("monai").setLevel(logging.ERROR)

    from medseg.training.recipe import Recipe

    recipe = Recipe.load(args.recipe)
    target = ROOT / recipe.target
    if not args.card_only:
        train_and_install(args, recipe)
        print(f"installed {target}")
    card = write_card(target, recipe)
    print(f"wrote {target / 'MODEL_CARD.md'}")
    if not args.card_only:
        print(card)
    return 0


if __name__ == "__main__":
    sys.exit(main())
