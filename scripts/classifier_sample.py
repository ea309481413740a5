"""Like image_sample.py, but guided by a noise-aware classifier (ADM's classifier guidance).

Example:
    python scripts/classifier_sample.py --config imagenet128_cond --model_path 128x128_diffusion.pt \
        --classifier_path 128x128_classifier.pt --classifier_scale 0.5 --timestep_respacing 100 \
        --num_samples 50000 --batch_size 100 --eps_scale 1.004
"""

import argparse
import math

from adm_common.cli import cli_main
from adm_common.errors import UsageError
from guided_diffusion.run import pipeline as sampling
from guided_diffusion.run.configs import parse_args_with_config
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    add_sampling_args,
    classifier_defaults,
    create_classifier,
    model_and_diffusion_defaults,
)


def create_argparser():
    defaults = dict(
        clip_denoised=True, num_samples=10000, batch_size=16, use_ddim=False, model_path="",
        classifier_path="", classifier_scale=1.0,
    )
    defaults.update(model_and_diffusion_defaults())
    defaults.update(classifier_defaults())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    add_sampling_args(parser)
    return parser


def main():
    args, config, explicit = parse_args_with_config(create_argparser())
    if config and config.get("classifier_scale") is not None and "classifier_scale" not in explicit:
        args.classifier_scale = float(config["classifier_scale"])
    if not math.isfinite(args.classifier_scale):
        raise UsageError(f"--classifier_scale must be a finite number, got {args.classifier_scale}; ADM used 0.5 to 10")
    sampling.start(args)
    model, diffusion, weights = sampling.load_adm_model(args)
    classifier, _, classifier_weights = sampling.load_network(
        create_classifier, args, classifier_defaults().keys(), args.classifier_path, "classifier", args.image_size,
    )
    eps = sampling.decide_eps_scale(args, config, diffusion.num_timesteps)
    sample_batch = sampling.batch_sampler(
        model, diffusion, args, eps.schedule, (3, args.image_size, args.image_size),
        num_classes=args.num_classes, classifier=classifier, classifier_scale=args.classifier_scale,
        model_takes_labels=args.class_cond, time_shift=sampling.decide_time_shift(args),
    )
    job = sampling.SamplingJob(sample_batch, (args.image_size, args.image_size, 3), True, eps,
                               [weights, classifier_weights])
    sampling.run_sampling_job(args, config, job)


if __name__ == "__main__":
    cli_main(main)
