"""Train the digits ViT on the digits sample's splits and write vit.pt (a state_dict), deterministically.

    python -m samples.vit.train [--epochs 40]

It reads samples/digits/{train,val}.npz, so the CNN and the ViT share their data.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from samples.vit.model import build

SEED = 0
DATA = Path(__file__).resolve().parents[1] / "digits"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "vit.pt")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    train, val = np.load(DATA / "train.npz"), np.load(DATA / "val.npz")
    x, y = torch.from_numpy(train["image"]), torch.from_numpy(train["labels"])
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    steps = args.epochs * math.ceil(len(y) / 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(SEED)
    for epoch in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(y), generator=generator).split(64):
            dx, dy = torch.randint(-1, 2, (2,), generator=generator).tolist()
            inputs = torch.roll(x[batch], shifts=(dy, dx), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(inputs), y[batch], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(torch.from_numpy(val["image"])).argmax(1).numpy() == val["labels"]).mean()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, validation accuracy {accuracy:.4f}", flush=True)
    torch.save(model.state_dict(), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
