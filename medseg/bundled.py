"""Models shipped with medseg (``models/`` beside the package in a checkout)."""

from __future__ import annotations

from pathlib import Path

from medseg.errors import ModelError

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
DEFAULT_MODEL = "hippocampus-mr"


def bundled_models() -> dict[str, Path]:
    """Name -> folder of every bundled model (folders holding a model.json)."""
    if not MODELS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(MODELS_DIR.iterdir()) if (p / "model.json").is_file()}


def default_model_dir() -> Path:
    models = bundled_models()
    if DEFAULT_MODEL not in models:
        raise ModelError(
            MODELS_DIR / DEFAULT_MODEL,
            "the bundled default model is not there",
            "pass --model MODEL_DIR (a folder from 'medseg train' or 'medseg init-model')",
        )
    return models[DEFAULT_MODEL]
