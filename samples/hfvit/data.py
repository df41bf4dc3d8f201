"""The digits of samples/digits at 32x32 for the Hugging Face ViT sample: each 8x8 image upscaled 4x
(every pixel a 4x4 block, one per ViT patch) and normalised to [-1, 1].

The recipe reads the splits through `data.py:calibration` and `data.py:validation`, which yield
{"image": N x 1 x 32 x 32 float32, "labels": N int64}.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

DIGITS = Path(__file__).resolve().parents[1] / "digits"


def upscale(images: np.ndarray) -> np.ndarray:
    """(N, 1, 8, 8) in [0, 1] -> (N, 1, 32, 32) in [-1, 1]."""
    big = np.kron(images, np.ones((1, 1, 4, 4), np.float32))
    return ((big - 0.5) / 0.5).astype(np.float32)


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(DIGITS / f"{split}.npz") as data:
        return upscale(data["image"]), data["labels"].astype(np.int64)


def _batches(split: str, batch: int = 64) -> Iterator[dict[str, np.ndarray]]:
    images, labels = load(split)
    for start in range(0, len(labels), batch):
        yield {"image": images[start:start + batch], "labels": labels[start:start + batch]}


def calibration() -> Iterator[dict[str, np.ndarray]]:
    return _batches("calib")


def validation() -> Iterator[dict[str, np.ndarray]]:
    return _batches("val")


def train() -> Iterator[dict[str, np.ndarray]]:
    """The training split, for distilling a pruned model."""
    return _batches("train")
