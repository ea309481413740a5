"""EDM's generate.py as a mode of scripts/edm_sample.py: its seeds, batches, randomness, rounding and PNG folder.

With ``--seeds 0-49999`` an image is made as EDM's generate.py makes the image of that seed:
- randomness: one torch.Generator per seed on the sampling device (edm.samplers.EDMSeedNoise): the
  latent, then the class label (a uniform class index, one-hot), then one float64 draw at every
  sampler step whether it churns or not;
- batches: the seed list is cut into EDM's batches (``seed_batches``: the fewest batches of at
  most ``--batch`` seeds, a multiple of the rank count, sizes differing by at most one; rank r
  takes batches r, r + R, ...), and the network sees each batch whole. The batch changes no random
  number, only how a CPU or GPU kernel rounds: the same ``--batch`` gives EDM's bytes;
- rounding: x * 127.5 + 128, clipped to [0, 255], truncated (``quantize_edm``: x * 127.5 + 127.5
  rounded to the nearest level). ADM floors (x + 1) * 127.5 instead; about half the pixels of an
  image differ by one level between the two;
- output: EDM's folder of ``{seed:06d}.png`` (``--subdirs``: ``{seed - seed % 1000:06d}/``), or
  ADM's NPZ with the seeds' images in the order of the list.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from adm_common.errors import UsageError
from adm_common.files import (
    acquire_lock,
    atomic_write_bytes,
    atomic_write_text,
    folder_lock_file,
    release_lock,
)
from guided_diffusion.edm.samplers import EDMSeedNoise, karras_sample
from guided_diffusion.run.output import (
    NON_IMAGE_SETTINGS,
    SampleRun,
    environment_record,
    finite_pixels,
    quantize,
    run_sampling,
)
from guided_diffusion.run.collective import together

__all__ = [
    "QUANTIZATIONS", "OUTPUT_FORMATS", "quantize_edm", "quantizer", "parse_seeds", "seed_batches",
    "png_path", "sample_seeds", "SeedListRun", "write_png_folder", "PNG_SIDECAR", "decide_seed_mode",
    "sample_cast", "write_seed_images",
]

QUANTIZATIONS = ("adm", "edm")
OUTPUT_FORMATS = ("npz", "png")
PNG_SIDECAR = "edm_sample.json"  # beside the PNGs; EDM's fid.py reads only image files


def quantize_edm(images: torch.Tensor) -> np.ndarray:
    """Samples in [-1, 1], NCHW -> uint8 NHWC, as EDM's generate.py rounds them (round half up)."""
    levels = (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)  # truncation of values >= 0
    return levels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def quantizer(name: str):
    """The uint8 conversion called ``name``: 'adm' (run.output.quantize, floor) or 'edm' (rounding)."""
    if name not in QUANTIZATIONS:
        raise UsageError(f"--quantization {name}: use adm (ADM's floor) or edm (EDM's rounding)")
    return quantize if name == "adm" else quantize_edm


def sample_cast(name: str):
    """What the sampled images go through before ``quantizer(name)``: EDM quantizes its float64
    samples as they are; ADM's path keeps the float32 images it always had."""
    return (lambda images: images) if name == "edm" else (lambda images: images.float())


def decide_seed_mode(args, explicit: set) -> list[int] | None:
    """Decide the EDM-seed flags once: the seed list (or None), --quantization and --output_format."""
    seeds = parse_seeds(args.seeds) if args.seeds else None
    if seeds is not None:
        typed = sorted({"seed", "num_samples", "network_batch_size"} & explicit)
        if typed:
            raise UsageError(f"--seeds decides the images; drop --{typed[0]} (EDM's mode has no such flag)")
    elif args.output_format == "png" or args.subdirs:
        raise UsageError("EDM's PNG folder (--output_format png, --subdirs) needs --seeds; "
                         "scripts/npz_to_png.py writes the images of an NPZ as PNG files")
    if args.quantization is None:
        args.quantization = "edm" if seeds is not None else "adm"
    if args.output_format is None:
        args.output_format = "png" if seeds is not None else "npz"
    if args.subdirs and args.output_format != "png":
        raise UsageError("--subdirs arranges PNG files; it does nothing with --output_format npz")
    return seeds


_RANGE = re.compile(r"^(\d+)-(\d+)$")


