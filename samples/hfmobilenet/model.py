"""Hugging Face transformers' MobileNetV2ForImageClassification built from a config (no download), for the
degraded 32x32 digits of samples/mobilenet/data.py: (N, 1, 32, 32) images -> (N, 10) logits.

Width multiplier 0.5 and an output stride of 8 (the last stages dilated instead of strided), so the
feature maps stay 4x4 at the end instead of 1x1 and the network does about 12 M multiply-adds per
image: an edge CNN whose latency is compute, not per-call overhead. Not written by this project: the
layers, padding and naming are transformers' own.
"""

from __future__ import annotations

import torch
from torch import nn


class DigitsHFMobileNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

        config = MobileNetV2Config(num_channels=1, image_size=32, depth_multiplier=0.5, output_stride=8,
                                   tf_padding=False, num_labels=10, classifier_dropout_prob=0.2)
        self.net = MobileNetV2ForImageClassification(config)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=image).logits


def build() -> DigitsHFMobileNet:
    torch.manual_seed(0)
    return DigitsHFMobileNet()
