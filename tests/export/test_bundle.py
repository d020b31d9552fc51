"""MONAI bundles exported from model folders, run through MONAI's own bundle tools."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import make_geometry, phantom, rotation, write_dicom_series, write_itk, write_msd_dataset, write_nifti

from medseg import segment
from medseg.errors import ConfigError
from medseg.export.bundle import RUN_FILES, bundle_network, export_bundle
from medseg.model import build_ensemble, init_model, load_model, save_model
from medseg.networks.ensemble import SliceEnsemble
from medseg.spec import LabelSpec, ModelSpec, NetworkSpec

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "pipelines" / "bundles" / "hippocampus_mr"
BUNDLED_MODEL = REPO / "models" / "hippocampus-mr"
WEIGHTS = "models/model.pt"
SCHEMA = Path(__file__).parent / "bundle_metadata_schema.json"

# metadata.json's required keys and the keys of every tensor format specifier, as MONAI's
# bundle specification (docs/source/mb_specification.rst) lists them. MONAI 1.4+ reads the
# specification's "optional_packages_version" as "required_packages_version".
REQUIRED = (
    "version",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
)
TENSOR_KEYS = (
    "type",
    "format",
    "modality",
    "num_channels",
    "spatial_shape",
    "dtype",
    "value_range",
    "is_patch_data",
    "channel_def",
)
VERSION_KEYS = ("monai_version", "pytorch_version", "numpy_version", "required_packages_version", "changelog")


def _labels(values=(0, 1, 2)) -> tuple[LabelSpec, ...]:
    names = ("background", "anterior", "posterior")
    return tuple(LabelSpec(v, n, (10 * i, 20 * i, 30 * i)) for i, (v, n) in enumerate(zip(values, names)))


def _spread_classes(folder: Path) -> None:
    """An untrained network's classifier re-drawn around the features' mean on a blob image,
    so that its argmax follows the image (untrained, one class wins everywhere, and identical
    masks of one class would prove little)."""
    model = load_model(folder)
    network = model.network.eval()
    generator = torch.Generator().manual_seed(0)
    grid = torch.linspace(-1, 1, 32)
    blob = ((grid[:, None] ** 2 + grid[None, :] ** 2) < 0.5).float()
    blob = blob.expand(1, model.spec.network.in_channels, 32, 32)
    head = network.head[-1]
    features = []
    hook = head.register_forward_hook(lambda module, args, out: features.append(args[0]))
    with torch.no_grad():
        network.train()  # batch-norm statistics of noisy blobs: features that vary in eval mode
        for _ in range(5):
            network(blob + 0.3 * torch.rand((8, *blob.shape[1:]), generator=generator))
        network.eval()
        features.clear()
        network(blob)
        hook.remove()
        mean, spread = features[0].mean(dim=(0, 2, 3)), features[0].std(dim=(0, 2, 3)) + 1e-6
        weight = torch.randn(head.weight.shape[:2], generator=generator) / spread
        head.weight.copy_(weight[:, :, None, None])
        head.bias.copy_(-(weight @ mean))
    save_model(folder, model.spec, network)


@pytest.fixture(scope="module")
def tiny_ensemble(tmp_path_factory) -> Path:
    """Two untrained members: a 2.5D sagittal one with a window smaller than the scans'
    slices (sliding window) and an axial one resampled to 1.5 mm; label values 0, 3, 7 and
    largest-component post-processing, so every part of the bundle's path is exercised."""
    root = tmp_path_factory.mktemp("ensemble")
    labels = _labels((0, 3, 7))
    sagittal = ModelSpec(
        labels=labels,
        network=NetworkSpec(in_channels=3, out_channels=3, base_channels=4, depth=2),
        preset="ct_abdomen",
        slice_axis="sagittal",
        window=(16, 16),
        context_slices=1,
    )
    axial = ModelSpec(
        labels=labels,
        network=NetworkSpec(out_channels=3, base_channels=4, depth=3),
        preset="ct_abdomen",
        slice_axis="axial",
        spacing=(1.5, 1.5),
        window=(32, 32),
    )
    for name, spec, seed in (("sagittal", sagittal, 1), ("axial", axial, 2)):
        init_model(root / name, spec, seed=seed)
        _spread_classes(root / name)
    folder = root / "model"
    build_ensemble({"sagittal": root / "sagittal", "axial": root / "axial"}, folder, postprocess="largest_component")
    return folder


