"""Model factories of the zoo: Hugging Face transformers architectures built from a config (no download) and a
few networks written here (recurrent, multi-input/multi-output, dict output). Random init, seeded.

Recipes name them as `benchmarks.zoo.models:CALLABLE` with `[model] factory_args`, e.g.

    factory = "benchmarks.zoo.models:hf"
    factory_args = { model_class = "ResNetForImageClassification", config = { depths = [2, 2, 2, 2] } }
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


def generated_images(count: int, seed: int, size: int = 224) -> np.ndarray:
    """Seeded images with image-like structure: smooth colour fields plus edges and a little noise, normalised
    roughly like ImageNet inputs (mean 0, std 1 per channel), float32 NCHW."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(count, 3, 7, 7)).astype(np.float32)
    images = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(size, size), mode="bicubic", align_corners=False)
    images = images.numpy()
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(count):  # a few hard edges (object boundaries) per image
        for _ in range(3):
            a, b, c = rng.normal(size=3)
            mask = ((a * xs + b * ys + 0.3 * c) > 0).astype(np.float32)
            images[i] += mask[None] * rng.normal(size=(3, 1, 1)).astype(np.float32)
    images += 0.1 * rng.normal(size=images.shape).astype(np.float32)
    images -= images.mean(axis=(0, 2, 3), keepdims=True)
    images /= images.std(axis=(0, 2, 3), keepdims=True)
    return images.astype(np.float32)


def token_batch(count: int, seed: int, length: int, vocab: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Seeded token ids (Zipf-like frequencies, as in text) with right padding and the matching attention mask."""
    rng = np.random.default_rng(seed)
    ranks = np.minimum(rng.zipf(1.3, size=(count, length)), vocab - 4) + 3  # ids 0-2 stay free for special tokens
    lengths = rng.integers(length // 4, length + 1, size=count)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ranks, pad_id).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask}


def _set_batchnorm_statistics(model: nn.Module, image_size: int, seed: int) -> None:
    """Running BatchNorm statistics from generated images, as a trained network would carry: with the
    freshly initialised mean 0 / variance 1 the activations of deep CNNs drift far from any real model's."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for batch in range(1):
            model(torch.from_numpy(generated_images(16, seed + 1000 + batch, image_size)))
    model.eval()


def hf(model_class: str, config: dict[str, Any] | None = None, seed: int = 0, image_size: int | None = None,
       module: str | None = None, unit_norm_scales: bool = False) -> nn.Module:
    """A transformers model built from its config class (`model_class` without 'For...' + 'Config') and `config`.

    `module`: where the class lives when transformers does not export it at the top (e.g. WhisperEncoder).
    `image_size`: for CNNs with BatchNorm, the size of the images their BatchNorm statistics are set from.
    `unit_norm_scales`: BatchNorm scales 1 and shifts 0 (PyTorch's own init) where the transformers init draws
    the scales from N(0, 0.02) (EfficientNet, MobileViT): multiplied over dozens of layers those make the
    logits vanish (~1e-30), which no trained network has."""
    import importlib

    import transformers

    owner = importlib.import_module(module) if module else transformers
    cls = getattr(owner, model_class)
    config_cls = cls.config_class
    settings = dict(config or {})
    torch.manual_seed(seed)
    model = cls(config_cls(**settings)).eval()
    if unit_norm_scales:
        for norm in model.modules():
            if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.affine:
                nn.init.ones_(norm.weight)
                nn.init.zeros_(norm.bias)
    if image_size:
        _set_batchnorm_statistics(model, image_size, seed)
    return model


class Recurrent(nn.Module):
    """A sequence classifier: LSTM or GRU layers over feature frames, the last state into a linear head."""

    def __init__(self, kind: str, features: int, hidden: int, layers: int, classes: int, bidirectional: bool) -> None:
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[kind]
        self.rnn = rnn(features, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), classes)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        sequence, _ = self.rnn(frames)
        return self.head(sequence[:, -1])


def recurrent(kind: str = "lstm", features: int = 40, hidden: int = 128, layers: int = 2, classes: int = 12,
              bidirectional: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Recurrent(kind, features, hidden, layers, classes, bidirectional).eval()


class ImageAndMetadata(nn.Module):
    """Two inputs (an image and a metadata vector), two outputs (class logits and a 4-value box regression)."""

    def __init__(self, width: int, meta: int, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width * 2, 3, stride=2, padding=1), nn.BatchNorm2d(width * 2), nn.ReLU(),
            nn.Conv2d(width * 2, width * 4, 3, stride=2, padding=1), nn.BatchNorm2d(width * 4), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.meta = nn.Sequential(nn.Linear(meta, width * 2), nn.ReLU())
        self.classes = nn.Linear(width * 6, classes)
        self.box = nn.Linear(width * 6, 4)

    def forward(self, image: torch.Tensor, metadata: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        joint = torch.cat([self.features(image), self.meta(metadata)], dim=1)
        return self.classes(joint), torch.sigmoid(self.box(joint))


def image_and_metadata(width: int = 32, meta: int = 16, classes: int = 20, image_size: int = 96, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ImageAndMetadata(width, meta, classes)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(generated_images(32, seed + 1000, image_size)), torch.randn(32, meta))
    return model.eval()


class DictOutput(nn.Module):
    """A small transformer encoder over feature vectors that returns a dict: {'embedding', 'scores'}."""

    def __init__(self, features: int, width: int, layers: int, heads: int, classes: int) -> None:
        super().__init__()
        self.project = nn.Linear(features, width)
        layer = nn.TransformerEncoderLayer(width, heads, width * 4, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.scores = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.norm(self.encoder(self.project(tokens)))
        pooled = hidden.mean(dim=1)
        return {"embedding": pooled, "scores": self.scores(pooled)}


def dict_output(features: int = 32, width: int = 128, layers: int = 2, heads: int = 4, classes: int = 8,
                seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return DictOutput(features, width, layers, heads, classes).eval()
