"""Training data as ADM reads it: an image folder (or the built-in digits), endless batches per rank.

``load_data`` yields ``(images [B, 3, H, W] in [-1, 1], {"y": labels} or {})`` forever. A folder's
class is the file-name prefix before the first "_" (``n01440764_10026.JPEG`` -> ``n01440764``), as
ADM; each rank reads every world_size-th file. Unlike ADM, the batch order and the crops and flips
are a function of (seed, rank, batch index), so a resumed run can continue where it stopped
(``start_batch``) instead of starting the data over.
"""

from __future__ import annotations

import math
import os
import random

import numpy as np
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from . import dist_util
from .digits import DigitsDataset, checked_digits_size, is_digits_spec

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")


def load_data(
    *,
    data_dir,
    batch_size,
    image_size,
    class_cond=False,
    deterministic=False,
    random_crop=False,
    random_flip=True,
    seed=None,
    start_batch=0,
):
    """An endless iterator of (images, kwargs) batches of this rank's share of ``data_dir``.

    :param data_dir: a folder of images (searched recursively), ``digits`` or ``digits:SIZE``.
    :param deterministic: keep the file order instead of shuffling every epoch.
    :param random_crop: ADM's random-resized crop instead of the center crop (folders only).
    :param random_flip: mirror half of the images (folders only: a mirrored digit is not a digit,
        so the digits are never mirrored).
    :param seed: seed of the shuffles and augmentations, a function of (seed, rank, batch index);
        None is ADM's loader (torch's global RNG decides them, as in ADM; not resumable).
    :param start_batch: index of the first batch to yield (a resumed run passes its step).
    """
    if not data_dir:
        raise ValueError("no data given; pass --data_dir a folder of images, digits or digits:SIZE")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    if is_digits_spec(data_dir):
        size = checked_digits_size(data_dir, image_size)
        dataset = DigitsDataset(size, class_cond=class_cond, shard=rank, num_shards=world, random_flip=False)
        num_workers = 0  # in memory already
    else:
        files = list_image_files_recursively(data_dir)
        dataset = ImageDataset(
            image_size,
            files,
            classes=class_indices_from_names(files) if class_cond else None,
            shard=rank,
            num_shards=world,
            random_crop=random_crop,
            random_flip=random_flip,
        )
        num_workers = 1
    if len(dataset) < batch_size:
        raise ValueError(
            f"rank {rank} has {len(dataset)} images of {data_dir}, fewer than batch_size {batch_size}; "
            "lower --batch_size or add images"
        )
    if seed is None:
        return _adm_batches(dataset, batch_size, deterministic, num_workers)
    sampler = ResumableBatchSampler(
        len(dataset), batch_size, shuffle=not deterministic, seed=seed, rank=rank, start_batch=start_batch
    )
    return iter(DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers))


def _adm_batches(dataset, batch_size, deterministic, num_workers):
    """ADM's own loader, for code that calls load_data as ADM does (no seed): torch's DataLoader,
    a fresh order every epoch and the workers' seeds (which decide the crops and flips) drawn
    from torch's global RNG, so a run seeded as ADM's is equal to ADM's. Not resumable."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=not deterministic, num_workers=num_workers,
                        drop_last=True)
    while True:
        yield from loader


def load_superres_data(data_dir, batch_size, large_size, small_size, class_cond=False, **kwargs):
    """Batches at ``large_size`` with the network's low-resolution input (area-downsampled) as ``low_res``."""
    data = load_data(
        data_dir=data_dir, batch_size=batch_size, image_size=large_size, class_cond=class_cond, **kwargs
    )
    return _with_low_res(data, small_size)


def _with_low_res(data, small_size):
    for large_batch, model_kwargs in data:
        model_kwargs["low_res"] = F.interpolate(large_batch, small_size, mode="area")
        yield large_batch, model_kwargs


class ResumableBatchSampler:
    """Endless batches of (index, augmentation seed) keys, a function of (seed, rank, batch index).

    Every epoch draws a fresh order and fresh augmentation seeds; a partial last batch is dropped,
    as ADM's loader does.
    """

    def __init__(self, num_items, batch_size, shuffle, seed, rank=0, start_batch=0):
        self.num_items = num_items
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.start_batch = start_batch

    def __iter__(self):
        per_epoch = self.num_items // self.batch_size
        epoch, first = divmod(self.start_batch, per_epoch)
        while True:
            rng = np.random.default_rng([self.seed, self.rank, epoch])
            order = rng.permutation(self.num_items) if self.shuffle else np.arange(self.num_items)
            aug_seeds = rng.integers(0, 2**63, size=self.num_items)
            for b in range(first, per_epoch):
                span = range(b * self.batch_size, (b + 1) * self.batch_size)
                yield [(int(order[j]), int(aug_seeds[j])) for j in span]
            first = 0
            epoch += 1


