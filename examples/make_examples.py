"""Regenerate the bundled example models (run from the repo root; needs scikit-learn).

    pip install -e ".[examples]" && python examples/make_examples.py

Trains two small models on scikit-learn's 8x8 digits (seeded, CPU, ~20 s) and exports them with
sparsec's own torch capture path:
  digits_cnn.onnx   residual CNN (conv-bn-relu blocks with skip adds, global pool, linear head)
  digits_mlp.onnx   MLP 64-256-128-10 (Gemm -> ReLU -> Gemm chain)
  digits_calib.npz  64 training images for calibration, stacked on a leading axis
  digits_test.npz   the held-out images and labels (for accuracy)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from sparsec.frontends.torch import export_onnx

HERE = Path(__file__).parent


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


class DigitsCNN(nn.Module):
    def __init__(self, c: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU())
        self.block1, self.block2 = Block(c), Block(c)
        self.wide = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * c), nn.ReLU())
        self.head = nn.Linear(2 * c, 10)

    def forward(self, x):
        x = self.wide(self.block2(self.block1(self.stem(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class DigitsMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128),
                                 nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def main() -> None:
    from sklearn.datasets import load_digits  # only to regenerate; the models import without it

    torch.manual_seed(0)
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # [N, 1, 8, 8] in [0, 1]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(images))
    train_idx, test_idx = order[:1400], order[1400:]
    x, y = torch.from_numpy(images[train_idx]), torch.from_numpy(labels[train_idx])
    xt, yt = torch.from_numpy(images[test_idx]), torch.from_numpy(labels[test_idx])
    example = (xt[:1],)
    for name, model, epochs in (("digits_cnn", DigitsCNN(), 15), ("digits_mlp", DigitsMLP(), 30)):
        train(model, x, y, epochs)
        with torch.no_grad():
            acc = (model(xt).argmax(1) == yt).float().mean().item()
        print(f"{name}: test accuracy {acc:.4f}")
        proto = export_onnx(model, example, input_names=["image"])
        proto.ir_version = 10
        onnx.save(proto, HERE / f"{name}.onnx")
    np.savez(HERE / "digits_calib.npz", image=images[train_idx[:64]][:, None])  # not test data
    np.savez(HERE / "digits_test.npz", image=images[test_idx], label=labels[test_idx])


if __name__ == "__main__":
    main()