def parse_seeds(text: str) -> list[int]:
    """EDM's --seeds syntax: numbers and inclusive ranges, comma-separated ('1,2,5-10')."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        m = _RANGE.match(part)
        if m:
            first, last = int(m.group(1)), int(m.group(2))
            if last < first:
                raise UsageError(f"--seeds {text}: the range {part} is empty; write FIRST-LAST with FIRST <= LAST")
            seeds.extend(range(first, last + 1))
        elif re.fullmatch(r"-?\d+", part):
            seeds.append(int(part))
        else:
            raise UsageError(
                f"--seeds {text}: {part!r} is not a seed; write numbers and ranges, e.g. 0-49999 or 1,2,5-10"
            )
    seen = set()
    for seed in seeds:
        if seed in seen:
            raise UsageError(f"--seeds {text}: seed {seed} appears twice; each seed makes one image")
        seen.add(seed)
    return seeds


def seed_batches(num_seeds: int, max_batch_size: int, world_size: int = 1) -> list[list[int]]:
    """Positions in the seed list, cut into EDM's batches (some empty when seeds are fewer than batches).

    EDM takes the fewest batches of at most ``max_batch_size`` that is a multiple of the rank
    count and splits the list into that many consecutive parts whose sizes differ by at most one,
    the longer ones first; rank r takes parts r, r + world_size, ...
    """
    if num_seeds < 1 or max_batch_size < 1 or world_size < 1:
        raise ValueError("need at least one seed, a batch size and a rank")
    count = ((num_seeds - 1) // (max_batch_size * world_size) + 1) * world_size
    return [part.tolist() for part in np.array_split(np.arange(num_seeds), count)]


def png_path(outdir, seed: int, subdirs: bool = False) -> Path:
    """Where EDM's generate.py writes the image of ``seed``."""
    folder = Path(outdir)
    if subdirs:
        folder = folder / f"{seed - seed % 1000:06d}"
    return folder / f"{seed:06d}.png"


def sample_seeds(denoiser, seeds: Sequence[int], shape, label_dim: int, class_idx=None, device="cpu",
                 **sampler_kwargs):
    """The float64 images and integer labels (None without classes) of ``seeds``, drawn as EDM draws them."""
    noise = EDMSeedNoise(seeds, device)
    latents = noise.randn((len(noise), *shape))
    labels = noise.one_hot_labels(label_dim, class_idx) if label_dim else None
    images = karras_sample(denoiser, latents.shape, noise=latents, class_labels=labels, churn_generator=noise,
                           device=device, **sampler_kwargs)
    return images, (None if labels is None else labels.argmax(dim=1))


class SeedListRun(SampleRun):
    """ADM's sharded NPZ run over a seed list, sampled in EDM's batches: row i is seed ``seeds[i]``."""

    def __init__(self, output_dir, settings: dict, seeds: Sequence[int], max_batch_size: int, image_shape,
                 class_cond: bool, rank: int = 0, world_size: int = 1, keep_shards: bool = False):
        super().__init__(output_dir, settings, len(seeds), max_batch_size, image_shape, class_cond,
                         rank=rank, world_size=world_size, keep_shards=keep_shards)
        self.seeds = [int(s) for s in seeds]
        self.edm_batches = [b for b in seed_batches(len(self.seeds), max_batch_size, world_size) if b]

    def pending_batches(self) -> list[list[int]]:
        """EDM's batches less the images already in shards (a batch cut where shards took a part)."""
        done = self.done_indices()
        pending = []
        for batch in self.edm_batches:
            current: list[int] = []
            for i in batch:
                if i in done:
                    if current:
                        pending.append(current)
                    current = []
                else:
                    current.append(i)
            if current:
                pending.append(current)
        return pending


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def _identity(settings: dict) -> dict:
    return json.loads(json.dumps({k: v for k, v in settings.items() if k not in NON_IMAGE_SETTINGS}, default=str))


def _check_png_folder(outdir: Path, seeds, subdirs: bool, identity: dict) -> None:
    sidecar = outdir / PNG_SIDECAR
    earlier = None
    if sidecar.exists():
        try:
            earlier = json.loads(sidecar.read_text()).get("run_identity")
        except (OSError, ValueError, AttributeError):
            earlier = None
    if earlier == identity:
        return
    existing = next((p for p in (png_path(outdir, s, subdirs) for s in seeds) if p.exists()), None)
    if existing is not None:
        why = "other settings" if earlier is not None else f"no {PNG_SIDECAR} of this script"
        raise UsageError(
            f"{outdir} already holds {existing.relative_to(outdir)} made with {why}; "
            "use another --outdir or delete those images"
        )