@pytest.fixture(scope="module")
def synthetic_scans(tmp_path_factory) -> Path:
    """An oblique anisotropic NIfTI, an NRRD and a DICOM series (CT values)."""
    root = tmp_path_factory.mktemp("scans")
    shape = (21, 26, 13)
    array = phantom(shape, seed=3) * 1.5 - 50
    oblique = make_geometry(shape, (0.9, 1.2, 2.5), direction=rotation((12, -7, 25)))
    write_nifti(root / "oblique.nii.gz", array, oblique)
    write_itk(root / "plain.nrrd", phantom((18, 20, 15), seed=4), make_geometry((18, 20, 15), (1.1, 0.7, 1.9)))
    write_dicom_series(root / "series", array, make_geometry(shape, (0.8, 0.8, 2.0), direction=rotation((0, 0, 15))))
    return root


@pytest.fixture(scope="module")
def shipped_bundle(tmp_path_factory) -> Path:
    """The shipped bundle, runnable: its committed configs and docs plus models/model.pt, which
    is derived from models/hippocampus-mr (19 MB, not committed: `make bundle` writes it)."""
    folder = tmp_path_factory.mktemp("shipped") / "hippocampus_mr"
    shutil.copytree(SHIPPED, folder, ignore=shutil.ignore_patterns("models"))
    (folder / "models").mkdir()
    _, state = bundle_network(load_model(BUNDLED_MODEL))
    torch.save(state, folder / "models" / "model.pt")
    return folder


