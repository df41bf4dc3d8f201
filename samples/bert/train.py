"""Train the digits BERT encoder, plant the outlier channels, fine-tune, and write bert.pt, deterministically.

    python -m samples.bert.train [--epochs 20] [--tune-epochs 8] [--out samples/bert/bert.pt]

The encoder learns to classify the digits sentences of data.py through the linear classifier on its
mean-pooled embedding (the recipe deploys both outputs, logits and embedding). Pretrained encoders grow
their outlier channels while they train; here they are planted after training (model.plant_outliers) and the
network is fine-tuned with them, with the LayerNorm scales held almost fixed, as a pretrained model is
fine-tuned for a task. Every epoch sees the images shifted by up to a pixel. About 8 minutes on two cores.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from samples.bert.data import DIGITS, load, tokens
from samples.bert.model import Encoder, build, plant_outliers

SEED = 0
KEYS = ("input_ids", "position_ids", "attention_mask")


def fit(encoder: Encoder, images: np.ndarray, labels: torch.Tensor, epochs: int, lr: float, norm_lr: float,
        seed: int) -> None:
    val = load("val")
    norms = [p for n, p in encoder.named_parameters() if "LayerNorm" in n]
    others = [p for n, p in encoder.named_parameters() if "LayerNorm" not in n]
    optimizer = torch.optim.AdamW([{"params": others}, {"params": norms, "lr": norm_lr}], lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(labels) / 32)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[lr, norm_lr], total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        encoder.train()
        dy, dx = rng.integers(-1, 2, (2, len(images)))
        shifted = np.stack([np.roll(image, (y, x), axis=(1, 2)) for image, y, x in zip(images, dy, dx, strict=True)])
        ids, positions, mask = (torch.from_numpy(a) for a in tokens(shifted).values())
        for batch in torch.randperm(len(labels), generator=generator).split(32):
            loss = nn.functional.cross_entropy(encoder(ids[batch], positions[batch], mask[batch])[0], labels[batch])
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
            optimizer.step()
            schedule.step()
        encoder.eval()
        with torch.no_grad():
            logits = encoder(*(torch.from_numpy(val[k]) for k in KEYS))[0]
            accuracy = (logits.argmax(1).numpy() == val["labels"]).mean()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, validation accuracy {accuracy:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--tune-epochs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "bert.pt")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    with np.load(DIGITS / "train.npz") as digits:
        images, labels = digits["image"], torch.from_numpy(digits["labels"].astype(np.int64))
    encoder = build()
    fit(encoder, images, labels, args.epochs, lr=3e-4, norm_lr=3e-4, seed=SEED)
    plant_outliers(encoder)
    print("planted outlier channels; fine-tuning with them", flush=True)
    fit(encoder, images, labels, args.tune_epochs, lr=1e-4, norm_lr=1e-6, seed=SEED + 1)
    torch.save(encoder.state_dict(), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
