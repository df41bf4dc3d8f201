"""A MobileNetV2-style network for the digits, upscaled to 32x32 (see data.py).

Inverted residual blocks (1x1 expansion, 3x3 depthwise, linear 1x1 projection), BatchNorm and
ReLU6 throughout, as in MobileNetV2 and EfficientNet-Lite: once BatchNorm is folded into the
convolutions these are the layers that static int8 finds hard (depthwise filters and the first
convolution, whose per-channel ranges differ widely).
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1,
            act: type[nn.Module] | None = nn.ReLU6) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expansion -> 3x3 depthwise -> linear 1x1 projection, with a residual connection where shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, act: type[nn.Module] = nn.ReLU6) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, act=act)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=act), conv_bn(hidden, cout, act=None)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


# (expansion, output channels, repeats, stride of the first repeat), MobileNetV2's table cut down for 32x32 inputs
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 2), (6, 96, 1, 1)]


class DigitsMobileNet(nn.Module):
    """(N, 1, 32, 32) images (data.py) -> (N, 10) logits; about 230k parameters, 10 M multiply-adds per image."""

    def __init__(self, stem: int = 32, head: int = 320) -> None:
        super().__init__()
        blocks: list[nn.Module] = [conv_bn(1, stem, 3)]
        cin = stem
        for expand, cout, repeats, stride in SETTINGS:
            for i in range(repeats):
                blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        blocks.append(conv_bn(cin, head))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(head, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pool(self.features(image)).flatten(1)))


def build() -> DigitsMobileNet:
    return DigitsMobileNet()
