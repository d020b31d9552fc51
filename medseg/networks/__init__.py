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
    from medseg.networks.monai_unet import MonaiUNet  # MONAI's networks import slowly

    return MonaiUNet(spec.in_channels, spec.out_channels, spec.base_channels, spec.depth)


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
