"""Train the Hugging Face ViT on the 32x32 digits of data.py and write vit.pt, deterministically.

    python -m samples.hfvit.train [--epochs 30] [--out samples/hfvit/vit.pt]

Every epoch sees the 8x8 images shifted by up to a pixel before upscaling; AdamW with a one-cycle
schedule and label smoothing, the usual recipe for a small ViT. A few minutes on two cores.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from samples.hfvit.data import DIGITS, load, upscale
from samples.hfvit.model import build

SEED = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "vit.pt")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    with np.load(DIGITS / "train.npz") as data:
        images, y = data["image"], torch.from_numpy(data["labels"].astype(np.int64))
    val_x, val_y = load("val")
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    steps = args.epochs * math.ceil(len(y) / 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    for epoch in range(args.epochs):
        model.train()
        dy, dx = rng.integers(-1, 2, (2, len(images)))
        x = torch.from_numpy(upscale(np.stack([np.roll(im, (a, b), axis=(1, 2)) for im, a, b in zip(images, dy, dx, strict=True)])))
        for batch in torch.randperm(len(y), generator=generator).split(64):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(torch.from_numpy(val_x)).argmax(1).numpy() == val_y).mean()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, validation accuracy {accuracy:.4f}", flush=True)
    torch.save(model.state_dict(), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
