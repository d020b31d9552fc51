"""MONAI / PyTorch checkpoints into model folders: the layout read from the tensors, the
wrappers and prefixes training tools add, and clear refusals naming the checkpoint."""

import pytest
import torch
from helpers import make_geometry, phantom, write_nifti

from medseg.cli import main
from medseg.errors import ModelError
from medseg.export.checkpoint import import_checkpoint
from medseg.io.files import file_digest
from medseg.model import load_model, load_spec
from medseg.networks import ArticleUNet
from medseg.spec import NetworkSpec

LABELS = ["background", "left", "right"]


def _network(in_channels: int = 1, out_channels: int = 3, base: int = 4, depth: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return ArticleUNet(in_channels, out_channels, base, depth).eval()


def _same_outputs(network, folder, in_channels: int = 1) -> None:
    x = torch.randn(2, in_channels, 32, 48, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        torch.testing.assert_close(load_model(folder).network(x), network(x), rtol=0, atol=0)


def _import(checkpoint, output, labels=LABELS, **options):
    options = {"preset": "mr", "slice_axis": "sagittal", "window": (32, 32), **options}
    return import_checkpoint(checkpoint, output, labels, **options)


def test_plain_state_dict(tmp_path):
    network = _network()
    torch.save(network.state_dict(), tmp_path / "model.pt")
    spec = _import(tmp_path / "model.pt", tmp_path / "out", postprocess="largest_component", spacing=(1.0, 1.0))
    assert spec.network == NetworkSpec("ArticleUNet", 1, 3, 4, 2)
    assert [lab.name for lab in spec.labels] == LABELS and spec.slice_axis == "sagittal"
    assert spec.postprocess == "largest_component" and spec.spacing == (1.0, 1.0) and spec.name == "out"
    assert load_spec(tmp_path / "out") == spec and (tmp_path / "out" / "weights.safetensors").is_file()
    assert spec.provenance["imported_from"] == str((tmp_path / "model.pt").resolve())
    assert spec.provenance["imported_sha256"] == file_digest(tmp_path / "model.pt")
    _same_outputs(network, tmp_path / "out")


@pytest.mark.parametrize(
    ("wrap", "key", "prefixes"),
    [
        (lambda sd: {"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, "epoch": 3}, "model", []),
        (lambda sd: {"network": sd}, "network", []),
        (lambda sd: {"state_dict": sd, "epoch": 9}, "state_dict", []),
        (lambda sd: {f"module.{k}": v for k, v in sd.items()}, None, ["module."]),
        (lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}}, "model", ["module."]),
    ],
    ids=["monai-checkpoint-saver", "network", "state_dict", "ddp-prefix", "wrapped-ddp"],
)
def test_wrapped_and_prefixed_state_dicts(tmp_path, wrap, key, prefixes):
    network = _network(seed=1)
    torch.save(wrap(network.state_dict()), tmp_path / "checkpoint.pt")
    spec = _import(tmp_path / "checkpoint.pt", tmp_path / "out")
    assert spec.provenance["checkpoint_key"] == key and spec.provenance["stripped_prefixes"] == prefixes
    _same_outputs(network, tmp_path / "out")


def test_monai_unet_state_dict(tmp_path):
    """MONAI's own UNet class (not medseg's subclass) at the layout medseg's MonaiUNet uses."""
    from monai.networks.layers import Norm
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    network = UNet(2, 1, 3, channels=(4, 8, 16, 32), strides=(2, 2, 2), num_res_units=2, norm=Norm.BATCH).eval()
    torch.save({"network": network.state_dict()}, tmp_path / "model.pt")
    spec = _import(tmp_path / "model.pt", tmp_path / "out")
    assert spec.network == NetworkSpec("MonaiUNet", 1, 3, 4, 3)
    _same_outputs(network, tmp_path / "out")


def test_context_slices_set_the_scan_channels(tmp_path):
    torch.save(_network(in_channels=3).state_dict(), tmp_path / "model.pt")
    spec = _import(tmp_path / "model.pt", tmp_path / "ctx", context_slices=1)
    assert spec.context_slices == 1 and spec.image_channels == 1 and spec.network.in_channels == 3
    with pytest.raises(ModelError) as info:
        _import(tmp_path / "model.pt", tmp_path / "bad", context_slices=2)
    text = str(info.value)
    assert text.startswith(str(tmp_path / "model.pt")) and "3 input channels" in text and "= 5" in text
    assert "--context-slices" in text and not (tmp_path / "bad").exists()


def test_label_count_must_match_the_output_channels(tmp_path):
    torch.save(_network().state_dict(), tmp_path / "model.pt")
    with pytest.raises(ModelError) as info:
        _import(tmp_path / "model.pt", tmp_path / "out", labels=["background", "hippocampus"])
    text = str(info.value)
    assert text.startswith(f"{tmp_path / 'model.pt'}: ") and "3 output channels" in text and "2 labels" in text
    assert not (tmp_path / "out").exists()


class Smuggled:
    """Stands in for an object a malicious checkpoint would carry."""


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": _network().state_dict(), "trainer": Smuggled()}, tmp_path / "model.pt")
    with pytest.raises(ModelError, match=r"model\.pt: was refused.*weights_only=True"):
        _import(tmp_path / "model.pt", tmp_path / "out")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ({"epoch": 3, "optimizer": {}}, "holds no network state dict"),
        ([torch.zeros(3)], "holds a list, not a network state dict"),
        ({"weight": torch.zeros(3, 3)}, "holds no 2D convolution weights"),
        (
            torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(4, 3, 1)).state_dict(),
            "does not fit a network medseg knows; the closest",
        ),
    ],
    ids=["no-state-dict", "a-list", "no-convolutions", "unknown-network"],
)
def test_what_is_not_a_known_network_is_refused(tmp_path, content, needle):
    torch.save(content, tmp_path / "model.pt")
    with pytest.raises(ModelError, match=needle) as info:
        _import(tmp_path / "model.pt", tmp_path / "out")
    assert str(info.value).startswith(str(tmp_path / "model.pt"))


