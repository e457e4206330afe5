"""The lesion U-Net (step S300's fully convolutional encoder–decoder).

A stride-2 stem keeps the full-resolution cost low (the whole network works at H/2 and
below); five resolution levels (H/2 … H/32) give the receptive field large shadows need; the
decoder upsamples bilinearly, concatenates the skip and runs two 3×3 convolutions; the head
upsamples to H×W. ``Exported`` wraps it with the per-image normalisation and the sigmoid, so
the ONNX graph takes the S200 image in [0, 1] and returns probabilities.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

WIDTHS = (16, 32, 64, 128, 192)


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Logits (N, channels, H, W) for an input normalised per image (N, 1, H, W)."""

    def __init__(self, channels: int = 3, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        self.widths = tuple(widths)
        self.stem = _block(1, widths[0], stride=2)
        self.down = nn.ModuleList(
            _block(widths[i], widths[i + 1], stride=2) for i in range(len(widths) - 1)
        )
        self.up = nn.ModuleList(
            _block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(len(widths) - 1))
        )
        self.head = nn.Sequential(
            nn.Conv2d(widths[0] + 1, widths[0], 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(widths[0], channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(x)[0]

    def decode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and the decoder's outputs, coarsest first (H/16 … H/2 with five levels)."""
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(skips[-1]))
        y = skips.pop()
        decoded = []
        for block in self.up:
            skip = skips.pop()
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], dim=1))
            decoded.append(y)
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(torch.cat([y, x], dim=1)), decoded


def normalise(image: torch.Tensor) -> torch.Tensor:
    """Per-image zero mean, unit variance: the S200 window differs between sources."""
    mean = image.mean(dim=(1, 2, 3), keepdim=True)
    std = image.std(dim=(1, 2, 3), keepdim=True)
    return (image - mean) / (std + 1e-3)


class Exported(nn.Module):
    """What goes into the ONNX file: [0, 1] image in, sigmoid probabilities out."""

    def __init__(self, net: UNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(normalise(image)))


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
