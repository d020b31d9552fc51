"""The committed recipe of the bundled model: its configs load, the shipped folder is what it
trains, and the committed model card is the one generated from the folder and the recipe."""

import json
from pathlib import Path

import pytest

from medseg.bundled import default_model_dir
from medseg.errors import ConfigError
from medseg.evaluation.card import model_card
from medseg.model import load_spec
from medseg.training.config import TrainConfig
from medseg.training.recipe import Recipe

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "pipelines" / "configs"
RECIPE = CONFIGS / "hippocampus-recipe.json"


@pytest.fixture(scope="module")
def recipe():
    return Recipe.load(RECIPE)


@pytest.mark.parametrize(
    "path",
    sorted(p for p in CONFIGS.glob("*.json") if not p.name.endswith("-recipe.json")),
    ids=lambda p: p.name,
)
def test_committed_configs_load(path):
    # A typo here would otherwise surface only when the one-command reproduction reaches it.
    config = TrainConfig.load(path)
    assert config.labels == ("background", "anterior", "posterior")


def test_recipe_runs_name_committed_configs(recipe):
    for run in recipe.runs:
        assert (ROOT / run.config).is_file(), run.name
    assert (ROOT / recipe.manifest).is_file()
    assert ROOT / recipe.target == default_model_dir()


def test_shipped_members_are_the_recipe_members(recipe):
    shipped = load_spec(default_model_dir())
    assert shipped.members == tuple(run.name for run in recipe.members)
    for run in recipe.members:
        config = TrainConfig.load(ROOT / run.config)
        member = load_spec(default_model_dir() / run.name)
        assert (member.slice_axis, member.window, member.context_slices) == (
            config.slice_axis,
            config.window,
            config.context_slices,
        ), run.name
        # Through JSON so tuples and lists compare equal with the saved provenance.
        assert member.provenance["config"] == json.loads(json.dumps(config.to_dict())), run.name


def test_committed_model_card_is_the_generated_card(recipe):
    # Regenerate with: .venv/bin/python pipelines/train_bundled.py --card-only
    folder = default_model_dir()
    validation = json.loads((folder / "validation.json").read_text())
    assert (folder / "MODEL_CARD.md").read_text() == model_card(folder, validation, recipe)


def test_recipe_rejects_unknown_and_missing_keys():
    data = json.loads(RECIPE.read_text())
    with pytest.raises(ConfigError, match="unknown key"):
        Recipe.from_dict({**data, "memebers": []})
    with pytest.raises(ConfigError, match="'members' entry: unknown key"):
        Recipe.from_dict({**data, "members": [{**data["members"][0], "seed": 3}]})
    with pytest.raises(ConfigError, match="'card': unknown key"):
        Recipe.from_dict({**data, "card": {**data["card"], "licence": "CC0"}})
    with pytest.raises(ConfigError, match="missing key 'goal'"):
        Recipe.from_dict({k: v for k, v in data.items() if k != "goal"})
    with pytest.raises(ConfigError, match="repeated"):
        Recipe.from_dict({**data, "comparisons": [data["first"]]})
