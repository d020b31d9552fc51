"""TorchScript and ONNX model folders: written by ``medseg export``, run by ``medseg segment``
with the PyTorch folder's labels; refused clearly when damaged, incomplete or unrunnable."""

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_geometry, phantom, write_nifti

from medseg import segment
from medseg.cli import main
from medseg.errors import ConfigError, ModelError
from medseg.export.networks import export_model
from medseg.io import read_scan
from medseg.io.files import file_digest
from medseg.model import build_ensemble, init_model, load_model, load_spec, store_half

# model.json entries an export changes; everything else must be the source's.
_EXPORT_KEYS = ("weights", "weights_sha256", "provenance")


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> list[Path]:
    """Two synthetic scans of unlike shapes and spacings."""
    folder = tmp_path_factory.mktemp("scans")
    out = []
    for i, (shape, spacing) in enumerate([((20, 24, 9), (0.8, 1.1, 2.5)), ((30, 17, 12), (1.0, 1.0, 1.0))]):
        geometry = make_geometry(shape, spacing)
        out.append(write_nifti(folder / f"scan{i}.nii.gz", phantom(shape, seed=i), geometry))
    return out


def _labels(scans, model, out, **options) -> dict[str, np.ndarray]:
    report = segment(scans, out, model, formats="nifti", **options)
    assert all(r.status == "ok" for r in report.records), [(r.error, r.hint) for r in report.records]
    return {Path(r.input).name: read_scan(r.outputs["nifti"]).array[0] for r in report.records}


@pytest.fixture(scope="module")
def pytorch_labels(scans, tiny_model_dir, tmp_path_factory):
    return _labels(scans, tiny_model_dir, tmp_path_factory.mktemp("pytorch"))


