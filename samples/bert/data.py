"""The digits of samples/digits as token sequences, for the BERT sample.

Each 8x8 image becomes a "sentence": one token per lit pixel, in reading order, whose id is the pixel's
intensity (id = 1 + intensity, 1..16; 0 is padding, 1 the leading [CLS] token) and whose position id is
the pixel's place (1 + row * 8 + column; 0 for [CLS] and padding). Sentences are 20-45 tokens long and
padded to 64, so the attention mask matters as it does for real text. The recipe reads the splits
through `data.py:calibration` and `data.py:validation`, which yield {"input_ids", "position_ids",
"attention_mask"}, each N x 64 int64 (and "labels" for training).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

DIGITS = Path(__file__).resolve().parents[1] / "digits"
LENGTH = 64
VOCAB = 18
POSITIONS = 65


def tokens(images: np.ndarray) -> dict[str, np.ndarray]:
    """(N, 1, 8, 8) images in [0, 1] -> {input_ids, position_ids, attention_mask}, each (N, 64) int64."""
    levels = np.rint(images.reshape(len(images), 64) * 16).astype(np.int64)
    ids, positions, mask = (np.zeros((len(images), LENGTH), np.int64) for _ in range(3))
    for row, pixel in enumerate(levels):
        lit = np.flatnonzero(pixel)[: LENGTH - 1]
        n = len(lit) + 1
        ids[row, :n] = np.concatenate([[1], 1 + pixel[lit]])
        positions[row, 1:n] = 1 + lit
        mask[row, :n] = 1
    return {"input_ids": ids, "position_ids": positions, "attention_mask": mask}


def load(split: str) -> dict[str, np.ndarray]:
    with np.load(DIGITS / f"{split}.npz") as data:
        return {**tokens(data["image"]), "labels": data["labels"].astype(np.int64)}


def _batches(split: str, batch: int = 64, labels: bool = False) -> Iterator[dict[str, np.ndarray]]:
    data = load(split)
    keys = ["input_ids", "position_ids", "attention_mask"] + (["labels"] if labels else [])
    for start in range(0, len(data["labels"]), batch):
        yield {k: data[k][start:start + batch] for k in keys}


def calibration() -> Iterator[dict[str, np.ndarray]]:
    return _batches("calib")


def validation() -> Iterator[dict[str, np.ndarray]]:
    return _batches("val")


def train() -> Iterator[dict[str, np.ndarray]]:
    """The training split (with labels), for distilling a pruned encoder."""
    return _batches("train", labels=True)


def labelled_validation() -> Iterator[dict[str, np.ndarray]]:
    """The validation split with its labels, for gating a pruned encoder on task accuracy."""
    return _batches("val", labels=True)
