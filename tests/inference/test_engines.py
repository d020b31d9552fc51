"""Inference engines: BatchNorm folding, each engine against torch fp32, the conversion cache,
missing extras, the "auto" rule and ``medseg segment --engine`` end to end."""

from __future__ import annotations

import copy
import importlib.util
import logging
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import make_geometry, phantom, write_nifti
from torch import nn

from medseg.errors import ConfigError, ModelError
from medseg.inference.engines import TorchEngine, auto_engines, fold_batch_norm, load_engine
from medseg.inference.engines import cache as engine_cache
from medseg.model import Model
from medseg.networks import ArticleUNet
from medseg.spec import ModelSpec, NetworkSpec, labels_from_names

CPU = torch.device("cpu")
HAVE_OPENVINO = importlib.util.find_spec("openvino") is not None
HAVE_ORT = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx", "onnxscript"))
needs_openvino = pytest.mark.skipif(
    not HAVE_OPENVINO, reason="openvino is not installed (pip install 'medseg[openvino]')"
)
needs_ort = pytest.mark.skipif(
    not HAVE_ORT, reason="onnxruntime/onnx/onnxscript not installed (pip install 'medseg[onnx]')"
)
ENGINE_PARAMS = [
    pytest.param("openvino", marks=needs_openvino),
    pytest.param("onnxruntime", marks=needs_ort),
]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A cache folder of this test's own, and no memory of earlier unwritable-folder warnings."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(folder))
    monkeypatch.setattr(engine_cache, "_warned", set())
    return folder