def test_network_option_restricts_the_match(tmp_path):
    torch.save(_network().state_dict(), tmp_path / "model.pt")
    assert _import(tmp_path / "model.pt", tmp_path / "a", network="ArticleUNet").network.name == "ArticleUNet"
    with pytest.raises(
        ModelError,
        match=r"does not fit MonaiUNet; the closest, MonaiUNet\(in=1, out=3, base=4, depth=1\).*missing tensor",
    ):
        _import(tmp_path / "model.pt", tmp_path / "b", network="MonaiUNet")


def test_existing_output_is_refused_without_overwrite(tmp_path):
    torch.save(_network().state_dict(), tmp_path / "model.pt")
    _import(tmp_path / "model.pt", tmp_path / "out")
    before = (tmp_path / "out" / "model.json").read_text()
    with pytest.raises(ModelError, match="not empty"):
        _import(tmp_path / "model.pt", tmp_path / "out", slice_axis="axial")
    assert (tmp_path / "out" / "model.json").read_text() == before
    assert _import(tmp_path / "model.pt", tmp_path / "out", slice_axis="axial", overwrite=True).slice_axis == "axial"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "out"]


def test_cli_import_then_segment(tmp_path, capsys):
    torch.save({"model": _network(base=4, depth=4).state_dict()}, tmp_path / "model.pt")
    model = tmp_path / "imported"
    args = ["import", str(tmp_path / "model.pt"), "-o", str(model), "--labels", "background,left,right"]
    args += ["--preset", "mr", "--slice-axis", "sagittal", "--window", "64,64", "--name", "Hippo"]
    assert main(args) == 0
    assert "ArticleUNet in=1 base=4 depth=4" in capsys.readouterr().out
    assert load_spec(model).name == "Hippo"
    geometry = make_geometry((20, 24, 9))
    scan = write_nifti(tmp_path / "scan.nii.gz", phantom(geometry.shape), geometry)
    assert main(["segment", str(scan), "-o", str(tmp_path / "out"), "--model", str(model)]) == 0
    assert (tmp_path / "out" / "scan.nii.gz").is_file()


def test_cli_import_errors_exit_2_with_one_line(tmp_path, caplog, capsys):
    torch.save(_network().state_dict(), tmp_path / "model.pt")
    base = ["import", str(tmp_path / "model.pt"), "-o", str(tmp_path / "out"), "--preset", "mr"]
    base += ["--slice-axis", "axial"]
    assert main([*base, "--labels", "background,fg", "--window", "32,32"]) == 2
    assert "model.pt: holds a network with 3 output channels" in caplog.text and "Traceback" not in caplog.text
    assert main([*base, "--labels", "a,b,c", "--window", "30,30"]) == 2  # not a multiple of 2**depth
    assert "window (30, 30) must be two positive multiples of 4" in caplog.text
    assert not (tmp_path / "out").exists()
    for options, needle in [
        (["--network", "ResNet"], "unknown network 'ResNet'"),
        (["--context-slices", "-1"], "0 or more"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main([*base, "--labels", "a,b,c", *options])
        assert exit_.value.code == 2 and needle in capsys.readouterr().err
