"""ModelLayout: init-model and training turn a model layout into a ModelSpec the same way."""

from dataclasses import replace
from pathlib import Path

import pytest

from medseg.data.manifest import Manifest
from medseg.errors import ConfigError
from medseg.spec import ModelLayout, labels_from_names
from medseg.training.config import TrainConfig
from medseg.training.trainer import model_spec

LABELS = labels_from_names(["background", "left", "right"])
# Every field away from its default, so a field one path forgets shows up as a difference.
LAYOUT = {
    "network": "MonaiUNet",
    "base_channels": 8,
    "depth": 3,
    "preset": "ct_abdomen",
    "slice_axis": "coronal",
    "spacing": (0.8, 1.2),
    "window": (40, 24),
    "context_slices": 2,
}


def test_init_model_and_training_give_the_same_spec():
    init_path = ModelLayout(**LAYOUT).to_spec(LABELS, image_channels=2, name="blobs")
    training_path = TrainConfig(**LAYOUT, epochs=3, lr=0.1).layout.to_spec(LABELS, image_channels=2, name="blobs")
    assert init_path == training_path
    net = init_path.network
    assert (net.name, net.base_channels, net.depth) == ("MonaiUNet", 8, 3)
    for key in ("preset", "slice_axis", "spacing", "window", "context_slices"):
        assert getattr(init_path, key) == LAYOUT[key], key


def test_context_slices_multiply_the_input_channels():
    spec = ModelLayout(context_slices=1, window=(64, 48)).to_spec(LABELS, image_channels=2)
    assert spec.network.in_channels == 2 * 3  # each slice and one neighbour either side, per scan channel
    assert spec.image_channels == 2
    assert spec.network.out_channels == len(LABELS)
    assert ModelLayout().to_spec(LABELS).network.in_channels == 1


def test_trainer_spec_is_the_config_layout():
    manifest = Manifest(
        Path("blobs.json"), {0: "background", 1: "left", 2: "right"}, {"0": "T1", "1": "T2"}, name="Blobs"
    )
    config = TrainConfig(context_slices=1)
    spec = model_spec(config, manifest)
    assert spec == replace(config.layout.to_spec(LABELS, image_channels=2, name="Blobs"), trained_window=(64, 48))
    assert spec.trained_window == config.window  # what training fed the network, for inference's padding
    assert spec.network.in_channels == 6


def test_layout_defaults_are_init_models():
    from medseg.cli import build_parser

    args = build_parser().parse_args(["init-model", "-o", "m", "--labels", "background,organ"])
    layout = ModelLayout()
    assert (layout.base_channels, layout.depth, layout.preset, layout.slice_axis, layout.spacing, layout.window) == (
        args.base_channels,
        args.depth,
        args.preset,
        args.slice_axis,
        args.spacing,
        tuple(args.window),
    )


@pytest.mark.parametrize(
    ("layout", "channels", "message"),
    [
        (ModelLayout(), 0, "image_channels"),
        (ModelLayout(context_slices=-1), 1, "context_slices"),
        (ModelLayout(window=(100, 64)), 1, "multiples of 16"),
        (ModelLayout(slice_axis="oblique"), 1, "slice_axis"),
    ],
)
def test_bad_layouts_are_refused(layout, channels, message):
    with pytest.raises(ConfigError, match=message):
        layout.to_spec(LABELS, image_channels=channels)
