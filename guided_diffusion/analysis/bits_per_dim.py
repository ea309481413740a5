"""Bits per dimension of data images under a diffusion model (scripts/image_nll.py), per image.

Image i of the data (in file order; rank r of W reads images r, r + W, ...) is noised from the
per-image stream of (seed, i) at every timestep of ADM's ``calc_bpd_loop``, so its terms, and
their mean over the first ``num_samples`` images, do not depend on the batch size or the rank
count. ADM draws that noise from torch's global RNG and averages over every image it evaluated,
also those past ``num_samples`` in the last batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from adm_common.errors import UsageError
from guided_diffusion import dist_util, logger
from guided_diffusion.image_noise import ImageNoise

TERMS = ("total_bpd", "prior_bpd", "vb", "mse", "xstart_mse")  # calc_bpd_loop's outputs
ADM_TERMS = ("vb", "mse", "xstart_mse")  # the per-timestep terms ADM saves as {name}_terms.npz


def bits_per_dim(model, diffusion, data, num_samples: int, seed: int, clip_denoised: bool = True) -> dict:
    """{term: float64 array [num_samples] or [num_samples, T]} of the first ``num_samples`` data
    images, in data order, on every rank. ``data`` yields this rank's (images, model kwargs)
    batches in file order (``load_data(..., deterministic=True)``). A NaN or infinite term is one
    UsageError line naming the images. Progress is logged after each batch, as ADM logs it."""
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    terms = {key: [] for key in TERMS}
    indices = []  # the data index of each image, in the order of ``terms``
    read = 0  # images this rank has read
    while len(indices) < num_samples:
        batch, cond = next(data)
        mine = [rank + world * (read + j) for j in range(len(batch))]
        read += len(batch)
        batch = batch.to(dist_util.dev())
        cond = {k: v.to(dist_util.dev()) for k, v in cond.items()}
        metrics = diffusion.calc_bpd_loop(model, batch, clip_denoised=clip_denoised, model_kwargs=cond,
                                          generator=ImageNoise(seed, mine))
        batch_indices = _gathered(torch.tensor(mine, device=dist_util.dev()), world).tolist()
        for key in TERMS:
            value = _gathered(metrics[key], world)
            if not bool(torch.isfinite(value).all()):
                raise UsageError(
                    f"{key} came out NaN or infinite for images {min(batch_indices)} to {max(batch_indices)}; "
                    "nothing was written: check the checkpoint, the noise schedule and the model flags"
                )
            terms[key].extend(value.cpu().double().numpy())
        indices.extend(batch_indices)
        logger.log(f"done {len(indices)} samples: bpd={np.mean(terms['total_bpd']):.4f}")
    chosen = [p for p in np.argsort(indices, kind="stable") if indices[p] < num_samples]
    return {key: np.stack([values[p] for p in chosen]) for key, values in terms.items()}


def summary(per_image: dict) -> tuple[dict, dict]:
    """(bpd.json's numbers: each term's mean, the image count and total_bpd's standard error;
    ADM's {name: per-timestep mean} of ADM_TERMS) of ``bits_per_dim``'s result."""
    bpd = per_image["total_bpd"]
    result = {key: float(np.mean(values)) for key, values in per_image.items()}
    result.update(num_images=len(bpd), bpd_stderr=float(bpd.std(ddof=1) / np.sqrt(len(bpd))) if len(bpd) > 1 else None)
    return result, {key: per_image[key].mean(axis=0) for key in ADM_TERMS}


def _gathered(value: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's rows of ``value``, rank 0's first (the value itself with one rank)."""
    if world == 1:
        return value
    parts = [torch.zeros_like(value) for _ in range(world)]
    dist.all_gather(parts, value)
    return torch.cat(parts)
