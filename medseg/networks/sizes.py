"""The input-size rule the registry's U-Nets share, as one TorchScript-able check."""

from __future__ import annotations

import torch


def check_input_size(x: torch.Tensor, multiple: int, network: str) -> None:
    """ValueError unless the height and width of ``x`` (N, C, H, W) are multiples of
    ``multiple`` (2**depth: one halving per level). Without it a U-Net fails deep inside
    (torch.cat of skips of different sizes) or returns an output of another size."""
    if x.shape[-2] % multiple != 0 or x.shape[-1] % multiple != 0:
        raise ValueError(
            f"{network} input height and width must be multiples of {multiple} (2**depth), "
            f"got {x.shape[-2]}x{x.shape[-1]}; pad the slices (medseg's inference pads)"
        )