@pytest.fixture(scope="module")
def torchscript_dir(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "torchscript"
    export_model(tiny_model_dir, out, "torchscript")
    return out


@pytest.fixture(scope="module")
def onnx_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model exported through the command line (one ONNX export, ~6 s, shared)."""
    out = tmp_path_factory.mktemp("exports") / "onnx"
    assert main(["export", "--model", str(tiny_model_dir), "--format", "onnx", "-o", str(out)]) == 0
    return out


# The ONNX export shared by the tests marked slow here takes ~8 s on 2 cores (dynamo exporter).
_ONNX = pytest.param("onnx_dir", marks=pytest.mark.slow)


@pytest.mark.parametrize("fixture", ["torchscript_dir", _ONNX])
def test_exported_folder_segments_like_pytorch(request, fixture, scans, pytorch_labels, tmp_path):
    labels = _labels(scans, request.getfixturevalue(fixture), tmp_path)
    for name, expected in pytorch_labels.items():
        np.testing.assert_array_equal(labels[name], expected, err_msg=name)


@pytest.mark.parametrize(
    ("fixture", "suffix"), [("torchscript_dir", ".ts"), pytest.param("onnx_dir", ".onnx", marks=pytest.mark.slow)]
)
def test_model_json_is_the_source_one_but_for_weights_and_provenance(request, fixture, suffix, tiny_model_dir):
    folder = request.getfixturevalue(fixture)
    source, exported = load_spec(tiny_model_dir), load_spec(folder)
    strip = lambda spec: {k: v for k, v in spec.to_dict().items() if k not in _EXPORT_KEYS}  # noqa: E731
    assert strip(exported) == strip(source)
    assert exported.weights == f"weights{suffix}" and exported.weights_sha256 == file_digest(folder / exported.weights)
    note = exported.provenance["exported"]
    assert note["from"] == str(tiny_model_dir.resolve()) and note["format"] == fixture.removesuffix("_dir")
    assert note["source_weights_sha256"] == source.weights_sha256
    assert exported.provenance["init_seed"] == source.provenance["init_seed"]  # the source's provenance kept
    # Resume keys on the weights: an exported folder is another model to it.
    assert load_model(folder).sha256 != load_model(tiny_model_dir).sha256


@pytest.mark.slow
def test_onnx_network_takes_any_batch_and_size_channels_last_and_autocast(onnx_dir, tiny_model_dir):
    """Exported at 2x1x64x64; other batches and multiples of 16 run, the way the predictor
    calls them (channels-last, under autocast), always in float32."""
    onnx, reference = load_model(onnx_dir).network, load_model(tiny_model_dir).network
    onnx = onnx.to("cpu", memory_format=torch.channels_last).eval()
    generator = torch.Generator().manual_seed(1)
    for shape in [(1, 1, 48, 80), (5, 1, 32, 16), (3, 1, 128, 64)]:
        x = torch.randn(*shape, generator=generator)
        with torch.inference_mode():
            expected = reference(x)
            last = onnx(x.contiguous(memory_format=torch.channels_last))
            torch.testing.assert_close(last, expected, atol=1e-4, rtol=0)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = onnx(x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_onnx_with_bf16_precision_gives_the_fp32_labels(onnx_dir, scans, pytorch_labels, tmp_path):
    labels = _labels(scans, onnx_dir, tmp_path, precision="bf16")
    for name, expected in pytorch_labels.items():
        np.testing.assert_array_equal(labels[name], expected, err_msg=name)


def test_ensemble_exports_each_member_in_its_own_folder(tmp_path, tiny_model_dir, scans):
    other = tmp_path / "other"
    init_model(other, replace(load_spec(tiny_model_dir), slice_axis="axial"), seed=1)
    ensemble = tmp_path / "ensemble"
    build_ensemble({"sagittal": tiny_model_dir, "axial": other}, ensemble)
    (ensemble / "MODEL_CARD.md").write_text("# card\n")
    out = tmp_path / "exported"
    spec = export_model(ensemble, out, "torchscript")
    assert spec.members == ("sagittal", "axial") and spec.provenance["exported"]["format"] == "torchscript"
    assert sorted(p.name for p in out.iterdir()) == ["MODEL_CARD.md", "axial", "model.json", "sagittal"]
    for member in spec.members:
        assert sorted(p.name for p in (out / member).iterdir()) == ["model.json", "weights.ts"]
    top = lambda folder: {k: v for k, v in load_spec(folder).to_dict().items() if k != "provenance"}  # noqa: E731
    assert top(out) == top(ensemble)
    expected = _labels(scans, ensemble, tmp_path / "pt")
    got = _labels(scans, out, tmp_path / "ts")
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_a_non_empty_output_is_refused_without_overwrite(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ModelError, match=r"not empty.*--overwrite"):
        export_model(tiny_model_dir, out, "torchscript")
    assert (out / "notes.txt").read_text() == "mine"
    export_model(tiny_model_dir, out, "torchscript", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "weights.ts"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left beside it
    (tmp_path / "empty").mkdir()
    export_model(tiny_model_dir, tmp_path / "empty", "torchscript")  # an empty folder is fine


def test_export_never_replaces_its_source(tmp_path, tiny_model_dir):
    source = tmp_path / "model"
    shutil.copytree(tiny_model_dir, source)
    for out in (source, source / "onnx", tmp_path):
        with pytest.raises(ModelError, match="source"):
            export_model(source, out, "onnx", overwrite=True)
    assert load_model(source).network is not None


def test_a_failed_export_leaves_nothing(tmp_path, tiny_model_dir, monkeypatch, caplog):
    import medseg.export.networks as networks

    def broken(*args):
        raise RuntimeError("exporter broke\nsecond line")

    monkeypatch.setattr(networks, "export_torchscript", broken)
    out = tmp_path / "out"
    assert main(["export", "--model", str(tiny_model_dir), "--format", "torchscript", "-o", str(out)]) == 2
    assert "could not be exported to torchscript (RuntimeError: exporter broke)" in caplog.text
    assert "second line" not in caplog.text and "Traceback" not in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_an_export_that_disagrees_with_pytorch_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    import medseg.export.networks as networks

    monkeypatch.setattr(networks, "_difference", lambda *args: 0.5)
    with pytest.raises(ModelError, match=r"disagrees with the PyTorch network.*0\.5.*3x1x80x96"):
        export_model(tiny_model_dir, tmp_path / "out", "torchscript")
    assert list(tmp_path.iterdir()) == []


def _damaged_copy(folder: Path, target: Path, keep_checksum: bool = False) -> Path:
    """A copy of ``folder`` whose weights file is cut in half (model.json's checksum updated to
    match, as if written that way, unless ``keep_checksum``)."""
    shutil.copytree(folder, target)
    spec = json.loads((target / "model.json").read_text())
    weights = target / spec["weights"]
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    if not keep_checksum:
        spec["weights_sha256"] = file_digest(weights)
        (target / "model.json").write_text(json.dumps(spec))
    return weights


@pytest.mark.parametrize(
    ("fixture", "needle"),
    [
        ("torchscript_dir", "is not a readable TorchScript file"),
        pytest.param("onnx_dir", "is not an ONNX network onnxruntime can run", marks=pytest.mark.slow),
    ],
)
def test_a_damaged_export_is_a_model_error_naming_the_file(request, tmp_path, fixture, needle):
    weights = _damaged_copy(request.getfixturevalue(fixture), tmp_path / "damaged")
    with pytest.raises(ModelError) as info:
        load_model(tmp_path / "damaged")
    assert str(info.value).startswith(f"{weights}: {needle}") and "re-export" in str(info.value)
    weights = _damaged_copy(request.getfixturevalue(fixture), tmp_path / "changed", keep_checksum=True)
    with pytest.raises(ModelError, match="checksum"):
        load_model(tmp_path / "changed")


@pytest.mark.slow
def test_onnx_channels_are_checked_against_model_json(tmp_path, onnx_dir):
    shutil.copytree(onnx_dir, tmp_path / "m")
    spec = json.loads((tmp_path / "m" / "model.json").read_text())
    spec["network"]["out_channels"] = 2
    spec["labels"] = spec["labels"][:2]
    (tmp_path / "m" / "model.json").write_text(json.dumps(spec))
    with pytest.raises(ModelError, match=r"weights\.onnx: has 3 out channels but model\.json says 2"):
        load_model(tmp_path / "m")


@pytest.mark.slow
def test_missing_onnxruntime_names_the_extra(tmp_path, onnx_dir, tiny_model_dir, scans, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(ModelError) as info:
        load_model(onnx_dir)
    text = str(info.value)
    assert text.startswith(str(onnx_dir / "weights.onnx")) and "pip install 'medseg[onnx]'" in text
    with pytest.raises(ConfigError, match=r"onnxruntime.*medseg\[onnx\]"):
        export_model(tiny_model_dir, tmp_path / "out", "onnx")
    code = main(["segment", str(scans[0]), "-o", str(tmp_path / "seg"), "--model", str(onnx_dir)])
    assert code == 2 and "medseg[onnx]" in caplog.text


def test_exported_folders_are_not_stored_as_half_or_exported_again(tmp_path, torchscript_dir):
    shutil.copytree(torchscript_dir, tmp_path / "ts")
    with pytest.raises(ModelError, match="exported network"):
        store_half(tmp_path / "ts")
    with pytest.raises(ModelError, match="already an exported network"):
        export_model(tmp_path / "ts", tmp_path / "again", "onnx")


def test_unknown_weights_suffix_is_refused(tmp_path, tiny_model_dir):
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    (tmp_path / "m" / "weights.safetensors").rename(tmp_path / "m" / "weights.bin")
    spec = json.loads((tmp_path / "m" / "model.json").read_text())
    spec["weights"] = "weights.bin"
    (tmp_path / "m" / "model.json").write_text(json.dumps(spec))
    with pytest.raises(ModelError, match=r"weights 'weights.bin' has a suffix medseg does not know.*\.onnx"):
        load_model(tmp_path / "m")


# Real scans: the bundled ensemble, exported, against PyTorch on validation cases.


@pytest.fixture(scope="module")
def real_cases(shared_data, tmp_path_factory) -> tuple[list[tuple[Path, Path]], dict[str, np.ndarray]]:
    """The first four validation cases (image, reference) and the bundled model's labels."""
    from medseg.bundled import default_model_dir

    manifest = json.loads(Path("data_manifests/hippocampus.json").read_text())
    root = shared_data / "hippocampus"
    cases = [
        (root / "imagesTr" / Path(i["image"]).name, root / "labelsTr" / Path(i["label"]).name)
        for i in manifest["validation"][:4]
    ]
    return cases, _labels([image for image, _ in cases], default_model_dir(), tmp_path_factory.mktemp("pytorch"))


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("format", ["torchscript", "onnx"])
def test_bundled_ensemble_exports_keep_its_labels_on_real_scans(real_cases, tmp_path, format):
    """~30 s for ONNX (four members exported and checked), ~5 s for TorchScript, on 2 cores."""
    from medseg.bundled import default_model_dir
    from medseg.evaluation.metrics import dice

    cases, expected = real_cases
    export_model(default_model_dir(), tmp_path / format, format)
    got = _labels([image for image, _ in cases], tmp_path / format, tmp_path / "exported")
    same = sum(int((got[k] == expected[k]).sum()) for k in expected)
    total = sum(v.size for v in expected.values())
    print(f"{format}: {same}/{total} voxels agree ({100 * same / total:.4f}%)")
    assert same / total >= 0.9999
    for image, label in cases:
        ref = np.rint(read_scan(label).array[0]).astype(int)
        for value in (1, 2):
            change = dice(got[image.name].astype(int), ref, value) - dice(expected[image.name].astype(int), ref, value)
            assert abs(change) < 1e-3, (image.name, value, change)
