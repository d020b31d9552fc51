"""The 2D U-Net of the PyTorch tutorial "Unet医疗影像分割", with its layout made exact.

The tutorial's network differs from the original U-Net in three ways that matter for
reproducing it: it downsamples with a stride-2 3x3 convolution instead of max-pooling, it
upsamples with a 3x3 transposed convolution (stride 2, output padding 1), and every
convolution is followed by batch norm and ReLU except the final 1x1 classifier.
"""

from __future__ import annotations

import torch
from torch import nn

from medseg.networks.sizes import check_input_size


def _conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]


class DownLevel(nn.Module):
    """Two 3x3 conv+BN+ReLU (the skip), then a stride-2 3x3 conv+BN+ReLU (the way down).

    (N, in_ch, H, W) -> skip (N, ch, H, W), down (N, ch, H/2, W/2)
    """

    def __init__(self, in_ch: int, ch: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(*_conv_bn_relu(in_ch, ch), *_conv_bn_relu(ch, ch))
        self.down = nn.Sequential(*_conv_bn_relu(ch, ch, stride=2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.convs(x)
        return skip, self.down(skip)


class UpLevel(nn.Module):
    """Two 3x3 conv+BN+ReLU to 2*ch, a transposed conv to ch at twice the size, then concat.

    (N, in_ch, H, W) and skip (N, ch, 2H, 2W) -> (N, 2*ch, 2H, 2W)
    """

    def __init__(self, in_ch: int, ch: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(*_conv_bn_relu(in_ch, 2 * ch), *_conv_bn_relu(2 * ch, 2 * ch))
        self.up = nn.Sequential(
            nn.ConvTranspose2d(2 * ch, ch, kernel_size=3, stride=2, padding=1, output_padding=1),
            nn.BatchNorm2d(ch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.up(self.convs(x)), skip], dim=1)


class ArticleUNet(nn.Module):
    """The tutorial's U-Net, returning logits.

    With ``c_k = base_channels * 2**k``, down level ``k`` maps to ``c_k`` channels and halves
    the size with a stride-2 convolution; the first up level takes the ``c_{depth-1}``
    channels of the last down level, later ones the ``2*c_{k+1}`` channels of the previous
    concatenation; the head maps ``2*c_0`` to ``c_0``, ``c_0`` and then ``out_channels``.

    The tutorial pads its final 1x1 convolution by 1, which grows the output by two pixels
    per side so it no longer matches the input. This implementation uses padding 0: the
    output has exactly the input's height and width.

    Args:
        in_channels: input channels (1 for a plain 2D slice, 2k+1 with k context slices).
        out_channels: number of classes, background included.
        base_channels: ``c_0``; 64 in the tutorial.
        depth: number of down (and up) levels; H and W must be multiples of ``2**depth``.

    Shapes: (N, in_channels, H, W) -> (N, out_channels, H, W) logits.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2, base_channels: int = 64, depth: int = 4) -> None:
        super().__init__()
        if min(in_channels, out_channels, base_channels, depth) < 1:
            raise ValueError(
                "ArticleUNet needs positive in_channels, out_channels, base_channels and depth, "
                f"got {in_channels}, {out_channels}, {base_channels}, {depth}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.base_channels = base_channels
        self.depth = depth
        # H and W must be multiples of this (one halving per down level).
        self.size_multiple = 2**depth
        chans = [base_channels * 2**k for k in range(depth)]
        self.downs = nn.ModuleList(DownLevel(in_channels if k == 0 else chans[k - 1], chans[k]) for k in range(depth))
        ups = []
        for k in reversed(range(depth)):
            in_ch = chans[-1] if k == depth - 1 else 2 * chans[k + 1]
            ups.append(UpLevel(in_ch, chans[k]))
        self.ups = nn.ModuleList(ups)
        self.head = nn.Sequential(
            *_conv_bn_relu(2 * chans[0], chans[0]),
            *_conv_bn_relu(chans[0], chans[0]),
            nn.Conv2d(chans[0], out_channels, kernel_size=1, padding=0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x, self.size_multiple, "ArticleUNet")
        skips: list[torch.Tensor] = []
        for down in self.downs:
            skip, x = down(x)
            skips.append(skip)
        for i, up in enumerate(self.ups):
            x = up(x, skips[self.depth - 1 - i])
        return self.head(x)
