"""A small residual CNN for the 8x8 digits images bundled with scikit-learn."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(channels, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.bn2(self.conv2(self.conv1(x))))


class DigitsCNN(nn.Module):
    """(N, 1, 8, 8) images scaled to [0, 1] -> (N, 10) logits."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(1, width // 2), conv_bn(width // 2, width))
        self.block = ResidualBlock(width)
        self.pool = nn.MaxPool2d(2)
        self.head_conv = conv_bn(width, 2 * width)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.block(self.stem(image)))
        x = self.gap(self.head_conv(x)).flatten(1)
        return self.classifier(x)


def build() -> DigitsCNN:
    return DigitsCNN()
