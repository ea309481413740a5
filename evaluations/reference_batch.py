"""Reference batches of your own, in ADM's format: arr_0 images plus mu, sigma, mu_s, sigma_s.

For datasets ADM published no batch for (CIFAR-10, FFHQ 128, LSUN tower 64). The source is a
folder of images, a .zip of images, or an .npz batch. Each image is prepared as ADM prepares its
training data (adm_common.images.center_crop_arr: box-halve while >= 2x the size, one bicubic
resize, central square), written to arr_0 a batch at a time, and its Inception features go into
running statistics on the way, so memory does not grow with the number of images.

``main`` is scripts/make_reference_batch.py's command line.
"""

from __future__ import annotations

import argparse
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from adm_common.devices import check_device
from adm_common.files import NpzWriter, check_output_file
from adm_common.images import IMAGE_EXTENSIONS, center_crop_arr, choose_indices, list_image_files_recursively
from evaluations.activations import compute_activations
from evaluations.cli import add_inception_arguments, check_batch_size, open_inception
from evaluations.inception import InceptionFeatures
from evaluations.manifold import NEIGHBOURHOOD_SIZE
from evaluations.npz_stream import NpzImages, damaged_file_errors, scan_batch_file


class FolderImages:
    """Every image under a folder, sorted by path (ADM's listing)."""

    def __init__(self, path):
        self.files = list_image_files_recursively(str(path))

    def __len__(self) -> int:
        return len(self.files)

    def images(self, indices):
        for index in indices:
            yield _read_rgb(self.files[index], self.files[index])


class ZipImages:
    """Every image member of a .zip, sorted by name."""

    def __init__(self, path):
        self.path = path
        if Path(path).stat().st_size == 0:
            raise ValueError(f"{path} is empty (0 bytes); re-create or re-download it")
        try:
            with zipfile.ZipFile(path) as archive:
                self.names = sorted(
                    name for name in archive.namelist() if name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS
                )
        except zipfile.BadZipFile:
            raise ValueError(
                f"{path} is not a zip file, or is truncated (it has no readable zip directory); "
                "re-create or re-download it"
            ) from None
        if not self.names:
            raise ValueError(f"no .{', .'.join(IMAGE_EXTENSIONS)} images found in {path}")

    def __len__(self) -> int:
        return len(self.names)

    def images(self, indices):
        with damaged_file_errors(self.path), zipfile.ZipFile(self.path) as archive:
            for index in indices:
                with archive.open(self.names[index]) as member:
                    yield _read_rgb(member, f"{self.path}:{self.names[index]}")


class NpzBatchImages:
    """The arr_0 images of an .npz batch, read in file order."""

    def __init__(self, path):
        self.path = path
        with NpzImages(path) as images:
            self.count = len(images)
        scan_batch_file(path)  # a damaged member is refused now, not after the Inception work

    def __len__(self) -> int:
        return self.count

    def images(self, indices):
        wanted = iter(indices)
        target = next(wanted, None)
        position = 0
        with NpzImages(self.path) as source:
            for batch in source.batches(256):
                for row in batch:
                    if position == target:
                        yield Image.fromarray(row)
                        target = next(wanted, None)
                    position += 1
                if target is None:
                    return


def _read_rgb(file, name) -> Image.Image:
    try:
        with Image.open(file) as image:
            return image.convert("RGB")
    # PIL raises OSError for most damaged files, SyntaxError or ValueError for some broken ones
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, zipfile.BadZipFile, zlib.error,
            EOFError) as exc:
        raise ValueError(f"cannot read image {name}: {exc or type(exc).__name__}; repair or remove it") from None


def open_image_source(path):
    """Images of a folder, a .zip or an .npz batch."""
    path = Path(path)
    if path.is_dir():
        return FolderImages(path)
    if not path.exists():
        raise FileNotFoundError(f"image source {path} does not exist")
    if path.suffix.lower() == ".npz":
        return NpzBatchImages(path)
    if path.suffix.lower() == ".zip":
        return ZipImages(path)
    raise ValueError(f"image source {path} must be a folder of images, a .zip of images or an .npz batch")


@dataclass
class ReferencePlan:
    """What a reference batch will hold, checked before any Inception work starts."""

    images: FolderImages | ZipImages | NpzBatchImages
    indices: np.ndarray  # which source images, in source order
    output: Path
    image_size: int


def plan_reference_batch(source, output, image_size: int, num_images: int = 0, seed: int = 0) -> ReferencePlan:
    output = Path(output)
    if output.suffix != ".npz":
        raise ValueError(f"the reference batch must be an .npz file, got {output}")
    if not output.parent.exists():
        raise FileNotFoundError(f"output folder {output.parent} does not exist; create it or choose another OUTPUT")
    check_output_file(output, "the reference batch", "OUTPUT")
    if image_size < 1:
        raise ValueError(f"image size must be positive, got {image_size}")
    images = open_image_source(source)
    indices = choose_indices(len(images), num_images, seed)
    if len(indices) <= NEIGHBOURHOOD_SIZE:
        raise ValueError(
            f"a reference batch needs at least {NEIGHBOURHOOD_SIZE + 1} images (precision and recall compare each "
            f"image with its {NEIGHBOURHOOD_SIZE} nearest neighbours); the source gives {len(indices)}"
        )
    return ReferencePlan(images, indices, output, image_size)


def write_reference_batch(plan: ReferencePlan, model: InceptionFeatures, batch_size: int = 64) -> dict:
    """Write the planned .npz: arr_0 uint8 [N, size, size, 3] and the FID statistics of its images."""
    prepared = (center_crop_arr(image, plan.image_size) for image in plan.images.images(plan.indices))
    shape = (len(plan.indices), plan.image_size, plan.image_size, 3)
    with NpzWriter(plan.output) as writer:
        written = writer.add_streamed("arr_0", shape, np.uint8, _batched(prepared, batch_size))
        activations = compute_activations(written, model, len(plan.indices), keep_pool=False, desc="reference")
        writer.add("mu", activations.pool_statistics.mu)
        writer.add("sigma", activations.pool_statistics.sigma)
        writer.add("mu_s", activations.spatial_statistics.mu)
        writer.add("sigma_s", activations.spatial_statistics.sigma)
    return {"path": str(plan.output), "num_images": len(plan.indices), "image_size": plan.image_size}


def _batched(arrays, batch_size: int):
    batch = []
    for array in arrays:
        batch.append(array)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def main(argv=None) -> dict:
    """scripts/make_reference_batch.py: every flag, the source and the output checked before Inception loads."""
    parser = argparse.ArgumentParser(
        description="Make a reference batch (arr_0 images + mu, sigma, mu_s, sigma_s) for evaluations/evaluator.py."
    )
    parser.add_argument("source", help="folder of images, .zip of images, or .npz batch")
    parser.add_argument("output", help="reference batch to write (.npz)")
    parser.add_argument("--image_size", type=int, required=True, help="side of the square images")
    parser.add_argument("--num_images", type=int, default=0, help="a random subset of this size (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random subset")
    add_inception_arguments(parser)
    args = parser.parse_args(argv)
    check_batch_size(args.batch_size)
    check_device(args.device)
    plan = plan_reference_batch(args.source, args.output, args.image_size, args.num_images, args.seed)
    model, graph_record = open_inception(args)
    try:
        summary = write_reference_batch(plan, model, args.batch_size)
    finally:
        model.close()
    print(
        f"wrote {summary['path']}: {summary['num_images']} images at {args.image_size}x{args.image_size}, "
        f"statistics from the {graph_record['backend']} backend (graph sha256 {graph_record['sha256']})"
    )
    return summary
