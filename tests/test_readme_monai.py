"""README "In MONAI workflows": its Python snippets run as shown, and its padding advice holds."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_geometry, phantom, rotation, write_itk

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## In MONAI workflows"
SHAPE = (30, 26, 20)


def section_snippets(text: str) -> list[str]:
    """The ```python blocks of the README section ``SECTION``, in order."""
    start = text.index(SECTION + "\n")
    end = text.find("\n## ", start + len(SECTION))
    body = text[start : end if end >= 0 else len(text)]
    return re.findall(r"^```python\n(.*?)^```", body, flags=re.MULTILINE | re.DOTALL)


@pytest.fixture
def snippet_folder(tmp_path, monkeypatch) -> Path:
    """What the snippets name: ``scan.nrrd``, ``scan-seg.nrrd`` (labels 0, 1, 2) and a small
    untrained ``models/my-mr`` with an in-plane spacing, so that resampling is undone too."""
    from medseg.model import init_model
    from medseg.spec import ModelSpec, NetworkSpec, labels_from_names

    geometry = make_geometry(SHAPE, (0.9, 0.8, 1.5), direction=rotation((0, 0, 90)))  # not RAS
    image = phantom(geometry.shape)
    write_itk(tmp_path / "scan.nrrd", image, geometry)
    labels = (image > 50).astype(np.uint8) + (image > 250).astype(np.uint8)
    write_itk(tmp_path / "scan-seg.nrrd", labels, geometry)
    spec = ModelSpec(
        labels=labels_from_names(["background", "anterior", "posterior"]),
        network=NetworkSpec(out_channels=3, base_channels=4),
        preset="mr",
        slice_axis="sagittal",
        window=(32, 32),
        spacing=(1.2, 1.2),
    )
    init_model(tmp_path / "models" / "my-mr", spec)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_section_has_the_two_examples():
    snippets = section_snippets(README.read_text(encoding="utf-8"))
    assert len(snippets) >= 2
    assert any("SliceInferer" in s and "Invertd" in s for s in snippets)
    assert any("SupervisedTrainer" in s and "RandSliceSamplerd" in s for s in snippets)


def test_snippets_run_as_shown(snippet_folder):
    from medseg.io import read_scan

    snippets = section_snippets(README.read_text(encoding="utf-8"))
    namespaces = []
    for i, code in enumerate(snippets):
        namespace = {"__name__": f"readme_monai_{i}"}
        exec(compile(code, f"README.md ({SECTION}, python block {i + 1})", "exec"), namespace)
        namespaces.append(namespace)
    scan = read_scan("scan.nrrd").geometry
    for namespace in namespaces:
        if "prediction" in namespace:  # the inference example: labels on the scan's grid
            prediction, label = namespace["prediction"], namespace["label"]
            assert prediction.shape == label.shape == (1, *SHAPE)
            assert set(torch.unique(prediction).tolist()) <= {0.0, 1.0, 2.0}
            assert set(torch.unique(label).tolist()) == {0.0, 1.0, 2.0}
            np.testing.assert_allclose(prediction.affine.numpy(), scan.affine_ras(), atol=1e-5)
        if "trainer" in namespace:  # the training example: it trained
            assert namespace["trainer"].state.iteration >= 2
            assert np.isfinite(float(namespace["trainer"].state.output[0]["loss"]))


@pytest.mark.parametrize("shape", [(9, 20, 24), (9, 40, 20)])  # sagittal slices fit / exceed 32x32
def test_slice_inferer_with_minimum_padding_reproduces_medseg(shape):
    """The README's SliceInferer arguments give medseg's class probabilities; MONAI's default
    padding (0) does not."""
    from monai.inferers import SliceInferer

    from medseg.inference import InferenceOptions, SlicePredictor
    from medseg.io.monai_reader import volume_to_metatensor
    from medseg.io.volume import Volume
    from medseg.model import Model
    from medseg.networks import build_network
    from medseg.spec import ModelSpec, NetworkSpec, labels_from_names
    from medseg.transforms import build_transforms, slice_axis_index

    spec = ModelSpec(
        labels=labels_from_names(["background", "a", "b"]),
        network=NetworkSpec(out_channels=3, base_channels=4),
        preset="mr",
        slice_axis="sagittal",
        window=(32, 32),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        network = build_network(spec.network).eval()
    model = Model(spec=spec, network=network, folder=Path("known"))
    volume = Volume(phantom(shape)[None], make_geometry(shape, (1.0, 1.0, 1.0)), Path("phantom"))
    image = build_transforms(spec, load=False)({"image": volume_to_metatensor(volume)})["image"]
    ours = SlicePredictor(model, InferenceOptions(batch_size=4)).predict_probabilities(image)

    def inferer_probabilities(**padding) -> torch.Tensor:
        inferer = SliceInferer(
            roi_size=spec.window,
            spatial_dim=slice_axis_index(spec.slice_axis, image.affine),
            sw_batch_size=4,
            overlap=0.25,
            mode="gaussian",
            **padding,
        )
        with torch.no_grad():
            return torch.softmax(inferer(image.unsqueeze(0), network)[0], dim=0).as_tensor()

    medseg_padding = inferer_probabilities(padding_mode="constant", cval=float(image.min()))
    np.testing.assert_allclose(medseg_padding.numpy(), ours.numpy(), atol=1e-5)
    assert float((inferer_probabilities() - ours).abs().max()) > 1e-4  # MONAI's default: zeros
