"""The contract every registered network keeps (the segmentation_models_pytorch pattern).

Each test runs once per name in ``medseg.networks.NETWORKS``, built through
``build_network`` as the library builds it, so a network added to the registry is held to
the same contract without writing a test: forward and backward, channel counts, any input
size that is a multiple of ``2**depth``, the model-folder round trip (float32 and float16
storage), TorchScript, and deterministic eval mode. Widths are tiny (base 4) to stay fast on
CPU. Network-specific layout checks live beside each network (``test_article_unet.py``).
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medseg.model import init_model, load_model, save_model
from medseg.networks import NETWORKS, build_network
from medseg.spec import ModelSpec, NetworkSpec, labels_from_names

# Networks that check the input size themselves and raise a ValueError naming the size and
# the multiple. Others must fail inside torch or give an output of the input's size; never a
# silently different one.
CHECKS_INPUT_SIZE = {"ArticleUNet", "MonaiUNet"}


@pytest.fixture(params=sorted(NETWORKS))
def name(request) -> str:
    return request.param


def _spec(name: str, in_channels: int = 1, out_channels: int = 3, depth: int = 4) -> NetworkSpec:
    return NetworkSpec(name=name, in_channels=in_channels, out_channels=out_channels, base_channels=4, depth=depth)


def _build(spec: NetworkSpec, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # seeded weights, global RNG left as it was
        torch.manual_seed(seed)
        return build_network(spec)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _model_spec(network: NetworkSpec) -> ModelSpec:
    names = ["background", *(f"class{i}" for i in range(1, network.out_channels))]
    return ModelSpec(labels=labels_from_names(names), network=network, window=(64, 64))


def _train_step(net: nn.Module, spec: NetworkSpec) -> None:
    """One SGD step in train mode: moves the weights and the norm layers' running statistics
    away from their initial values, so a round trip cannot pass by re-initialising."""
    net.train()
    x = _randn(4, spec.in_channels, 32, 32, seed=1)
    target = torch.randint(0, spec.out_channels, (4, 32, 32), generator=torch.Generator().manual_seed(2))
    optimiser = torch.optim.SGD(net.parameters(), lr=0.1)
    F.cross_entropy(net(x), target).backward()
    optimiser.step()
    net.eval()


def test_forward_and_backward_reach_every_parameter(name):
    spec = _spec(name)
    net = _build(spec).train()
    x = _randn(2, 1, 32, 48)
    y = net(x)
    assert y.shape == (2, 3, 32, 48)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    target = torch.randint(0, 3, (2, 32, 48), generator=torch.Generator().manual_seed(1))
    F.cross_entropy(y, target).backward()
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    assert params
    assert not [n for n, p in params if p.grad is None], "parameters that the loss does not reach"
    assert not [n for n, p in params if not torch.isfinite(p.grad).all()], "non-finite gradients"
    # A bias followed by batch norm has a gradient that is zero up to rounding, so only
    # weight tensors (convolution kernels) are required to get a non-zero one.
    dead = [n for n, p in params if p.dim() > 1 and not p.grad.abs().sum() > 0]
    assert not dead, f"weights with an all-zero gradient: {dead}"


@pytest.mark.parametrize(("in_channels", "out_channels"), [(1, 2), (3, 1), (2, 5)])
def test_channel_counts(name, in_channels, out_channels):
    net = _build(_spec(name, in_channels, out_channels)).eval()
    with torch.no_grad():
        y = net(_randn(2, in_channels, 32, 32))
    assert y.shape == (2, out_channels, 32, 32)
    with pytest.raises(RuntimeError):  # the wrong number of input channels is never accepted
        net(_randn(2, in_channels + 1, 32, 32))


@pytest.mark.parametrize(
    ("depth", "size"),
    [(4, (16, 16)), (4, (16, 32)), (4, (48, 80)), (4, (64, 16)), (2, (12, 20)), (1, (2, 6))],
)
def test_any_multiple_of_two_to_the_depth_keeps_its_size(name, depth, size):
    net = _build(_spec(name, depth=depth)).eval()
    with torch.no_grad():
        y = net(_randn(1, 1, *size))
    assert y.shape == (1, 3, *size)


@pytest.mark.parametrize(("depth", "size"), [(4, (40, 50)), (4, (17, 16)), (4, (16, 24)), (4, (8, 8)), (2, (14, 20))])
def test_size_not_a_multiple_fails_loudly(name, depth, size):
    net = _build(_spec(name, depth=depth)).eval()
    x = _randn(1, 1, *size)
    if name in CHECKS_INPUT_SIZE:
        multiple, (h, w) = 2**depth, size
        with pytest.raises(ValueError, match=rf"multiples of {multiple} \(2\*\*depth\), got {h}x{w}"):
            net(x)
        return
    try:
        with torch.no_grad():
            y = net(x)
    except (ValueError, RuntimeError):
        return  # refused: acceptable, the caller pads (medseg's inference does)
    assert y.shape == (1, 3, *size), "a network that accepts any size must keep it"


def test_init_model_is_seeded_and_leaves_the_global_rng_alone(name, tmp_path):
    spec = _model_spec(_spec(name))
    rng = torch.get_rng_state()
    a, b = init_model(tmp_path / "a", spec, seed=1), init_model(tmp_path / "b", spec, seed=1)
    c = init_model(tmp_path / "c", spec, seed=2)
    assert torch.equal(torch.get_rng_state(), rng)
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256


def test_save_load_round_trip_is_exact(name, tmp_path):
    network = _spec(name)
    spec = _model_spec(network)
    init_model(tmp_path / "init", spec)
    net = load_model(tmp_path / "init").network
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    _train_step(net, network)
    state = net.state_dict()
    assert any(not torch.equal(state[k], initial[k]) for k in state), "the training step changed nothing"

    save_model(tmp_path / "trained", spec, net)
    loaded = load_model(tmp_path / "trained")
    assert loaded.spec.network == network
    assert not loaded.network.training
    loaded_state = loaded.network.state_dict()
    assert list(loaded_state) == list(state)
    for key, tensor in state.items():
        assert loaded_state[key].dtype == tensor.dtype, key
        assert torch.equal(loaded_state[key], tensor), key
    x = _randn(2, 1, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded.network(x), net(x), rtol=0, atol=1e-6)


def test_float16_storage_keeps_the_segmentation(name, tmp_path):
    network = _spec(name)
    spec = _model_spec(network)
    net = _build(network)
    _train_step(net, network)
    save_model(tmp_path / "full", spec, net)
    save_model(tmp_path / "half", spec, net, half=True)
    full_size = (tmp_path / "full" / "weights.safetensors").stat().st_size
    assert (tmp_path / "half" / "weights.safetensors").stat().st_size < 0.6 * full_size

    loaded = load_model(tmp_path / "half").network
    for (key, ours), theirs in zip(net.state_dict().items(), loaded.state_dict().values()):
        assert theirs.dtype == ours.dtype, key  # float16 on disk, float32 again once loaded
        torch.testing.assert_close(theirs, ours, rtol=1e-3, atol=1e-6, msg=key)
    x = _randn(4, 1, 64, 64)
    with torch.no_grad():
        agree = (loaded(x).argmax(1) == net(x).argmax(1)).float().mean()
    assert agree > 0.99  # near-ties in an untrained network may flip, nothing more


def test_torchscript_matches_eager(name):
    # Every registered network scripts (torch.jit.script keeps the input-size checks and
    # control flow that tracing would freeze), so no network falls back to tracing.
    net = _build(_spec(name, 2, 3)).eval()
    scripted = torch.jit.script(net)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    reloaded = torch.jit.load(buffer)
    for size in [(32, 48), (64, 16)]:
        x = _randn(2, 2, *size)
        with torch.no_grad():
            eager = net(x)
            torch.testing.assert_close(scripted(x), eager, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(reloaded(x), eager, rtol=1e-5, atol=1e-6)


def test_eval_mode_is_deterministic_and_leaves_state_alone(name):
    net = _build(_spec(name))
    _train_step(net, _spec(name))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = _randn(3, 1, 32, 32)
    with torch.no_grad():
        first, second = net(x), net(x)
    assert torch.equal(first, second)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items()), "eval forward changed the state"
    # In eval mode a slice's output must not depend on the slices batched with it.
    with torch.no_grad():
        torch.testing.assert_close(net(x[1:2]), first[1:2], rtol=1e-5, atol=1e-5)
