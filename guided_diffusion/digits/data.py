"""The built-in ``digits`` data set: scikit-learn's bundled 8x8 handwritten digits, for offline runs.

``--data_dir digits`` gives the 1797 images at 8x8, ``--data_dir digits:SIZE`` the same images
upscaled (bilinear) to SIZE x SIZE. Pixels (0..16 in scikit-learn) are mapped linearly to [-1, 1]
and repeated over 3 channels, since ADM's networks take RGB; the labels are the digits 0-9.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

DIGITS_NAME = "digits"
DIGITS_NATIVE_SIZE = 8
DIGITS_NUM_CLASSES = 10
_DIGITS_MAX_VALUE = 16.0


def is_digits_spec(data_dir) -> bool:
    """Whether ``data_dir`` names the built-in data set (``digits`` or ``digits:SIZE``)."""
    return isinstance(data_dir, str) and (data_dir == DIGITS_NAME or data_dir.startswith(DIGITS_NAME + ":"))


def parse_digits_spec(spec: str) -> int:
    """The image size asked for by ``digits`` (8) or ``digits:SIZE``."""
    name, sep, size_text = spec.partition(":")
    if name != DIGITS_NAME:
        raise ValueError(f"{spec!r} is not the digits data set; use digits or digits:SIZE")
    if not sep:
        return DIGITS_NATIVE_SIZE
    try:
        size = int(size_text)
    except ValueError:
        raise ValueError(f"cannot read the size in {spec!r}; use e.g. digits:16 or digits:32") from None
    if size < DIGITS_NATIVE_SIZE:
        raise ValueError(
            f"{spec!r} asks for {size}x{size} images, smaller than the native 8x8; use digits or a size >= 8"
        )
    return size


def checked_digits_size(spec: str, image_size: int) -> int:
    """The size ``spec`` asks for, refused with one line unless it is the model's ``image_size``."""
    size = parse_digits_spec(spec)
    if size != image_size:
        hint = DIGITS_NAME if image_size == DIGITS_NATIVE_SIZE else f"{DIGITS_NAME}:{image_size}"
        raise ValueError(
            f"--data_dir {spec} gives {size}x{size} images but the model takes {image_size}x{image_size}; "
            f"use --data_dir {hint}"
        )
    return size


def digits_arrays(size: int = DIGITS_NATIVE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as (images float32 [1797, 3, size, size] in [-1, 1], labels int64 [1797])."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError("the digits data set needs scikit-learn; install it with pip install scikit-learn") from None
    bunch = load_digits()
    gray = torch.from_numpy(bunch.images.astype(np.float32))[:, None]  # [N, 1, 8, 8], 0..16
    images = gray * (2.0 / _DIGITS_MAX_VALUE) - 1.0
    if size != DIGITS_NATIVE_SIZE:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return images.repeat(1, 3, 1, 1).contiguous(), labels


class DigitsDataset(Dataset):
    """One rank's share of the digits: items (image [3, S, S], {"y": label} when class_cond).

    Keys are indices or (index, augmentation seed) pairs, as image_datasets' batch sampler makes them.
    """

    def __init__(self, size, class_cond=False, shard=0, num_shards=1, random_flip=False):
        images, labels = digits_arrays(size)
        self.images = images[shard::num_shards]
        self.labels = labels[shard::num_shards]
        self.class_cond = class_cond
        self.random_flip = random_flip

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        index, aug_seed = key if isinstance(key, tuple) else (key, None)
        image = self.images[index]
        if self.random_flip and random.Random(aug_seed).random() < 0.5:
            image = image.flip(-1)
        out = {"y": np.int64(self.labels[index])} if self.class_cond else {}
        return image, out
