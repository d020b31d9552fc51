"""The committed recipe of the bundled model: its configs load, and the shipped folder is what it trains."""

import importlib.util
import sys
from pathlib import Path

import pytest

from medseg.bundled import default_model_dir
from medseg.model import load_spec
from medseg.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def _recipe():
    spec = importlib.util.spec_from_file_location("train_bundled", ROOT / "pipelines" / "train_bundled.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_bundled"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", sorted((ROOT / "pipelines" / "configs").glob("*.json")), ids=lambda p: p.name)
def test_committed_configs_load(path):
    # A typo here would otherwise surface only when the one-command reproduction reaches it.
    config = TrainConfig.load(path)
    assert config.labels == ("background", "anterior", "posterior")


def test_shipped_members_are_the_recipe_members():
    recipe = _recipe()
    shipped = load_spec(default_model_dir())
    assert shipped.members == tuple(run.name for run in recipe.MEMBERS)
    for run in recipe.MEMBERS:
        config = TrainConfig.load(recipe.CONFIGS / run.config)
        member = load_spec(default_model_dir() / run.name)
        assert (member.slice_axis, member.window, member.context_slices) == (
            config.slice_axis,
            config.window,
            config.context_slices,
        ), run.name