def _list_image_files_recursively(data_dir):
    """ADM's file list: the folder's entries in sorted name order, an image (.jpg, .jpeg, .png,
    .gif, any case) taken as it comes and a sub-folder listed in its place, recursively. The
    order decides which rank reads which file, so it is ADM's exactly."""
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
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"data directory {data_dir} does not exist; pass --data_dir a folder of images, digits or digits:SIZE"
        )
    found = _list_image_files_recursively(data_dir)
    if not found:
        raise ValueError(f"no .{', .'.join(IMAGE_EXTENSIONS)} images found under {data_dir}")
    return found


def class_indices_from_names(paths) -> list[int]:
    """ADM's labels: the file-name prefix before the first "_", numbered in sorted order of prefixes."""
    names = [os.path.basename(p).split("_")[0] for p in paths]
    index = {name: i for i, name in enumerate(sorted(set(names)))}
    return [index[n] for n in names]


class ImageDataset(Dataset):
    """One rank's share of image files, as ADM: center or random crop, optional flip, CHW in [-1, 1].

    Keys are indices (ADM's loader: Python's RNG, which torch seeds per worker) or (index, augmentation seed) pairs.
    """

    def __init__(
        self, resolution, image_paths, classes=None, shard=0, num_shards=1, random_crop=False, random_flip=True
    ):
        self.resolution = resolution
        self.local_images = image_paths[shard::num_shards]
        self.local_classes = None if classes is None else classes[shard::num_shards]
        self.random_crop = random_crop
        self.random_flip = random_flip

    def __len__(self):
        return len(self.local_images)

    def __getitem__(self, idx):
        index, aug_seed = idx if isinstance(idx, tuple) else (idx, None)
        # a plain index (ADM's loader) draws from the module's RNG, which torch seeds in each worker
        rng = random if aug_seed is None else random.Random(aug_seed)
        path = self.local_images[index]
        with Image.open(path) as pil_image:
            pil_image.load()
            pil_image = pil_image.convert("RGB")
        if self.random_crop:
            arr = random_crop_arr(pil_image, self.resolution, rng=rng)
        else:
            arr = center_crop_arr(pil_image, self.resolution)
        if self.random_flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        arr = arr.astype(np.float32) / 127.5 - 1
        out = {} if self.local_classes is None else {"y": np.array(self.local_classes[index], dtype=np.int64)}
        return np.transpose(arr, [2, 0, 1]), out


def _resize_shorter_side(pil_image, size):
    """Resize so the shorter side is ``size``: halve with a box filter while it is >= 2x too big
    (cheap anti-aliasing), then one bicubic resize, as ADM prepares its images."""
    while min(pil_image.size) >= 2 * size:
        pil_image = pil_image.resize(tuple(side // 2 for side in pil_image.size), resample=Image.BOX)
    scale = size / min(pil_image.size)
    return pil_image.resize(tuple(round(side * scale) for side in pil_image.size), resample=Image.BICUBIC)


def center_crop_arr(pil_image, image_size):
    """The central image_size x image_size square after scaling the shorter side to image_size (HWC uint8)."""
    arr = np.array(_resize_shorter_side(pil_image, image_size))
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def random_crop_arr(pil_image, image_size, min_crop_frac=0.8, max_crop_frac=1.0, rng=random):
    """A random square covering min_crop_frac..max_crop_frac of the shorter side, at image_size (HWC uint8)."""
    shorter = rng.randrange(math.ceil(image_size / max_crop_frac), math.ceil(image_size / min_crop_frac) + 1)
    arr = np.array(_resize_shorter_side(pil_image, shorter))
    top = rng.randrange(arr.shape[0] - image_size + 1)
    left = rng.randrange(arr.shape[1] - image_size + 1)
    return arr[top : top + image_size, left : left + image_size]


def choose_indices(total: int, num_images: int, seed: int) -> np.ndarray:
    """All images (num_images 0), or a seeded random subset of num_images, in source order."""
    if num_images == 0 or num_images == total:
        return np.arange(total)
    if not 0 < num_images <= total:
        raise ValueError(f"cannot take {num_images} images from a source of {total}")
    return np.sort(np.random.default_rng(seed).choice(total, size=num_images, replace=False))