def _randomise_batch_norm(network: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (fresh ones fold to identity)."""
    generator = torch.Generator().manual_seed(seed)
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            with torch.no_grad():
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
    return network.eval()


def _model(seed: int = 0, base: int = 4, depth: int = 2) -> Model:
    torch.manual_seed(seed)
    network = _randomise_batch_norm(ArticleUNet(1, 3, base, depth), seed)
    spec = ModelSpec(
        labels=labels_from_names(["background", "a", "b"]),
        network=NetworkSpec(out_channels=3, base_channels=base, depth=depth),
        window=(32, 32),
    )
    # A weights digest, as a model loaded from a folder has ("auto" converts only those).
    return Model(spec=spec, network=network, folder=Path(f"model-{seed}"), weights_digest=f"digest-{seed}")


def _count_batch_norms(network: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in network.modules())


@pytest.mark.parametrize("name", ["ArticleUNet", "MonaiUNet"])
def test_fold_batch_norm_keeps_outputs_and_removes_every_norm(name):
    if name == "MonaiUNet":
        from medseg.networks.monai_unet import MonaiUNet  # BatchNorm inside MONAI's nested ADN

        network = MonaiUNet(1, 3, 4, 2)
    else:
        network = ArticleUNet(1, 3, 4, 2)
    network = _randomise_batch_norm(network)
    before = _count_batch_norms(network)
    x = torch.randn(2, 1, 20, 28)
    folded = fold_batch_norm(copy.deepcopy(network))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), network(x), atol=1e-5, rtol=0)
    assert before > 0 and _count_batch_norms(folded) == 0
    assert _count_batch_norms(network) == before  # the copy was folded, not the original


def test_torch_engine_folds_a_copy_and_leaves_the_models_network():
    model = _model()
    before = _count_batch_norms(model.network)
    engine = load_engine(model, CPU, "fp32", "torch")
    assert isinstance(engine, TorchEngine) and (engine.name, engine.precision) == ("torch", "fp32")
    assert _count_batch_norms(engine.network) == 0 and _count_batch_norms(model.network) == before


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One cache for the tests that only run engines, so each network converts once."""
    return tmp_path_factory.mktemp("shared-cache")


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
@pytest.mark.parametrize("shape", [(1, 1, 16, 24), (3, 1, 32, 20)])
def test_engine_matches_torch_fp32(engine, shape, shared_cache, monkeypatch):
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(shared_cache))
    model = _model()
    made = load_engine(model, CPU, "fp32", engine)
    assert (made.name, made.precision) == (engine, "fp32")
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, got = model.network(x), made(x)
    assert got.shape == expected.shape and got.device == x.device
    torch.testing.assert_close(got.float(), expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(1), expected.argmax(1))


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_second_load_reads_the_cache(engine, monkeypatch, cache):
    model = _model()
    load_engine(model, CPU, "fp32", engine)
    assert len(list((cache / "engines").iterdir())) == 1

    def fail(*args, **kwargs):
        raise AssertionError("converted again although the cache holds the conversion")

    _patch_converter(monkeypatch, engine, fail)
    x = torch.randn(2, 1, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(load_engine(model, CPU, "fp32", engine)(x), model.network(x), atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_other_weights_get_their_own_cache_entry(engine, cache):
    first, second = _model(seed=0), _model(seed=1)
    for model in (first, second, first):
        load_engine(model, CPU, "fp32", engine)
    assert len(list((cache / "engines").iterdir())) == 2
    x = torch.randn(1, 1, 16, 16)
    with torch.inference_mode():  # the second model did not get the first's conversion
        torch.testing.assert_close(load_engine(second, CPU, "fp32", engine)(x), second.network(x), atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_unwritable_cache_converts_in_memory_with_one_warning(engine, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(blocker / "cache"))  # unwritable even as root
    model = _model()
    x = torch.randn(1, 1, 16, 16)
    with caplog.at_level(logging.WARNING, logger="medseg"):
        for _ in range(2):
            with torch.inference_mode():
                torch.testing.assert_close(
                    load_engine(model, CPU, "fp32", engine)(x), model.network(x), atol=1e-4, rtol=0
                )
    warnings = [r for r in caplog.records if "cannot write converted networks" in r.getMessage()]
    assert len(warnings) == 1 and str(blocker / "cache") in warnings[0].getMessage()
    assert not list(tmp_path.glob("medseg-onnx-*"))  # no temporary export left behind


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_damaged_cache_entry_is_rebuilt(engine, cache, caplog):
    model = _model()
    load_engine(model, CPU, "fp32", engine)
    (entry,) = (cache / "engines").iterdir()
    damaged = max((p for p in entry.iterdir() if p.name != "entry.json"), key=lambda p: p.stat().st_size)
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    x = torch.randn(1, 1, 16, 16)
    with caplog.at_level(logging.WARNING, logger="medseg"), torch.inference_mode():
        torch.testing.assert_close(load_engine(model, CPU, "fp32", engine)(x), model.network(x), atol=1e-4, rtol=0)
    assert "is damaged" in caplog.text
    assert engine_cache._check(entry, (damaged.name,)) is None  # rebuilt in place


@pytest.mark.parametrize(
    ("engine", "module", "extra"),
    [("openvino", "openvino", "medseg[openvino]"), ("onnxruntime", "onnxruntime", "medseg[onnx]")],
)
def test_a_named_engine_that_is_not_installed_names_its_extra(engine, module, extra, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=re.escape(f"pip install '{extra}'")):
        load_engine(_model(), CPU, "fp32", engine)


def test_auto_falls_back_quietly_when_nothing_else_is_installed(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with caplog.at_level(logging.WARNING, logger="medseg"):
        engine = load_engine(_model(), CPU, "auto", "auto")
    assert (engine.name, engine.precision) == ("torch", "fp32") and not caplog.records


def test_auto_rule():
    model = _model()
    assert auto_engines(model, torch.device("cuda")) == ("torch",)
    assert auto_engines(model, CPU, "fp32") == ("openvino", "onnxruntime", "torch")
    assert auto_engines(model, CPU, "fp16") == ("torch",)  # only torch runs fp16 on a CPU
    in_memory = Model(model.spec, model.network, model.folder)  # e.g. training's validation
    assert auto_engines(in_memory, CPU, "fp32") == ("torch",)
    if HAVE_OPENVINO:
        assert load_engine(model, CPU, "fp32", "auto").name == "openvino"


def test_auto_skips_an_engine_whose_conversion_fails(monkeypatch, caplog):
    if not HAVE_OPENVINO:
        pytest.skip("openvino is not installed (pip install 'medseg[openvino]')")
    from medseg.inference.engines import openvino_engine

    def fail(ov, model):
        raise ModelError(model.folder, "could not be converted for OpenVINO (test)", "use --engine torch")

    monkeypatch.setattr(openvino_engine, "_convert", fail)
    with caplog.at_level(logging.WARNING, logger="medseg"):
        engine = load_engine(_model(), CPU, "fp32", "auto")
    assert engine.name != "openvino" and "could not be converted for OpenVINO (test)" in caplog.text
    with pytest.raises(ModelError, match="could not be converted"):
        load_engine(_model(), CPU, "fp32", "openvino")


@needs_openvino
def test_openvino_runs_a_torchscript_folder(tmp_path, tiny_model_dir):
    from medseg.export.networks import export_model
    from medseg.model import load_model

    export_model(tiny_model_dir, tmp_path / "ts", "torchscript")
    model = load_model(tmp_path / "ts")
    x = torch.randn(2, 1, 32, 48)
    with torch.inference_mode():
        torch.testing.assert_close(load_engine(model, CPU, "fp32", "openvino")(x), model.network(x), atol=1e-4, rtol=0)
    assert auto_engines(model, CPU, "fp32") == ("openvino", "torch")
    if HAVE_ORT:
        with pytest.raises(ModelError, match="TorchScript network, which onnxruntime cannot run"):
            load_engine(model, CPU, "fp32", "onnxruntime")


def _patch_converter(monkeypatch, engine: str, replacement) -> None:
    if engine == "openvino":
        from medseg.inference.engines import openvino_engine

        monkeypatch.setattr(openvino_engine, "_convert", replacement)
    else:
        from medseg.inference.engines import onnxruntime_engine

        monkeypatch.setattr(onnxruntime_engine, "_export", replacement)


@needs_openvino
def test_segment_with_openvino_gives_the_torch_fp32_labels(tmp_path, tiny_model_dir, cache):
    from medseg.cli import main

    geometry = make_geometry((20, 24, 9))
    scan = write_nifti(tmp_path / "case.nii.gz", phantom(geometry.shape), geometry)
    common = ["segment", str(scan), "--model", str(tiny_model_dir), "--formats", "nifti", "-q", "--device", "cpu"]
    assert main([*common, "-o", str(tmp_path / "torch"), "--engine", "torch", "--precision", "fp32"]) == 0
    assert main([*common, "-o", str(tmp_path / "openvino"), "--engine", "openvino"]) == 0
    torch_labels = np.asarray(nib.load(tmp_path / "torch" / "case.nii.gz").dataobj)
    openvino_labels = np.asarray(nib.load(tmp_path / "openvino" / "case.nii.gz").dataobj)
    assert np.array_equal(torch_labels, openvino_labels)
    assert len(list((cache / "engines").iterdir())) == 1  # converted once, into the cache