def write_png_folder(outdir, seeds: Sequence[int], batches: list[list[int]], sample_batch, quantize_fn,
                     subdirs: bool, settings: dict, sidecar: dict, rank: int = 0, world_size: int = 1,
                     progress: bool = True) -> Path | None:
    """Write EDM's PNG folder: this rank's ``batches`` (positions in ``seeds``), then the sidecar.

    ``sample_batch(seed_list)`` returns (images in [-1, 1], NCHW; labels or None). Each PNG is
    written whole or not at all; a batch whose PNGs all exist is skipped, so a rerun finishes a
    killed one. ``PNG_SIDECAR`` records the settings; a folder holding this run's PNG names made
    otherwise is refused. Returns the sidecar path on rank 0.
    """
    from tqdm.auto import tqdm

    outdir = Path(outdir)
    seeds = [int(s) for s in seeds]
    identity = _identity(settings)
    lock = folder_lock_file(outdir)
    record = dict(sidecar, seeds_count=len(seeds), subdirs=bool(subdirs), run_identity=identity, complete=False)

    def start():
        outdir.mkdir(parents=True, exist_ok=True)
        acquire_lock(lock, f"output folder {outdir}", "wait for it to finish or choose another --outdir")
        _check_png_folder(outdir, seeds, subdirs, identity)
        atomic_write_text(outdir / PNG_SIDECAR, json.dumps(record, indent=1, sort_keys=True, default=str))

    try:
        together(start if rank == 0 else None)
        mine = batches[rank::world_size]
        bar = tqdm(total=len(seeds), unit="img", disable=not progress or rank != 0, desc="sampling",
                   dynamic_ncols=True, smoothing=0.1)
        rounds = -(-len(batches) // world_size)

        def one_batch(positions):
            batch_seeds = [seeds[i] for i in positions]
            paths = [png_path(outdir, s, subdirs) for s in batch_seeds]
            if all(p.exists() for p in paths):
                return
            images, _ = sample_batch(batch_seeds)
            pixels = finite_pixels(images, batch_seeds, quantize_fn)
            for path, image in zip(paths, pixels):
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, _png_bytes(image))

        for k in range(rounds):
            positions = mine[k] if k < len(mine) and mine[k] else None
            together(None if positions is None else (lambda: one_batch(positions)))
            bar.update(sum(len(b) for b in batches[k * world_size:(k + 1) * world_size]))
        bar.close()

        def finish():
            missing = [s for s in seeds if not png_path(outdir, s, subdirs).exists()]
            if missing:
                raise UsageError(
                    f"the images of {len(missing)} seeds (first {missing[0]}) are missing in {outdir}; rerun to finish"
                )
            final = dict(record, complete=True, **environment_record(world_size))
            atomic_write_text(outdir / PNG_SIDECAR, json.dumps(final, indent=1, sort_keys=True, default=str))
            return outdir / PNG_SIDECAR

        return together(finish if rank == 0 else None)
    finally:
        if rank == 0:
            release_lock(lock)


def write_seed_images(args, seeds: Sequence[int], sample_seed_list, settings: dict, sidecar: dict, image_shape,
                      class_cond: bool, quantize_fn) -> None:
    """EDM's --seeds mode: ``sample_seed_list(seeds)`` in EDM's batches, into the PNG folder or ADM's NPZ."""
    from guided_diffusion import dist_util, logger

    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    if args.output_format == "png":
        batches = seed_batches(len(seeds), args.batch_size, world)
        path = write_png_folder(args.output_dir, seeds, batches, sample_seed_list, quantize_fn, args.subdirs,
                                settings, sidecar, rank=rank, world_size=world, progress=args.progress)
        if path is not None:
            logger.log(f"saved {len(seeds)} PNG files in {args.output_dir} ({path.name} holds the settings)")
        return
    run = SeedListRun(args.output_dir, settings, seeds, args.batch_size, image_shape, class_cond,
                      rank=rank, world_size=world, keep_shards=args.keep_shards)
    path = run_sampling(run, lambda indices: sample_seed_list([seeds[i] for i in indices]), sidecar,
                        progress=args.progress, quantize=quantize_fn)
    if path is not None:
        logger.log(f"saved {path}")
