"""Per-image random numbers: where every random number of a sampling run comes from.

Image i of a run depends only on (seed, i): its initial noise, the noise of every sampling step
and its class label are drawn from generators seeded by a hash of (seed, i, stream). Batch size,
rank count and device therefore do not change any image. Noise is drawn on the CPU and moved to
the device, so a GPU run starts from the same noise as a CPU run. Samplers receive an
``ImageNoise`` (or a torch.Generator, or None) as ``generator=``; this module imports nothing of
the package.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# Independent random streams of one image.
STREAM_NOISE = 0  # initial x_T and every per-step noise, in the order the sampler asks
STREAM_LABEL = 1  # class label
STREAM_EXTRA = 2  # anything else a sampler needs (e.g. EDM churn); never shared with noise


def mixed_seed(*parts: int) -> int:
    """A 64-bit seed from non-negative integers, well mixed so that nearby tuples are unrelated."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return int(state[0]) | (int(state[1]) << 32)


def image_seed(seed: int, index: int, stream: int = STREAM_NOISE) -> int:
    """A 64-bit seed for one image's stream, a function of (seed, i, stream) alone."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and image index must be >= 0, got seed={seed}, index={index}")
    return mixed_seed(seed, index, stream)


def image_generator(seed: int, index: int, stream: int = STREAM_NOISE) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(image_seed(seed, index, stream))
    return gen


class ImageNoise:
    """Per-image random streams for one batch: row j of every draw comes from image indices[j].

    Samplers accept it wherever they take ``generator=``; each call of ``randn`` advances every
    image's own stream by one draw, so an image's noise sequence is the same in any batch.
    """

    def __init__(self, seed: int, indices: Sequence[int], stream: int = STREAM_NOISE):
        self.seed = int(seed)
        self.indices = [int(i) for i in indices]
        self.generators = [image_generator(seed, i, stream) for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def randn(self, shape, device=None, dtype=torch.float32) -> torch.Tensor:
        shape = tuple(shape)
        if shape[0] != len(self.generators):
            raise ValueError(
                f"asked for noise of batch {shape[0]} from streams of {len(self.generators)} images"
            )
        rows = [torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(rows).to(device=device, dtype=dtype)

    def randint(self, high: int, device=None) -> torch.Tensor:
        rows = [int(torch.randint(high, (1,), generator=g)) for g in self.generators]
        return torch.tensor(rows, dtype=torch.int64, device=device)


def standard_normal(shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """N(0, I) noise from ``generator``: None (torch's global RNG), a torch.Generator, or ImageNoise."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        out = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
        return out.to(device)
    return generator.randn(shape, device=device, dtype=dtype)


def image_labels(seed: int, indices: Sequence[int], num_classes: int, device=None) -> torch.Tensor:
    """Class label of each image, uniform over ``num_classes``, a function of (seed, i) alone."""
    return ImageNoise(seed, indices, STREAM_LABEL).randint(num_classes, device=device)
