"""Hugging Face transformers' ViTForImageClassification built from a config (no download), for the
32x32 digits of data.py: (N, 1, 32, 32) images -> (N, 10) logits.

A pre-LayerNorm encoder with GELU MLPs and a [CLS] token, as the pretrained ViT/DeiT checkpoints are,
at a size that trains on two cores: 4x4 patches (64 tokens + [CLS]), 4 blocks, width 192, 3 heads.
"""

from __future__ import annotations

import torch
from torch import nn


class DigitsViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(image_size=32, patch_size=4, num_channels=1, hidden_size=192, num_hidden_layers=4,
                           num_attention_heads=3, intermediate_size=768, num_labels=10,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        self.vit = ViTForImageClassification(config)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=image).logits


def build() -> DigitsViT:
    torch.manual_seed(0)
    return DigitsViT()
