"""A bundled model's recipe as data: which runs train it, which are compared, and the card's prose.

A recipe file (e.g. ``pipelines/configs/hippocampus-recipe.json``) names the training runs of
a shipped model: the first single network, the ensemble's members (in the shipped order) and
the comparison runs, each with its training configuration. It also holds what no model file
can: the dataset's licence, how the split was made, the model's limits, the Dice goal and what
helped reach it. ``pipelines/train_bundled.py`` trains from it; ``medseg.evaluation.card``
writes the model card from it and the installed model folder. Paths in a recipe are relative
to the repository root, as a model's ``provenance.manifest`` is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError
from medseg.spec import reject_unknown_keys


@dataclass(frozen=True)
class Run:
    """One training run: ``name`` (its sub-folder in a shipped ensemble and its key in
    ``validation.json``), its configuration file, its folder under the runs folder and the
    description the card's table gives it. ``network`` overrides the configuration's network
    (to train another architecture with the same configuration). ``note`` is a sentence the card
    adds below the validation table when this run's figures are on it."""

    name: str
    config: str
    folder: str
    description: str
    network: str | None = None
    note: str = ""


@dataclass(frozen=True)
class CardText:
    """The card's prose that no model file holds, one paragraph per field (Markdown)."""

    summary: str
    data: str
    split: str
    training: str
    selection: str
    timing: str
    shipping: str
    hardware: str
    limits: str
    findings: str
    reproduce: str


@dataclass(frozen=True)
class Recipe:
    """What trains a bundled model and what its card says beyond the model files.

    ``goal`` maps label names to the mean validation Dice the shipped model must reach.
    ``manifest`` and ``target`` are the dataset manifest and the installed model folder.
    """

    manifest: str
    target: str
    first: Run
    members: tuple[Run, ...]
    comparisons: tuple[Run, ...]
    goal: dict[str, float]
    card: CardText

    def __post_init__(self) -> None:
        names = [run.name for run in self.runs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"recipe run names must differ; repeated: {duplicates}")
        if not all(0.0 <= v <= 1.0 for v in self.goal.values()):
            raise ConfigError(f"recipe goal Dice values must lie in 0..1, got {self.goal}")

    @property
    def runs(self) -> tuple[Run, ...]:
        """Every run, in the order they train: first, members, comparisons."""
        return (self.first, *self.members, *self.comparisons)

    def run(self, name: str) -> Run | None:
        """The run called ``name``, or None."""
        return next((run for run in self.runs if run.name == name), None)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> Recipe:
        """Build from parsed JSON, rejecting unknown keys (a typo must not pass silently)."""
        data = dict(data)
        reject_unknown_keys(cls, data, where)
        card = dict(data.pop("card", {}))
        reject_unknown_keys(CardText, card, f"{where} 'card'")
        try:
            first = _run(data.pop("first"), f"{where} 'first'")
            members = tuple(_run(item, f"{where} 'members'") for item in data.pop("members"))
            comparisons = tuple(_run(item, f"{where} 'comparisons'") for item in data.pop("comparisons", []))
            goal = {str(k): float(v) for k, v in data.pop("goal").items()}
            return cls(first=first, members=members, comparisons=comparisons, goal=goal, card=CardText(**card), **data)
        except KeyError as err:
            raise ConfigError(f"{where}: missing key {err}") from err
        except TypeError as err:  # a missing field of a dataclass
            raise ConfigError(f"{where}: {err}") from err

    @classmethod
    def load(cls, path: Path) -> Recipe:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as err:  # ValueError: not JSON or not UTF-8
            raise ConfigError(f"{path}: cannot be read as JSON ({type(err).__name__}: {err})") from err
        return cls.from_dict(data, where=str(path))


def _run(item: dict[str, Any], where: str) -> Run:
    reject_unknown_keys(Run, item, f"{where} entry")
    return Run(**item)
