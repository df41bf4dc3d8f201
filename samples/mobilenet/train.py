"""Train the digits MobileNet and write its checkpoint, deterministically.

    python -m samples.mobilenet.train [--epochs 20] [--out samples/mobilenet/mobilenet.pt]

It trains on samples/digits/train.npz, degraded afresh every epoch as data.py describes (upscaled
to 32x32, rotated, scaled, shifted, uneven contrast, heavy noise), with the classic recipe for
small image classifiers: SGD with Nesterov momentum, weight decay 1e-4, a one-cycle schedule.
Seeded and deterministic on the CPU (about 4 minutes on two cores).

The peak learning rate is high (0.8). It leaves this network with what makes ImageNet
MobileNets hard to quantize per tensor: a few channels die (their ReLU6 is never positive), the
depthwise convolution after them sees a constant, and its BatchNorm (running variance near zero)
folds into weights with up to ~1200x the range of the smallest channel of that layer. Per-tensor
int8 weights, ONNX Runtime's default, then round most channels of that layer to zero:
quantize_static with its defaults agrees with the fp32 model on about 10% of the answers. At
lr 0.1 no channel dies (ranges within 8x), and every int8 method looks good on this network.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from samples.mobilenet.data import degrade, digits, load
from samples.mobilenet.model import build

SEED = 0


def train(images: np.ndarray, labels: np.ndarray, epochs: int, log: bool = True,
          val: tuple[np.ndarray, np.ndarray] | None = None, optimizer_name: str = "sgd", lr: float = 0.1,
          weight_decay: float = 5e-4, factory: Callable[[], nn.Module] = build) -> nn.Module:
    """images: the clean 8x8 digits (N, 1, 8, 8) in [0, 1]; each epoch sees a fresh degradation of them."""
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    model = factory().to(memory_format=torch.channels_last)  # faster convolutions on the CPU
    if optimizer_name == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                                                           weight_decay=weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(labels) / 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.2)
    y = torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(SEED)
    for epoch in range(epochs):
        model.train()
        x = torch.from_numpy(degrade(images, np.random.default_rng(1000 + epoch))).to(memory_format=torch.channels_last)
        for batch in torch.randperm(len(y), generator=generator).split(64):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if log and val is not None:
            model.eval()
            with torch.no_grad():
                accuracy = (model(torch.from_numpy(val[0])).argmax(1).numpy() == val[1]).mean()
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}, validation accuracy {accuracy:.4f}", flush=True)
    return model.to(memory_format=torch.contiguous_format).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "mobilenet.pt")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--lr", type=float, default=0.8)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    args = parser.parse_args()
    val = load("val")
    model = train(*digits("train"), epochs=args.epochs, val=val, optimizer_name=args.optimizer, lr=args.lr,
                  weight_decay=args.weight_decay)
    torch.save(model.state_dict(), args.out)
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(val[0])).argmax(1).numpy() == val[1]).mean()
    print(f"validation accuracy {accuracy:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
