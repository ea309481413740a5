"""Generate a large batch of image samples from a model and save them as a large numpy array.

ADM's command line, plus --eps_scale (Epsilon Scaling), --seed, --output_dir and --config.
Example:
    python scripts/image_sample.py --config imagenet64_cond --model_path 64x64_diffusion.pt \
        --timestep_respacing 100 --num_samples 50000 --batch_size 256 --eps_scale 1.006
"""

import argparse

from adm_common.cli import cli_main
from guided_diffusion.run import pipeline as sampling
from guided_diffusion.run.configs import parse_args_with_config
from guided_diffusion.script_util import add_dict_to_argparser, add_sampling_args, model_and_diffusion_defaults


def create_argparser():
    defaults = dict(clip_denoised=True, num_samples=10000, batch_size=16, use_ddim=False, model_path="")
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    add_sampling_args(parser)
    return parser


def main():
    args, config, _ = parse_args_with_config(create_argparser())
    sampling.start(args)
    model, diffusion, weights = sampling.load_adm_model(args)
    eps = sampling.decide_eps_scale(args, config, diffusion.num_timesteps)
    sample_batch = sampling.batch_sampler(model, diffusion, args, eps.schedule, (3, args.image_size, args.image_size),
                                          num_classes=args.num_classes if args.class_cond else None,
                                          time_shift=sampling.decide_time_shift(args))
    job = sampling.SamplingJob(sample_batch, (args.image_size, args.image_size, 3), args.class_cond, eps, [weights])
    sampling.run_sampling_job(args, config, job)


if __name__ == "__main__":
    cli_main(main)
