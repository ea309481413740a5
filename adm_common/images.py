"""ADM's image preparation, shared by training data (guided_diffusion.image_datasets) and reference
batches (evaluations.reference_batch): which files are images, their order, and the crops.

The file order decides which rank reads which file, and the crops decide every pixel a model
sees or a reference batch holds, so both are ADM's exactly.
"""

from __future__ import annotations

import math
import os
import random

import numpy as np
from PIL import Image

from adm_common.errors import UsageError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")


def _list_image_files_recursively(data_dir):
    """ADM's file list: the folder's entries in sorted name order, an image (.jpg, .jpeg, .png,
    .gif, any case) taken as it comes and a sub-folder listed in its place, recursively."""
    found = []
    for name in sorted(os.listdir(data_dir)):
        path = os.path.join(data_dir, name)
        if "." in name and name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS:
            found.append(path)
        elif os.path.isdir(path):
            found.extend(_list_image_files_recursively(path))
    return found


def list_image_files_recursively(data_dir) -> list[str]:
    """ADM's list of the images under ``data_dir``; a missing folder or one without images is an error."""
    if os.path.isfile(data_dir):
        raise UsageError(f"data directory {data_dir} is a file; pass --data_dir a folder of images, digits or digits:SIZE")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"data directory {data_dir} does not exist; pass --data_dir a folder of images, digits or digits:SIZE"
        )
    found = _list_image_files_recursively(data_dir)
    if not found:
        raise ValueError(f"no .{', .'.join(IMAGE_EXTENSIONS)} images found under {data_dir}")
    return found


def _resize_shorter_side(pil_image, size):
    """Scale so that the shorter side is ``size``: box-filter halvings while it is at least twice
    that (cheap anti-aliasing), then one bicubic resize, as ADM does."""
    while min(pil_image.size) >= 2 * size:
        pil_image = pil_image.resize(tuple(side // 2 for side in pil_image.size), resample=Image.BOX)
    scale = size / min(pil_image.size)
    return pil_image.resize(tuple(round(side * scale) for side in pil_image.size), resample=Image.BICUBIC)


def center_crop_arr(pil_image, image_size):
    """The central image_size x image_size square once the shorter side is image_size (HWC uint8)."""
    arr = np.array(_resize_shorter_side(pil_image, image_size))
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def random_crop_arr(pil_image, image_size, min_crop_frac=0.8, max_crop_frac=1.0, rng=random):
    """A random square of min_crop_frac..max_crop_frac of the shorter side, scaled to image_size (HWC uint8)."""
    shorter = rng.randrange(math.ceil(image_size / max_crop_frac), math.ceil(image_size / min_crop_frac) + 1)
    arr = np.array(_resize_shorter_side(pil_image, shorter))
    top = rng.randrange(arr.shape[0] - image_size + 1)
    left = rng.randrange(arr.shape[1] - image_size + 1)
    return arr[top : top + image_size, left : left + image_size]


def choose_indices(total: int, num_images: int, seed: int) -> np.ndarray:
    """Every index (num_images 0), or a seeded random subset of num_images of them, in source order."""
    if num_images == 0 or num_images == total:
        return np.arange(total)
    if not 0 < num_images <= total:
        raise ValueError(f"cannot take {num_images} images from a source of {total}")
    return np.sort(np.random.default_rng(seed).choice(total, size=num_images, replace=False))
