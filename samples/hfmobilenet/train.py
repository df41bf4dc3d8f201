"""Train the Hugging Face MobileNetV2 on the degraded 32x32 digits and write its checkpoint, deterministically.

    python -m samples.hfmobilenet.train [--epochs 30] [--lr 0.03] [--out samples/hfmobilenet/mobilenet.pt]

The same data and recipe as samples/mobilenet/train.py (a fresh degradation every epoch, SGD with
Nesterov momentum, weight decay 5e-4, one-cycle schedule, peak learning rate 0.03), on transformers' MobileNetV2 (model.py).
transformers sets BatchNorm's running-statistics momentum to TensorFlow's 0.997 (0.003 in PyTorch's
terms), meant for long ImageNet runs; for this short training it is set back to PyTorch's 0.1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from samples.hfmobilenet.model import build
from samples.mobilenet.data import digits, load
from samples.mobilenet.train import train


def for_training() -> nn.Module:
    model = build()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "mobilenet.pt")
    args = parser.parse_args()
    val = load("val")
    model = train(*digits("train"), epochs=args.epochs, val=val, factory=for_training, lr=args.lr)
    torch.save(model.state_dict(), args.out)
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(val[0])).argmax(1).numpy() == val[1]).mean()
    print(f"validation accuracy {accuracy:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
