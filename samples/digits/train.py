"""Train the digits CNN and write its checkpoint and data splits, deterministically.

    python -m samples.digits.train [--out samples/digits]

Writes cnn.pt (a state_dict), train.npz, calib.npz and val.npz. Each .npz holds
"image" (float32, N x 1 x 8 x 8, pixel values scaled to [0, 1]) and "labels" (int64).
The images are the 8x8 handwritten digits bundled with scikit-learn (no download).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

from samples.digits.model import build

SEED = 0
VAL_SIZE = 450
CALIB_SIZE = 256


def load_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(labels))
    val, train = order[:VAL_SIZE], order[VAL_SIZE:]
    calib = train[:CALIB_SIZE]
    return {
        "train": (images[train], labels[train]),
        "calib": (images[calib], labels[calib]),
        "val": (images[val], labels[val]),
    }


def train(images: np.ndarray, labels: np.ndarray, epochs: int = 40) -> nn.Module:
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=epochs * ((len(labels) + 63) // 64))
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(y), generator=generator).split(64):
            # light augmentation: shift by up to one pixel
            dx, dy = torch.randint(-1, 2, (2,), generator=generator).tolist()
            inputs = torch.roll(x[batch], shifts=(dy, dx), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(inputs), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    splits = load_splits()
    for name, (images, labels) in splits.items():
        np.savez_compressed(args.out / f"{name}.npz", image=images, labels=labels)
    model = train(*splits["train"])
    torch.save(model.state_dict(), args.out / "cnn.pt")
    with torch.no_grad():
        images, labels = splits["val"]
        accuracy = (model(torch.from_numpy(images)).argmax(1).numpy() == labels).mean()
    print(f"validation accuracy {accuracy:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
