"""Contract tests for ArticleUNet: layout (parameter counts), shapes, gradients, export."""

import numpy as np
import pytest
import torch
from monai.inferers import SliceInferer, SlidingWindowInferer

from medseg.networks import ArticleUNet


@pytest.mark.parametrize(
    ("kwargs", "count"),
    [
        ({"in_channels": 1, "out_channels": 2}, 37_662_274),
        ({"in_channels": 3, "out_channels": 1}, 37_663_361),  # the tutorial's own configuration
        ({"in_channels": 1, "out_channels": 3, "base_channels": 32}, 9_421_635),
    ],
)
def test_parameter_counts_pin_the_layout(kwargs, count):
    net = ArticleUNet(**kwargs)
    assert sum(p.numel() for p in net.parameters()) == count


@pytest.mark.parametrize(("h", "w"), [(16, 16), (48, 64), (80, 32)])
def test_output_has_input_size_and_out_channels(h, w):
    net = ArticleUNet(2, 5, base_channels=4).eval()
    with torch.no_grad():
        y = net(torch.randn(3, 2, h, w))
    assert y.shape == (3, 5, h, w)


def test_depth_changes_size_multiple():
    net = ArticleUNet(1, 2, base_channels=4, depth=2).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 12, 20)).shape == (1, 2, 12, 20)
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.randn(1, 1, 14, 20))


def test_size_not_multiple_raises_clear_error():
    net = ArticleUNet(1, 2, base_channels=4)
    with pytest.raises(ValueError, match=r"multiples of 16 \(2\*\*depth\), got 40x50"):
        net(torch.randn(1, 1, 40, 50))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = ArticleUNet(1, 3, base_channels=4)
    loss = net(torch.randn(2, 1, 32, 32)).logsumexp(1).mean()
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="positive"):
        ArticleUNet(1, 0)


def test_torchscript_matches_eager():
    torch.manual_seed(0)
    net = ArticleUNet(1, 3, base_channels=4).eval()
    x = torch.randn(2, 1, 48, 32)
    scripted = torch.jit.script(net)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_onnx_export_matches_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net = ArticleUNet(1, 3, base_channels=4).eval()
    path = tmp_path / "unet.onnx"
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    torch.onnx.export(net, (torch.randn(2, 1, 48, 64),), str(path), dynamo=True, dynamic_shapes={"x": dims})
    session = ort.InferenceSession(str(path))
    x = torch.randn(3, 1, 32, 80)  # other batch and size than at export
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, net(x).numpy(), atol=1e-4, rtol=0)


def test_works_in_monai_sliding_window_inferer():
    torch.manual_seed(0)
    net = ArticleUNet(1, 2, base_channels=4).eval()
    inferer = SlidingWindowInferer(roi_size=(32, 32), sw_batch_size=4, overlap=0.25, mode="gaussian")
    with torch.no_grad():
        y = inferer(torch.randn(2, 1, 70, 45), net)
    assert y.shape == (2, 2, 70, 45)
    assert torch.isfinite(y).all()


def test_works_in_monai_slice_inferer():
    torch.manual_seed(0)
    net = ArticleUNet(1, 2, base_channels=4).eval()
    inferer = SliceInferer(roi_size=(32, 32), spatial_dim=2, sw_batch_size=4, overlap=0.25, mode="gaussian")
    with torch.no_grad():
        y = inferer(torch.randn(1, 1, 40, 48, 7), net)
    assert y.shape == (1, 2, 40, 48, 7)
