"""MONAI's 2D UNet with medseg's input-size check, at the widths of the article's network."""

from __future__ import annotations

import torch
from monai.networks.layers import Norm
from monai.networks.nets import UNet

from medseg.networks.sizes import check_input_size


class MonaiUNet(UNet):
    """MONAI's UNet (2D, batch norm, two residual units per level): channels c_0..c_depth
    with c_k = base * 2**k, stride 2 between levels, returning logits.

    A subclass rather than a wrapper so the state-dict keys stay MONAI's (``model.0...``):
    weights saved from a plain ``monai.networks.nets.UNet`` still load.

    Shapes: (N, in_channels, H, W) -> (N, out_channels, H, W) logits; H and W must be
    multiples of ``2**depth`` (ValueError naming the size otherwise).
    """

    def __init__(self, in_channels: int, out_channels: int, base_channels: int, depth: int) -> None:
        super().__init__(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=tuple(base_channels * 2**k for k in range(depth + 1)),
            strides=(2,) * depth,
            num_res_units=2,
            norm=Norm.BATCH,
        )
        self.size_multiple = 2**depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x, self.size_multiple, "MonaiUNet")
        return self.model(x)
