"""Batched 2D augmentation: parameters are sampled first from a seeded generator, then
applied deterministically, so a run is reproducible and every sample's transform is known."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medseg.training.config import AugmentConfig


def _uniform(gen: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def augment_batch(
    images: torch.Tensor, labels: torch.Tensor, config: AugmentConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment images (N, C, H, W) float and labels (N, 1, H, W) integer together.

    Spatial: flips on the allowed axes, rotation and isotropic scaling about the centre
    (bilinear for images with border padding, nearest for labels). Intensity: a random
    gain, offset and gamma on the image's own range, and Gaussian noise.
    """
    n = images.shape[0]
    apply = torch.rand(n, generator=gen) < config.probability
    angle = torch.where(apply, _uniform(gen, n, -1, 1) * math.radians(config.rotate_degrees), 0.0)
    scale = torch.where(apply, _uniform(gen, n, *config.scale), 1.0)
    flips = [torch.rand(n, generator=gen) < 0.5 for _ in config.flip_axes]
    # affine_grid maps output to input coordinates in (x=columns, y=rows) order.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    for axis, flip in zip(config.flip_axes, flips):
        sign = torch.where(flip & apply, -1.0, 1.0)
        column = 1 if axis == 0 else 0  # rows are y (theta column 1), columns are x
        theta[:, :, column] *= sign[:, None]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    labels = F.grid_sample(labels.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)

    gain = 1 + _uniform(gen, n, -1, 1) * config.intensity_scale
    offset = _uniform(gen, n, -1, 1) * config.intensity_shift
    gamma = torch.exp(_uniform(gen, n, math.log(config.gamma[0]), math.log(config.gamma[1])))
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    span = (images.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(1e-6)
    shaped = ((images - low) / span) ** gamma[:, None, None, None] * span + low
    images = torch.where(apply[:, None, None, None], shaped, images)
    images = images * gain[:, None, None, None] + offset[:, None, None, None]
    noise = (
        torch.randn(images.shape, generator=gen)
        * (torch.rand(n, generator=gen) * config.noise_std)[:, None, None, None]
    )
    return images + noise, labels.round().long()
