"""Train a super-resolution diffusion model (the network also sees the image downsampled to --small_size).

ADM's command line, plus the new training flags of image_train.py (--max_steps, --use_bf16,
--input_perturbation, --seed, --log_dir, --allow_incomplete_resume, --skip_bad_images), which also
says what the step limits mean and how a stopped run resumes.
Example:
    python scripts/super_res_train.py --data_dir images/ --large_size 256 --small_size 64 \
        --num_channels 192 --num_res_blocks 2 --learn_sigma True --batch_size 4 --log_dir runs/sr
"""

import argparse

from guided_diffusion import dist_util, logger
from guided_diffusion.image_datasets import load_superres_data
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.run.collective import together
from adm_common.cli import cli_main
from guided_diffusion.script_util import (
    NUM_CLASSES,
    add_dict_to_argparser,
    args_to_dict,
    diffusion_training_defaults,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)
from guided_diffusion.train_util import parse_resume_step_from_filename, start_training, train_loop_from_args


def create_argparser():
    defaults = diffusion_training_defaults()
    defaults.update(sr_model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)

    def build():
        model, diffusion = sr_create_model_and_diffusion(**args_to_dict(args, sr_model_and_diffusion_defaults().keys()))
        return model, diffusion, create_named_schedule_sampler(args.schedule_sampler, diffusion)

    with start_training(args, build) as run:
        model, diffusion, schedule_sampler = run.built
        model.to(dist_util.dev())
        logger.log("created model and diffusion; creating data loader...")
        data = together(lambda: load_superres_data(
            args.data_dir,
            args.batch_size,
            large_size=args.large_size,
            small_size=args.small_size,
            class_cond=args.class_cond,
            seed=args.seed,
            start_batch=parse_resume_step_from_filename(args.resume_checkpoint),
            num_classes=NUM_CLASSES,  # ADM's super-resolution models have ImageNet's classes
            skip_bad_images=args.skip_bad_images,
        ))
        logger.log("training...")
        train_loop_from_args(args, model, diffusion, data, schedule_sampler).run_loop()


if __name__ == "__main__":
    cli_main(main)
