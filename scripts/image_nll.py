"""Approximate the bits/dimension of a data set under a diffusion model (ADM's image_nll.py).

Example:
    python scripts/image_nll.py --config iddpm_cifar10_uncond --model_path cifar10_uncond_50M_500K.pt \
        --data_dir cifar_test --num_samples 1000 --batch_size 50
Writes bpd.json (mean bits/dim, its standard error, and the per-term means) to the output folder,
and ADM's vb_terms.npz, mse_terms.npz and xstart_mse_terms.npz (arr_0: each term's mean over the
images, per timestep).

Image i of the data is noised from (--seed, i), so the numbers do not depend on the batch size or
the rank count (guided_diffusion/analysis/bits_per_dim.py says how this differs from ADM).
"""

import argparse
import json
import os

from adm_common.cli import cli_main
from adm_common.files import NpzWriter, atomic_write_text
from guided_diffusion import dist_util, logger
from guided_diffusion.analysis.bits_per_dim import bits_per_dim, summary
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
    per_image = bits_per_dim(model, diffusion, data, args.num_samples, args.seed, args.clip_denoised)
    if dist_util.get_rank() == 0:
        result, adm_terms = summary(per_image)
        result.update(model_sha256=weights.sha256, settings=vars(args))
        for key, value in adm_terms.items():  # as ADM's np.savez(path, array): arr_0
            with NpzWriter(os.path.join(args.output_dir, f"{key}_terms.npz")) as writer:
                writer.add("arr_0", value)
        atomic_write_text(os.path.join(args.output_dir, "bpd.json"), json.dumps(result, indent=1, default=str))
        logger.log(f"bits/dim {result['total_bpd']:.4f} over {result['num_images']} images")
    dist_util.barrier()


if __name__ == "__main__":
    cli_main(main)
