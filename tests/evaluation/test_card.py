"""The model card is written from the model folder, the measured figures and the recipe's prose."""

import json
from dataclasses import replace

import pytest

from medseg.errors import ConfigError
from medseg.evaluation.card import model_card
from medseg.model import init_model
from medseg.spec import ModelLayout, labels_from_names
from medseg.training.config import TrainConfig
from medseg.training.recipe import Recipe

PROSE = ("summary", "data", "split", "training", "selection", "timing", "shipping", "hardware", "limits", "findings")
RECIPE = Recipe.from_dict(
    {
        "manifest": "blobs.json",
        "target": "models/tiny",
        "first": {"name": "tiny-2d", "config": "tiny.json", "folder": "tiny", "description": "tiny 2D net"},
        "members": [],
        "comparisons": [
            {"name": "other", "config": "tiny.json", "folder": "o", "description": "other", "note": "OTHER NOTE."}
        ],
        "goal": {"left": 0.9, "right": 0.8},
        "card": {**{key: f"<{key}>" for key in PROSE}, "reproduce": "make tiny"},
    }
)


def _result(description, dice_left, dice_right, postprocess="none"):
    # Evaluation names labels as the manifest does, capitalised here: the card matches either case.
    summary = {
        name: {"dice_mean": d, "hd95_mm_mean": 1.25, "nsd_mean": 0.95, "cases": 2}
        for name, d in (("Left", dice_left), ("Right", dice_right))
    }
    return {
        "postprocess": postprocess,
        "description": description,
        "training_minutes": 1.5,
        "seconds_per_case": 0.25,
        "all": [{"postprocess": postprocess, "summary": summary}],
    }


@pytest.fixture
def model_dir(tmp_path):
    config = TrainConfig(labels=("background", "left", "right"), base_channels=4, depth=2, window=(16, 16), seed=3)
    spec = config.layout.to_spec(labels_from_names(list(config.labels)), name="tiny")
    provenance = {"config": config.to_dict(), "validation_run": "tiny-2d", "validation_cases": 2, "epoch": 4}
    init_model(tmp_path / "tiny", replace(spec, provenance=provenance))
    return tmp_path / "tiny"


def test_card_holds_the_figures_the_layout_and_the_prose(model_dir):
    validation = {"tiny-2d": _result("tiny 2D net", 0.95, 0.85), "other": _result("other", 0.5, 0.5)}
    card = model_card(model_dir, validation, RECIPE)
    assert card.startswith("# tiny\n\n<summary>\n")
    assert "| tiny 2D net | none (shipped) | 0.9500 | 0.8500 | 1.25 / 1.25 | 0.9500 / 0.9500 | 1.5 |" in card
    assert "| other | none | 0.5000 | 0.5000 |" in card
    assert "| `tiny` | ArticleUNet | 1 / 4 / 2 / 3 |" in card  # in / base / depth / out
    assert "| `tiny` | 30 x 200 x 32 | 0.002 | cosine, 1 warm-up epoch(s) | no | none | 3 | 4 |" in card
    assert "OTHER NOTE." in card
    assert "Goal: mean Dice >= 0.9 left and >= 0.8 right. Shipped: 0.9500 / 0.8500: met. <findings>" in card
    assert all(f"<{key}>" in card for key in PROSE)


def test_card_shows_reduced_precision_figures_when_measured(model_dir):
    validation = {"tiny-2d": _result("tiny 2D net", 0.95, 0.85)}
    assert "## Reduced precision" not in model_card(model_dir, validation, RECIPE)
    figures = {
        "cases": 2,
        "cpu": "CPU: test",
        "fp32_dice": [0.95, 0.85],
        "precisions": {
            "bf16": {
                "voxel_agreement": 0.99996,
                "identical_cases": 1,
                "dice": [0.95, 0.8499],
                "dice_change": [-0.0, -0.0001],
            }
        },
    }
    (model_dir / "precision.json").write_text(json.dumps(figures))
    card = model_card(model_dir, validation, RECIPE)
    assert "## Reduced precision" in card and "(CPU: test; fp32 Dice 0.9500 / 0.8500)" in card
    assert "| bf16 | 99.9960% | 1/2 | 0.9500 / 0.8499 | +0.0000 / -0.0001 |" in card


def test_card_says_when_the_goal_is_missed(model_dir):
    card = model_card(model_dir, {"tiny-2d": _result("tiny 2D net", 0.95, 0.75)}, RECIPE)
    assert "Shipped: 0.9500 / 0.7500: NOT met." in card
    assert "OTHER NOTE." not in card  # that run's figures are not on this card


def test_card_needs_the_shipped_runs_figures(model_dir):
    with pytest.raises(ConfigError, match="validation_run 'tiny-2d'"):
        model_card(model_dir, {"other": _result("other", 0.5, 0.5)}, RECIPE)


def test_layout_of_an_untrained_model_without_config(tmp_path):
    spec = ModelLayout(base_channels=4, depth=2, window=(16, 16)).to_spec(labels_from_names(["bg", "left", "right"]))
    init_model(tmp_path / "m", replace(spec, provenance={"validation_run": "tiny-2d"}))
    card = model_card(tmp_path / "m", {"tiny-2d": _result("tiny 2D net", 0.95, 0.85)}, RECIPE)
    assert "| `medseg-model` | - | - |" in card
    assert "No training configuration is recorded" in card
