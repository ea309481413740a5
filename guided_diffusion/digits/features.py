"""A small digit classifier whose penultimate layer gives features for a digits Frechet distance.

Inception features mean nothing on 8x8 digits, so the shipped demo scores samples with this
network instead: a Frechet distance between its 64-d features of generated and real digits,
computed with the evaluator's statistics code (evaluations.feature_statistics). The trained
weights ship in guided_diffusion/assets/digit_features.safetensors; ``train_digit_features``
retrains them (under a minute on a CPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from guided_diffusion.run.output import dequantize

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets"
FEATURES_FILE = ASSET_DIR / "digit_features.safetensors"
FEATURE_DIM = 64


class DigitFeatureNet(nn.Module):
    """Conv net on 8x8 gray digits in [-1, 1]: ``features`` (64-d) and class logits (10) from them."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.avg_pool2d(F.relu(self.conv2(h)), 2)
        return self.fc(h.flatten(1))  # before the ReLU: no dead units, so the covariance has full rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.features(x)))


def to_network_input(images) -> torch.Tensor:
    """uint8 NHWC samples (as in an NPZ) or float NCHW in [-1, 1], any size -> gray 8x8 in [-1, 1]."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 NHWC images, got {images.dtype} of shape {images.shape}")
        x = dequantize(images)
    else:
        x = images.float()
    x = x.mean(dim=1, keepdim=True)
    if x.shape[-1] != 8 or x.shape[-2] != 8:
        x = F.adaptive_avg_pool2d(x, 8)
    return x


def load_digit_features(path=FEATURES_FILE) -> DigitFeatureNet:
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise FileNotFoundError(f"digit feature weights {path} are missing; retrain with scripts/train_digits_models.py")
    net = DigitFeatureNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval()


@torch.no_grad()
def digit_features(net: DigitFeatureNet, images, batch_size: int = 512) -> np.ndarray:
    x = to_network_input(images)
    return np.concatenate(
        [net.features(x[i:i + batch_size]).double().numpy() for i in range(0, len(x), batch_size)]
    )


def train_digit_features(epochs: int = 15, seed: int = 0, holdout: int = 297):
    """Train on the digits (last ``holdout`` images held out); returns (net, held-out accuracy)."""
    from guided_diffusion.digits.data import digits_arrays

    images, labels = digits_arrays(8)
    x = images[:, :1]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen)
    x, labels = x[order], labels[order]
    train_x, train_y, test_x, test_y = x[:-holdout], labels[:-holdout], x[-holdout:], labels[-holdout:]
    torch.manual_seed(seed)
    net = DigitFeatureNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(train_x), generator=gen)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            # light noise so the features stay meaningful on imperfect samples
            inp = train_x[idx] + 0.1 * torch.randn(train_x[idx].shape, generator=gen)
            loss = F.cross_entropy(net(inp), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(test_x).argmax(1) == test_y).float().mean().item()
    return net, accuracy
