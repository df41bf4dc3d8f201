"""A small vision transformer for the 8x8 digits images: conv stem, 64 pixel tokens, 4 blocks.

Sized so that compute, not per-call overhead, dominates its latency (about 120 M MACs per
image), which makes it a fair test of whether int8 pays off on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # sizes come from the tensors, not from the residual width, so whole heads can be pruned away
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        out = (weights.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, -1)
        return self.proj(out)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitsViT(nn.Module):
    """(N, 1, 8, 8) images scaled to [0, 1] -> (N, 10) logits."""

    def __init__(self, dim: int = 192, depth: int = 4, heads: int = 6) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, dim, 3, padding=1), nn.GELU())
        self.position = nn.Parameter(torch.zeros(1, 64, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)
        nn.init.trunc_normal_(self.position, std=0.02)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(image).flatten(2).transpose(1, 2) + self.position
        tokens = self.norm(self.blocks(tokens))
        return self.head(tokens.mean(1))


def build() -> DigitsViT:
    return DigitsViT()
