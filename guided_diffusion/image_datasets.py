"""Training data as ADM reads it: an image folder (or the built-in digits), endless batches per rank.

``load_data`` yields ``(images [B, 3, H, W] in [-1, 1], {"y": labels} or {})`` forever. A folder's
class is the file-name prefix before the first "_" (``n01440764_10026.JPEG`` -> ``n01440764``), as
ADM; each rank reads every world_size-th file. Unlike ADM, the batch order and the crops and flips
are a function of (seed, rank, batch index), so a resumed run can continue where it stopped
(``start_batch``) instead of starting the data over.

Damaged data is found before a run starts, not days into it: given ``num_classes``, a folder with
more classes than the model has is refused; and each rank checks the headers of the files it
will read (``PIL.Image.open`` + ``verify``, in threads: a header read per file, which for JPEGs is
a few KB, so ImageNet's 1.28M files on 8 ranks take seconds to minutes, not a decode of every
image). An empty, cut or non-image file is refused in one line naming the first and the count,
or, with ``skip_bad_images``, left out with the count logged. An image whose header is fine but
whose data is cut short can only be found when it is decoded: without ``skip_bad_images`` that
stops the run in one line naming the file; with it, the image is replaced by the next readable
one of the rank's list (a deterministic choice, so a resumed run sees the same data), warned once.
"""

from __future__ import annotations

import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from guided_diffusion import dist_util, logger
from guided_diffusion.digits.data import DIGITS_NUM_CLASSES, DigitsDataset, checked_digits_size, is_digits_spec
from adm_common.errors import UsageError
from adm_common.images import (  # noqa: F401  ADM's names stay importable from here
    _list_image_files_recursively,
    center_crop_arr,
    choose_indices,
    list_image_files_recursively,
    random_crop_arr,
)


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
    num_classes=None,
    skip_bad_images=False,
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
    :param num_classes: the model's number of classes; with ``class_cond``, data with more classes
        is refused before anything is read (None: not checked).
    :param skip_bad_images: leave out (count logged) the files that cannot be read as images,
        instead of refusing the data (see the module's docstring).
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
        if class_cond:
            check_num_classes(DIGITS_NUM_CLASSES, num_classes, data_dir, "the digits 0-9")
        dataset = DigitsDataset(size, class_cond=class_cond, shard=rank, num_shards=world, random_flip=False)
        num_workers = 0  # in memory already
    else:
        files = list_image_files_recursively(data_dir)
        classes = None
        if class_cond:
            classes = class_indices_from_names(files)
            names = sorted({os.path.basename(p).split("_")[0] for p in files})
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            check_num_classes(len(names), num_classes, data_dir, f"{shown}: the file-name prefixes before the first '_'")
        dataset = ImageDataset(
            image_size,
            files,
            classes=classes,
            shard=rank,
            num_shards=world,
            random_crop=random_crop,
            random_flip=random_flip,
            skip_bad_images=skip_bad_images,
        )
        _check_headers(dataset, data_dir, skip_bad_images, rank, world)
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


def check_num_classes(found: int, num_classes, data_dir, which: str) -> None:
    """Refuse labels the model has no output for (found before training, not as an index error in it)."""
    if num_classes is None or found <= num_classes:
        return
    raise UsageError(
        f"--data_dir {data_dir} has {found} classes ({which}), more than --num_classes {num_classes}; "
        f"pass --num_classes {found}"
    )


def _image_problem(path) -> str | None:
    """Why ``path`` is not a readable image by its header (None: it looks fine). A JPEG without its
    end marker near its end (a download cut short) is decoded to be sure."""
    try:
        with Image.open(path) as image:
            fmt = image.format
            image.verify()
        if fmt == "JPEG":
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 1024))
                ended = b"\xff\xd9" in f.read()
            if not ended:
                _read_rgb(path)
    except Exception as exc:  # PIL raises many kinds for a damaged file: all mean the same here
        return _reason(path, exc)
    return None


def _reason(path, exc) -> str:
    try:
        if os.path.getsize(path) == 0:
            return "empty (0 bytes)"
    except OSError:
        pass
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image file PIL can read"
    text = str(exc).strip()
    return (text.splitlines()[0][:120] if text else type(exc).__name__)


def find_unreadable_images(paths, threads: int = 16) -> list[tuple[int, str]]:
    """(index, reason) of the files of ``paths`` whose header PIL cannot read, checked in threads."""
    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=min(threads, len(paths))) as pool:
        problems = list(pool.map(_image_problem, paths))
    return [(i, reason) for i, reason in enumerate(problems) if reason]


