"""The digits of samples/digits as a camera might see them, for the MobileNet sample: upscaled to 32x32,
randomly rotated, scaled and shifted, with uneven contrast and background and sensor noise (see `degrade`).

A harder task than the clean 8x8 digits, so that, as on ImageNet, many images sit near a decision
boundary. The splits are made deterministically (seeded) from samples/digits/{train,calib,val}.npz, so
no second copy of the images is stored; the recipe reads them through the callables
`data.py:calibration` and `data.py:validation`, which yield batches {"image": N x 1 x 32 x 32 float32,
"labels": N int64}.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

DIGITS = Path(__file__).resolve().parents[1] / "digits"
SIZE = 32


def _bilinear(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of bilinear interpolation with half-pixel centres (align_corners=False)."""
    matrix = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        x = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1.0)
        low = int(np.floor(x))
        high = min(low + 1, n_in - 1)
        matrix[i, low] += 1.0 - (x - low)
        matrix[i, high] += x - low
    return matrix


def upscale(images: np.ndarray, size: int = SIZE) -> np.ndarray:
    """(N, 1, h, w) images in [0, 1] -> (N, 1, size, size) in [-1, 1]."""
    rows, cols = _bilinear(images.shape[2], size), _bilinear(images.shape[3], size)
    big = np.einsum("ih,nchw,jw->ncij", rows, images.astype(np.float64), cols)
    return ((big - 0.5) / 0.5).astype(np.float32)


SEEDS = {"val": 1, "calib": 2}


def digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 images (N, 1, 8, 8) in [0, 1] and labels of a split of samples/digits."""
    with np.load(DIGITS / f"{split}.npz") as data:
        return data["image"].astype(np.float32), data["labels"].astype(np.int64)


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split as the model sees it: "val" and "calib" degraded with their own seed, "train" once with seed 0
    (training draws fresh degradations every epoch)."""
    images, labels = digits(split)
    return degrade(images, np.random.default_rng(SEEDS.get(split, 0))), labels


def _batches(split: str, batch: int = 64) -> Iterator[dict[str, np.ndarray]]:
    images, labels = load(split)
    for start in range(0, len(labels), batch):
        yield {"image": images[start:start + batch], "labels": labels[start:start + batch]}


def calibration() -> Iterator[dict[str, np.ndarray]]:
    return _batches("calib")


def validation() -> Iterator[dict[str, np.ndarray]]:
    return _batches("val")


def _sample(images: np.ndarray, sy: np.ndarray, sx: np.ndarray) -> np.ndarray:
    """Bilinear sampling of (N, H, W) images at (N, h, w) coordinates; zero outside."""
    n, height, width = images.shape
    y0, x0 = np.floor(sy).astype(int), np.floor(sx).astype(int)
    out = np.zeros(sy.shape, np.float64)
    batch = np.arange(n)[:, None, None]
    for dy in (0, 1):
        for dx in (0, 1):
            yy, xx = y0 + dy, x0 + dx
            weight = (1 - np.abs(sy - yy)) * (1 - np.abs(sx - xx))
            inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
            out += np.where(inside, weight * images[batch, np.clip(yy, 0, height - 1), np.clip(xx, 0, width - 1)], 0.0)
    return out


def degrade(images: np.ndarray, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """(N, 1, h, w) digits in [0, 1] -> (N, 1, size, size), as a camera might see them: upscaled, then a random
    rotation (+-15 degrees), scale (0.85-1.15) and shift (+-3 px), uneven contrast and background, and sensor noise;
    normalised like the clean images ((x - 0.5) / 0.5)."""
    n = len(images)
    big = upscale(images, size)[:, 0].astype(np.float64) * 0.5 + 0.5
    theta = np.deg2rad(rng.uniform(-15, 15, n))[:, None, None]
    scale = rng.uniform(0.85, 1.15, n)[:, None, None]
    shift = rng.uniform(-3, 3, (n, 2))
    centre = (size - 1) / 2
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    u, v = xs[None] - centre - shift[:, 0, None, None], ys[None] - centre - shift[:, 1, None, None]
    sx = (np.cos(theta) * u + np.sin(theta) * v) / scale + centre
    sy = (-np.sin(theta) * u + np.cos(theta) * v) / scale + centre
    warped = _sample(big, sy, sx)
    contrast = rng.uniform(0.2, 1.0, n)[:, None, None]
    background = rng.uniform(0.0, 0.5, n)[:, None, None]
    seen = background + contrast * warped + rng.normal(0.0, 0.25, warped.shape)
    return ((seen[:, None] - 0.5) / 0.5).astype(np.float32)


def train(copies: int = 4, batch: int = 64) -> Iterator[dict[str, np.ndarray]]:
    """The training split degraded `copies` times with their own seeds (as training sees a fresh degradation every
    epoch), for distilling a pruned model."""
    images, labels = digits("train")
    for copy in range(copies):
        degraded = degrade(images, np.random.default_rng(100 + copy))
        for start in range(0, len(labels), batch):
            yield {"image": degraded[start:start + batch], "labels": labels[start:start + batch]}