def _run_bundle(bundle: Path, config: str, **overrides: str) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` as a user types it, from the bundle folder."""
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"configs/{config}"]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    result = subprocess.run(args, cwd=bundle, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _masks(folder: Path, suffix: str) -> dict[str, nib.Nifti1Image]:
    return {p.name.removesuffix(suffix): nib.load(p) for p in sorted(folder.rglob(f"*{suffix}"))}


def _assert_same_masks(bundle_out: Path, medseg_out: Path, names: dict[str, str], near_ties: int = 0) -> None:
    """Every bundle mask equals medseg's for the same scan: voxels, shape and affine.

    ``near_ties``: voxels allowed to differ in all, where two classes' mean probabilities lie
    within rounding (~1e-5) of each other and float order of operations decides."""
    ours = _masks(bundle_out, "_seg.nii.gz")
    theirs = _masks(medseg_out, ".nii.gz")
    assert sorted(ours) == sorted(names), sorted(ours)
    for bundle_name, medseg_name in names.items():
        a, b = ours[bundle_name], theirs[medseg_name]
        assert a.shape == b.shape, bundle_name
        np.testing.assert_allclose(a.affine, b.affine, atol=1e-4, err_msg=bundle_name)
        differ = int((np.asarray(a.dataobj) != np.asarray(b.dataobj)).sum())
        near_ties -= differ
        assert near_ties >= 0, f"{bundle_name}: {differ} voxel(s) differ"


def test_bundle_run_writes_the_masks_of_medseg_segment(tiny_ensemble, synthetic_scans, tmp_path):
    bundle = export_bundle(tiny_ensemble, tmp_path / "bundle")
    _run_bundle(bundle, "inference.json", dataset_dir=synthetic_scans, output_dir=tmp_path / "out")
    report = segment(synthetic_scans, tmp_path / "medseg", tiny_ensemble, formats="nifti")
    assert all(r.status == "ok" for r in report.records)
    # Outputs take medseg's scan names (the DICOM series: folder, series number and description).
    names = {r.name: r.name for r in report.records}
    assert len(names) == 3
    _assert_same_masks(tmp_path / "out", tmp_path / "medseg", names)
    values = set()
    for image in _masks(tmp_path / "out", "_seg.nii.gz").values():
        assert image.get_data_dtype() == np.uint8
        values |= set(np.unique(np.asarray(image.dataobj)).tolist())
    assert values == {0, 3, 7}  # every label drawn, as label values (not channel indices)


def test_bundle_run_names_scans_apart_skips_refused_ones_and_keeps_out_of_the_inputs(tiny_ensemble, tmp_path):
    """Same-stem files get medseg's distinct names; a corrupt file and a 4D file are logged
    with medseg's message and skipped while the others are written; an output folder that
    holds the scans is refused, and one inside them is not read back as scans."""
    scans = tmp_path / "scans"
    scans.mkdir()
    geometry = make_geometry((18, 20, 15), (1.1, 0.7, 1.9))
    write_nifti(scans / "case.nii.gz", phantom((18, 20, 15), seed=1), geometry)
    write_itk(scans / "case.nrrd", phantom((18, 20, 15), seed=2), geometry)
    (scans / "broken.nii.gz").write_bytes(b"not a nifti")
    write_nifti(scans / "four_d.nii.gz", np.zeros((18, 20, 15, 2), np.float32), geometry)
    bundle = export_bundle(tiny_ensemble, tmp_path / "bundle")
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    result = subprocess.run(
        [*args, "--dataset_dir", str(scans), "--output_dir", str(scans / "masks")],
        cwd=bundle, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 3  # some scans failed, as medseg segment says it
    written = sorted(p.name for p in (scans / "masks").glob("*.nii.gz"))
    assert len(written) == 2 and all(name.startswith("case-") for name in written), written
    log = result.stdout + result.stderr
    assert "broken.nii.gz: cannot be read as NIfTI" in log
    assert "four_d.nii.gz" in log and "channel" in log
    assert "4 scan(s): 2 segmented, 2 failed" in log
    record = json.loads((scans / "masks" / "medseg-bundle-run.json").read_text())
    assert sorted(f"{name}_seg.nii.gz" for name in record["written"]) == written
    assert sorted(Path(f["input"]).name for f in record["failed"]) == ["broken.nii.gz", "four_d.nii.gz"]
    for output_dir in (scans / "masks", scans / "masks2"):  # again, into the same or another folder
        subprocess.run([*args, "--dataset_dir", str(scans), "--output_dir", str(output_dir)], cwd=bundle)
        assert sorted(p.name for p in output_dir.glob("*.nii.gz")) == written  # masks are not scans
    refused = subprocess.run(
        [*args, "--dataset_dir", str(scans), "--output_dir", str(tmp_path)], cwd=bundle, capture_output=True, text=True
    )
    assert refused.returncode != 0 and "outputs written there could overwrite the scans" in refused.stderr


@pytest.mark.slow
@pytest.mark.realdata
def test_bundle_run_matches_medseg_on_real_validation_scans(shared_data, shipped_bundle, tmp_path):
    manifest = json.loads((REPO / "data_manifests" / "hippocampus.json").read_text())
    scans = tmp_path / "scans"
    scans.mkdir()
    for item in manifest["validation"][:4]:
        source = (REPO / "data_manifests" / item["image"]).resolve()
        (scans / source.name).symlink_to(source)
    _run_bundle(shipped_bundle, "inference.json", dataset_dir=scans, output_dir=tmp_path / "out")
    # The bundle runs its members with PyTorch: so does medseg here (engines agree to ~1e-5 in
    # logits, which can tip a near-tie voxel of the ensemble sum).
    segment(scans, tmp_path / "medseg", BUNDLED_MODEL, formats="nifti", engine="torch")
    names = {p.name.removesuffix(".nii.gz"): p.name.removesuffix(".nii.gz") for p in scans.iterdir()}
    # One voxel of ~300,000 was seen to differ (hippocampus_020, a near tie).
    _assert_same_masks(tmp_path / "out", tmp_path / "medseg", names, near_ties=2)


@pytest.mark.slow
@pytest.mark.realdata
def test_evaluate_config_reports_dice_on_real_validation_cases(shared_data, shipped_bundle, tmp_path):
    manifest = json.loads((REPO / "data_manifests" / "hippocampus.json").read_text())
    validation = [
        {key: str((REPO / "data_manifests" / item[key]).resolve()) for key in ("image", "label")}
        for item in manifest["validation"][:3]
    ]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"validation": validation}))
    _run_bundle(shipped_bundle, "evaluate.json", datalist_file=datalist, output_dir=tmp_path / "eval")
    dice = float((tmp_path / "eval" / "metrics.csv").read_text().split(",")[1])
    assert dice > 0.8


def _training_cases(root: Path, n_cases: int) -> tuple[Path, dict]:
    """Blob cases labelled with the tiny ensemble's label values (0, 3, 7)."""
    cases = write_msd_dataset(root, n_cases=n_cases)
    meta = json.loads((cases / "dataset.json").read_text())
    for item in meta["training"]:
        label = cases / item["label"]
        image = nib.load(label)
        values = np.asarray(image.dataobj)
        nib.save(
            nib.Nifti1Image(np.select([values == 1, values == 2], [3, 7], 0).astype(np.float32), image.affine), label
        )
    return cases, meta


@pytest.mark.slow
def test_train_config_fine_tunes_one_member_through_monai_engines(tiny_ensemble, tmp_path):
    cases, meta = _training_cases(tmp_path / "msd", 2)
    datalist = cases / "datalist.json"
    datalist.write_text(json.dumps({"training": meta["training"]}))
    bundle = export_bundle(tiny_ensemble, tmp_path / "bundle")
    _run_bundle(
        bundle, "train.json", datalist_file=datalist, output_dir=tmp_path / "train", epochs=2, num_samples=2,
        member_index=1,
    )  # fmt: skip
    before = torch.load(bundle / "models" / "model.pt", weights_only=True)
    after = torch.load(tmp_path / "train" / "model.pt", weights_only=True)
    assert sorted(before) == sorted(after)
    changed = {key.split(".")[1] for key in before if not torch.equal(before[key].float(), after[key].float())}
    assert changed == {"1"}  # only the member trained; the saved state loads as the ensemble
    network = SliceEnsemble(json.loads((bundle / "configs" / "inference.json").read_text())["network_def"]["members"])
    network.load_state_dict(after)
    # From random weights for member 0 only ("false" as typed on the command line).
    _run_bundle(
        bundle, "train.json", datalist_file=datalist, output_dir=tmp_path / "fresh", epochs=1, num_samples=2,
        finetune="false",
    )  # fmt: skip
    fresh = torch.load(tmp_path / "fresh" / "model.pt", weights_only=True)
    assert {key.split(".")[1] for key in before if not torch.equal(before[key].float(), fresh[key].float())} == {"0"}


@pytest.mark.parametrize("problem", ["member_index", "label_value", "four_d"])
def test_train_config_names_what_is_wrong(tiny_ensemble, tmp_path, problem):
    cases, meta = _training_cases(tmp_path / "msd", 1)
    if problem == "label_value":
        label = cases / meta["training"][0]["label"]
        image = nib.load(label)
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj) * 5, image.affine), label)
    if problem == "four_d":
        image = cases / meta["training"][0]["image"]
        volume = nib.load(image)
        nib.save(nib.Nifti1Image(np.stack([np.asarray(volume.dataobj)] * 2, -1), volume.affine), image)
    datalist = cases / "datalist.json"
    datalist.write_text(json.dumps({"training": meta["training"]}))
    bundle = export_bundle(tiny_ensemble, tmp_path / "bundle")
    args = ["--datalist_file", str(datalist), "--output_dir", str(tmp_path / "t"), "--epochs", "1"]
    args += ["--member_index", "5" if problem == "member_index" else "0"]
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", *args],
        cwd=bundle, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0
    expected = {
        "member_index": "member_index 5 names no member",
        "label_value": "holds label value(s) [15, 35]",
        "four_d": "has 2 channel(s) but the model takes 1",
    }[problem]
    assert expected in result.stderr


def test_verify_net_in_out_and_ckpt_export_pass(tiny_ensemble, tmp_path):
    from monai.bundle import ckpt_export, verify_net_in_out

    bundle = export_bundle(tiny_ensemble, tmp_path / "bundle")
    meta, config = str(bundle / "configs" / "metadata.json"), str(bundle / "configs" / "inference.json")
    overrides = {"bundle_root": str(bundle)}
    verify_net_in_out("network_def", meta_file=meta, config_file=config, device="cpu", n=2, **overrides)
    target = bundle / "models" / "model.ts"
    ckpt_export(
        "network_def", filepath=str(target), ckpt_file=str(bundle / "models" / "model.pt"), meta_file=meta,
        config_file=config, **overrides,
    )  # fmt: skip
    scripted = torch.jit.load(str(target))
    network = SliceEnsemble(json.loads(Path(config).read_text())["network_def"]["members"])
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    x = torch.randn(2, 3, 32, 48)
    torch.testing.assert_close(scripted(x), network.eval()(x))


def test_ensemble_forward_gives_each_member_its_centre_slices(tiny_ensemble):
    model = load_model(tiny_ensemble)
    from medseg.export.bundle import bundle_network

    network, _ = bundle_network(model)
    network.eval()
    x = torch.randn(1, 3, 16, 32)
    sagittal, axial = (m.network.eval() for m in model.members)
    expected = (torch.softmax(sagittal(x), 1) + torch.softmax(axial(x[:, 1:2]), 1)) / 2
    torch.testing.assert_close(network(x), expected)


def test_shipped_metadata_has_every_required_field():
    meta = json.loads((SHIPPED / "configs" / "metadata.json").read_text())
    assert [key for key in REQUIRED if key not in meta] == []
    for kind in ("inputs", "outputs"):
        for name, tensor in meta["network_data_format"][kind].items():
            assert [key for key in TENSOR_KEYS if key not in tensor] == [], (kind, name)
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["spatial_shape"] == ["16*n", "16*n"]
    assert image["intensity_preset"] == "mr"
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "background",
        "1": "anterior",
        "2": "posterior",
    }
    for path in ("configs/train.json", "configs/evaluate.json", "configs/logging.conf", "docs/README.md"):
        assert (SHIPPED / path).is_file(), path
    assert "CC-BY-SA 4.0" in (SHIPPED / "docs" / "data_license.txt").read_text()


def test_verify_metadata_against_a_schema_file(tmp_path):
    """MONAI's verify_metadata downloads the schema unless it is given a file; these machines
    cannot download, so the test passes a schema (MONAI_BUNDLE_SCHEMA, or the specification's
    required fields written as JSON schema beside this test)."""
    from monai.bundle import verify_metadata

    schema = Path(os.environ.get("MONAI_BUNDLE_SCHEMA", SCHEMA))
    verify_metadata(meta_file=str(SHIPPED / "configs" / "metadata.json"), filepath=str(schema))
    broken = json.loads((SHIPPED / "configs" / "metadata.json").read_text())
    del broken["network_data_format"]["inputs"]["image"]["num_channels"]
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="num_channels"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(schema))


def test_shipped_bundle_is_regenerated_from_the_bundled_model(tmp_path):
    """pipelines/bundles/hippocampus_mr is `make bundle`'s output, never edited by hand."""
    fresh = export_bundle(BUNDLED_MODEL, tmp_path / "bundle")
    # models/model.pt is derived, not committed; compared when `make bundle` has written it.
    shipped_files = sorted(str(p.relative_to(SHIPPED)) for p in SHIPPED.rglob("*") if p.is_file())
    fresh_files = sorted(str(p.relative_to(fresh)) for p in fresh.rglob("*") if p.is_file())
    assert [f for f in shipped_files if f != WEIGHTS] == [f for f in fresh_files if f != WEIGHTS]
    fresh_files = [f for f in fresh_files if f != WEIGHTS or (SHIPPED / WEIGHTS).is_file()]
    stale = "pipelines/bundles/hippocampus_mr is stale: run `make bundle` and commit it"
    for name in fresh_files:
        if name.endswith(".json"):
            a, b = json.loads((SHIPPED / name).read_text()), json.loads((fresh / name).read_text())
            for key in VERSION_KEYS:  # the installed versions at export time
                a.pop(key, None), b.pop(key, None)
            assert a == b, f"{stale} ({name})"
        elif name.endswith(".pt"):
            a, b = torch.load(SHIPPED / name, weights_only=True), torch.load(fresh / name, weights_only=True)
            assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), f"{stale} ({name})"
        else:
            assert (SHIPPED / name).read_bytes() == (fresh / name).read_bytes(), f"{stale} ({name})"


def test_export_refuses_a_folder_that_is_not_a_bundle_and_overwrite_keeps_other_files(tiny_model_dir, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        export_bundle(tiny_model_dir, taken)
    with pytest.raises(ConfigError, match="no bundle"):
        export_bundle(tiny_model_dir, taken, overwrite=True)
    assert (taken / "notes.txt").read_text() == "mine"
    bundle = export_bundle(tiny_model_dir, tmp_path / "bundle")
    (bundle / "eval").mkdir()
    (bundle / "eval" / "case_seg.nii.gz").write_bytes(b"a user's result")
    export_bundle(tiny_model_dir, bundle, overwrite=True)
    assert (bundle / "eval" / "case_seg.nii.gz").read_bytes() == b"a user's result"
    assert all((bundle / f).is_file() for f in RUN_FILES)
    (bundle / "models" / "model.ts").write_bytes(b"exported from the old weights")
    export_bundle(tiny_model_dir, bundle, overwrite=True)
    assert not (bundle / "models" / "model.ts").exists()
    assert (bundle / "models" / "model.ts.stale").read_bytes() == b"exported from the old weights"
    assert not list(tmp_path.glob(".*tmp"))


def test_inferer_explains_wrong_inputs(tiny_ensemble):
    from monai.data import MetaTensor

    from medseg.export.bundle import bundle_network
    from medseg.inference.bundle import SliceEnsembleInferer

    network, _ = bundle_network(load_model(tiny_ensemble))
    inferer = SliceEnsembleInferer()
    with pytest.raises(TypeError, match="SliceEnsemble"):
        inferer(MetaTensor(torch.zeros(1, 1, 8, 8, 8)), torch.nn.Identity())
    with pytest.raises(ValueError, match="affine"):
        inferer(torch.zeros(1, 1, 8, 8, 8), network)


def test_slice_ensemble_inferer_in_a_plain_monai_pipeline(tiny_ensemble, synthetic_scans, tmp_path):
    """Without a bundle: build_transforms + load_slice_ensemble + SliceEnsembleInferer +
    Invertd give medseg segment's labels (before its post-processing, which is separate)."""
    from monai.transforms import Invertd

    from medseg.inference.bundle import PostprocessLabelsd, SliceEnsembleInferer
    from medseg.networks.ensemble import load_slice_ensemble
    from medseg.transforms import build_transforms

    spec = load_model(tiny_ensemble).spec
    transforms = build_transforms(spec, resample=False)
    data = transforms({"image": str(synthetic_scans / "oblique.nii.gz")})
    scores = SliceEnsembleInferer()(data["image"].unsqueeze(0), load_slice_ensemble(tiny_ensemble))[0]
    lut = torch.tensor(spec.label_values)
    data["pred"] = lut[scores.argmax(0, keepdim=True)].float()
    data = PostprocessLabelsd("pred", spec.postprocess, spec.label_values[1:])(data)
    data = Invertd("pred", transforms, orig_keys="image", nearest_interp=True)(data)
    segment(synthetic_scans / "oblique.nii.gz", tmp_path / "medseg", tiny_ensemble, formats="nifti")
    expected = np.asarray(nib.load(tmp_path / "medseg" / "oblique.nii.gz").dataobj)
    assert len(np.unique(expected)) > 1  # an untrained network that still draws boundaries
    got = data["pred"][0].numpy().astype(np.uint8)
    assert got.shape == expected.shape and (got == expected).mean() == 1, ((got == expected).mean(), np.unique(got))
