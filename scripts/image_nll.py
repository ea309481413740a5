"""Approximate the bits/dimension of a data set under a diffusion model (ADM's image_nll.py).

Example:
    python scripts/image_nll.py --config iddpm_cifar10_uncond --model_path cifar10_uncond_50M_500K.pt \
        --data_dir cifar_test --num_samples 1000 --batch_size 50
Writes bpd.json (mean bits/dim, its standard error, and the per-term means) to the output folder.
"""

import argparse
import json
import os

import numpy as np
import torch
import torch.distributed as dist

from adm_common.cli import cli_main
from adm_common.errors import UsageError
from adm_common.files import atomic_write_text
from guided_diffusion import dist_util, logger
from guided_diffusion.image_datasets import load_data
from guided_diffusion.run import pipeline as sampling
from guided_diffusion.run.configs import parse_args_with_config
from guided_diffusion.script_util import add_dict_to_argparser, model_and_diffusion_defaults


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
    torch.manual_seed(args.seed + dist_util.get_rank())  # the prior/VLB noise of each rank
    world = dist_util.get_world_size()
    per_image = {"total_bpd": [], "prior_bpd": [], "vb": [], "mse": [], "xstart_mse": []}
    seen = 0
    while seen < args.num_samples:
        batch, cond = next(data)
        batch = batch.to(dist_util.dev())
        cond = {k: v.to(dist_util.dev()) for k, v in cond.items()}
        metrics = diffusion.calc_bpd_loop(model, batch, clip_denoised=args.clip_denoised, model_kwargs=cond)
        for key in per_image:
            value = metrics[key]
            value = value.mean(dim=1) if value.dim() == 2 else value  # per-timestep terms -> per image
            if world > 1:
                gathered = [torch.zeros_like(value) for _ in range(world)]
                dist.all_gather(gathered, value)
                value = torch.cat(gathered)
            if not bool(torch.isfinite(value).all()):
                raise UsageError(
                    f"{key} came out NaN or infinite for images {seen} to {seen + len(value) - 1}; nothing was "
                    "written: check the checkpoint, the noise schedule and the model flags"
                )
            per_image[key].extend(value.cpu().tolist())
        seen += args.batch_size * world
        logger.log(f"done {seen} samples: bpd={np.mean(per_image['total_bpd']):.4f}")
    if dist_util.get_rank() == 0:
        bpd = np.asarray(per_image["total_bpd"][: args.num_samples])
        result = {key: float(np.mean(v[: args.num_samples])) for key, v in per_image.items()}
        result.update(num_images=len(bpd), bpd_stderr=float(bpd.std(ddof=1) / np.sqrt(len(bpd))) if len(bpd) > 1 else None,
                      model_sha256=weights.sha256, settings=vars(args))
        atomic_write_text(os.path.join(args.output_dir, "bpd.json"), json.dumps(result, indent=1, default=str))
        logger.log(f"bits/dim {result['total_bpd']:.4f} over {len(bpd)} images")
    dist_util.barrier()


if __name__ == "__main__":
    cli_main(main)
