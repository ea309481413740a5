"""Approximate the bits/dimension of a data set under a diffusion model (ADM's image_nll.py).

Example:
    python scripts/image_nll.py --config iddpm_cifar10_uncond --model_path cifar10_uncond_50M_500K.pt \
        --data_dir cifar_test --num_samples 1000 --batch_size 50
Writes bpd.json (mean bits/dim, its standard error, and the per-term means) to the output folder,
and ADM's vb_terms.npz, mse_terms.npz and xstart_mse_terms.npz (arr_0: each term's mean over the
images, per timestep).

Image i of the data (in file order; rank r reads images r, r + W, ... of W ranks) is noised with
the per-image noise of (--seed, i), so its terms, and the mean over the first --num_samples images,
do not depend on the batch size or the rank count. ADM draws the noise from torch's global RNG and
averages over every image evaluated, also those past --num_samples of the last batch.
"""

import argparse
import io
import json
import os

import numpy as np
import torch
import torch.distributed as dist

from adm_common.cli import cli_main
from adm_common.errors import UsageError
from adm_common.files import atomic_write_bytes, atomic_write_text
from guided_diffusion import dist_util, logger
from guided_diffusion.image_datasets import load_data
from guided_diffusion.image_noise import ImageNoise
from guided_diffusion.run import pipeline as sampling
from guided_diffusion.run.configs import parse_args_with_config
from guided_diffusion.script_util import add_dict_to_argparser, model_and_diffusion_defaults


ADM_TERMS = ("vb", "mse", "xstart_mse")  # the per-timestep terms ADM saves as {name}_terms.npz


def create_argparser():
    defaults = dict(data_dir="", clip_denoised=True, num_samples=1000, batch_size=1, model_path="",
                    output_dir="", config="", seed=0)
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    return parser


def main():
    args, _, _ = parse_args_with_config(create_argparser())
    sampling.start(args)
    model, diffusion, weights = sampling.load_adm_model(args)
    data = load_data(data_dir=args.data_dir, batch_size=args.batch_size, image_size=args.image_size,
                     class_cond=args.class_cond, deterministic=True, random_flip=False, seed=args.seed)
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    terms = {"total_bpd": [], "prior_bpd": [], "vb": [], "mse": [], "xstart_mse": []}  # per image
    indices = []  # the data index of each image, in the order of ``terms``
    read = 0  # images this rank has read
    while len(indices) < args.num_samples:
        batch, cond = next(data)
        mine = [rank + world * (read + j) for j in range(len(batch))]
        read += len(batch)
        batch = batch.to(dist_util.dev())
        cond = {k: v.to(dist_util.dev()) for k, v in cond.items()}
        metrics = diffusion.calc_bpd_loop(model, batch, clip_denoised=args.clip_denoised, model_kwargs=cond,
                                          generator=ImageNoise(args.seed, mine))
        batch_indices = _gathered(torch.tensor(mine, device=dist_util.dev()), world).tolist()
        for key in terms:
            value = _gathered(metrics[key], world)
            if not bool(torch.isfinite(value).all()):
                raise UsageError(
                    f"{key} came out NaN or infinite for images {min(batch_indices)} to {max(batch_indices)}; "
                    "nothing was written: check the checkpoint, the noise schedule and the model flags"
                )
            terms[key].extend(value.cpu().double().numpy())
        indices.extend(batch_indices)
        logger.log(f"done {len(indices)} samples: bpd={np.mean(terms['total_bpd']):.4f}")
    if rank == 0:
        chosen = [position for position in np.argsort(indices, kind="stable") if indices[position] < args.num_samples]
        means = {key: np.mean([values[p] for p in chosen], axis=0) for key, values in terms.items()}
        bpd = np.asarray([terms["total_bpd"][p] for p in chosen])
        result = {key: float(np.mean(value)) for key, value in means.items()}
        result.update(num_images=len(bpd), bpd_stderr=float(bpd.std(ddof=1) / np.sqrt(len(bpd))) if len(bpd) > 1 else None,
                      model_sha256=weights.sha256, settings=vars(args))
        for key in ADM_TERMS:
            value = means[key]
            atomic_write_bytes(os.path.join(args.output_dir, f"{key}_terms.npz"), _npz_bytes(value))
        atomic_write_text(os.path.join(args.output_dir, "bpd.json"), json.dumps(result, indent=1, default=str))
        logger.log(f"bits/dim {result['total_bpd']:.4f} over {len(bpd)} images")
    dist_util.barrier()


def _npz_bytes(array) -> bytes:
    """An NPZ of one array, as ADM's np.savez(path, array) writes it (arr_0)."""
    buffer = io.BytesIO()
    np.savez(buffer, np.asarray(array))
    return buffer.getvalue()


def _gathered(value: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's rows of ``value``, rank 0's first (the value itself with one rank)."""
    if world == 1:
        return value
    parts = [torch.zeros_like(value) for _ in range(world)]
    dist.all_gather(parts, value)
    return torch.cat(parts)


if __name__ == "__main__":
    cli_main(main)