def _check_headers(dataset, data_dir, skip_bad_images, rank, world) -> None:
    """Refuse (or, skipping, leave out) the files of this rank's share that are not readable images."""
    started = time.perf_counter()
    bad = find_unreadable_images(dataset.local_images)
    logger.log(f"checked the headers of {len(dataset.local_images)} images in {time.perf_counter() - started:.1f} s")
    if not bad:
        return
    where = f" (rank {rank} of {world})" if world > 1 else ""
    index, reason = bad[0]
    what = (f"{len(bad)} of the {len(dataset.local_images)} images of {data_dir}{where} cannot be read "
            f"(first: {dataset.local_images[index]}: {reason})")
    if not skip_bad_images:
        raise UnreadableImage(f"{what}; remove or replace them, or pass --skip_bad_images True to train without them")
    logger.warn(f"{what}: skipping them")
    dataset.drop([i for i, _ in bad])


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


def class_indices_from_names(paths) -> list[int]:
    """ADM's labels: the file-name prefix before the first "_", numbered in sorted order of prefixes."""
    names = [os.path.basename(p).split("_")[0] for p in paths]
    index = {name: i for i, name in enumerate(sorted(set(names)))}
    return [index[n] for n in names]


class UnreadableImage(UsageError):
    """An image of the data that cannot be decoded; one line, also when raised in a loader worker
    (torch's DataLoader re-raises a worker's error with the worker's traceback as its message)."""

    def __init__(self, message=""):
        text = str(message)
        if "\n" in text:
            lines = [line for line in text.splitlines() if line.strip()]
            marker = f"{type(self).__name__}: "
            text = lines[-1].split(marker, 1)[1] if marker in lines[-1] else lines[0]
        super().__init__(text)


_WARNED: set = set()  # files this process has warned about (each once)


def _read_rgb(path):
    with Image.open(path) as pil_image:
        pil_image.load()
        return pil_image.convert("RGB")


class ImageDataset(Dataset):
    """One rank's share of image files, as ADM: center or random crop, optional flip, CHW in [-1, 1].

    Keys are indices (ADM's loader: Python's RNG, which torch seeds per worker) or (index, augmentation seed) pairs.
    A file that cannot be decoded stops the run in one line, or with ``skip_bad_images`` is replaced
    by the next readable file of the list (its label too).
    """

    def __init__(
        self, resolution, image_paths, classes=None, shard=0, num_shards=1, random_crop=False, random_flip=True,
        skip_bad_images=False,
    ):
        self.resolution = resolution
        self.local_images = image_paths[shard::num_shards]
        self.local_classes = None if classes is None else classes[shard::num_shards]
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.skip_bad_images = skip_bad_images

    def __len__(self):
        return len(self.local_images)

    def drop(self, indices) -> None:
        """Leave out the files at ``indices`` of this share (files found unreadable)."""
        gone = set(indices)
        keep = [i for i in range(len(self.local_images)) if i not in gone]
        self.local_images = [self.local_images[i] for i in keep]
        if self.local_classes is not None:
            self.local_classes = [self.local_classes[i] for i in keep]

    def _load(self, index):
        """(RGB image, index of the file it came from): ``index``'s, or a replacement when skipping."""
        path = self.local_images[index]
        try:
            return _read_rgb(path), index
        except Exception as exc:  # a damaged file (PIL raises many kinds)
            reason = _reason(path, exc)
        if not self.skip_bad_images:
            raise UnreadableImage(f"image {path} cannot be read ({reason}); remove or replace it, or pass "
                                  "--skip_bad_images True to train without it")
        for step in range(1, len(self.local_images)):
            other = (index + step) % len(self.local_images)
            try:
                image = _read_rgb(self.local_images[other])
            except Exception:
                continue
            if path not in _WARNED:
                _WARNED.add(path)
                print(f"warning: skipping unreadable image {path} ({reason}); "
                      f"{self.local_images[other]} takes its place", file=sys.stderr, flush=True)
            return image, other
        raise UnreadableImage(f"none of the {len(self.local_images)} images of this share can be read (first: "
                              f"{path}: {reason})")

    def __getitem__(self, idx):
        index, aug_seed = idx if isinstance(idx, tuple) else (idx, None)
        # a plain index (ADM's loader) draws from the module's RNG, which torch seeds in each worker
        rng = random if aug_seed is None else random.Random(aug_seed)
        pil_image, index = self._load(index)
        if self.random_crop:
            arr = random_crop_arr(pil_image, self.resolution, rng=rng)
        else:
            arr = center_crop_arr(pil_image, self.resolution)
        if self.random_flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        arr = arr.astype(np.float32) / 127.5 - 1
        out = {} if self.local_classes is None else {"y": np.array(self.local_classes[index], dtype=np.int64)}
        return np.transpose(arr, [2, 0, 1]), out
