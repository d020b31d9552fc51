"""Networks: the article's 2D U-Net, built from a model specification by name."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from medseg.errors import ConfigError
from medseg.networks.article_unet import ArticleUNet
from medseg.spec import NetworkSpec


def _article_unet(spec: NetworkSpec) -> nn.Module:
    return ArticleUNet(spec.in_channels, spec.out_channels, spec.base_channels, spec.depth)


def _monai_unet(spec: NetworkSpec) -> nn.Module:
    """MONAI's UNet (2D, batch norm, two residual units per level) at the same widths:
    channels c_0..c_depth with c_k = base * 2**k, stride 2 between levels."""
    from monai.networks.layers import Norm
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        channels=tuple(spec.base_channels * 2**k for k in range(spec.depth + 1)),
        strides=(2,) * spec.depth,
        num_res_units=2,
        norm=Norm.BATCH,
    )


NETWORKS: dict[str, Callable[[NetworkSpec], nn.Module]] = {
    "ArticleUNet": _article_unet,
    "MonaiUNet": _monai_unet,
}


def build_network(spec: NetworkSpec) -> nn.Module:
    """A freshly initialised network as ``spec`` describes it (H, W multiples of 2**depth)."""
    if spec.name not in NETWORKS:
        raise ConfigError(f"unknown network {spec.name!r}; medseg knows {sorted(NETWORKS)}")
    return NETWORKS[spec.name](spec)


__all__ = ["NETWORKS", "ArticleUNet", "build_network"]
