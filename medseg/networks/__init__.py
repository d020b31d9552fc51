"""Networks: the article's 2D U-Net, built from a model specification by name."""

from __future__ import annotations

from torch import nn

from medseg.errors import ConfigError
from medseg.networks.article_unet import ArticleUNet
from medseg.spec import NetworkSpec

NETWORKS: dict[str, type[nn.Module]] = {"ArticleUNet": ArticleUNet}


def build_network(spec: NetworkSpec) -> nn.Module:
    """A freshly initialised network as ``spec`` describes it."""
    if spec.name not in NETWORKS:
        raise ConfigError(f"unknown network {spec.name!r}; medseg knows {sorted(NETWORKS)}")
    return NETWORKS[spec.name](
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        base_channels=spec.base_channels,
        depth=spec.depth,
    )


__all__ = ["NETWORKS", "ArticleUNet", "build_network"]
