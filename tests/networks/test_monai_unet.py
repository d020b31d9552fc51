"""MonaiUNet: MONAI's UNet with the input-size check, holding MONAI's own weights."""

import pytest
import torch
from monai.networks.layers import Norm
from monai.networks.nets import UNet

from medseg.model import load_model, save_model
from medseg.networks import build_network
from medseg.spec import ModelSpec, NetworkSpec, labels_from_names

SPEC = NetworkSpec(name="MonaiUNet", in_channels=1, out_channels=3, base_channels=4, depth=3)


def _plain_unet() -> UNet:
    """The network the registry built before the size check: weights saved from it must load."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        return UNet(2, 1, 3, channels=(4, 8, 16, 32), strides=(2, 2, 2), num_res_units=2, norm=Norm.BATCH)


def test_weights_of_monais_plain_unet_load_and_compute_the_same(tmp_path):
    plain = _plain_unet().eval()
    assert list(build_network(SPEC).state_dict()) == list(plain.state_dict())
    spec = ModelSpec(labels=labels_from_names(["background", "a", "b"]), network=SPEC, window=(32, 32))
    save_model(tmp_path / "m", spec, plain)
    loaded = load_model(tmp_path / "m").network
    x = torch.randn(2, 1, 24, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), plain(x), rtol=0, atol=0)


def test_size_error_is_clear_where_monai_fails_in_torch_cat():
    x = torch.zeros(1, 1, 20, 24)
    with pytest.raises(RuntimeError):  # what MONAI's own UNet does: a torch.cat size mismatch
        _plain_unet().eval()(x)
    with pytest.raises(ValueError, match=r"MonaiUNet input .* multiples of 8 \(2\*\*depth\), got 20x24; pad"):
        build_network(SPEC).eval()(x)
    scripted = torch.jit.script(build_network(SPEC).eval())
    with pytest.raises(Exception, match="multiples of 8"):  # scripted: torch.jit.Error
        scripted(x)
