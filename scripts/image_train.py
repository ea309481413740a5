"""Train a diffusion model on images.

ADM's command line, plus --max_steps (the step at which the run ends: 0 takes no step, -1, the
default, never ends), --use_bf16 (bfloat16 autocast), --input_perturbation GAMMA (DDPM-IP; ADM-ES's
--eps_scaler GAMMA does the same), --seed, --log_dir (checkpoints and logs), --allow_incomplete_resume
and --skip_bad_images (leave out unreadable images instead of refusing the data folder).
--data_dir takes a folder of images, or digits / digits:SIZE (scikit-learn's 8x8 digits) offline.
--lr_anneal_steps N decays the learning rate to 0 and ends the run at step N (0, ADM's default: neither).
A run whose end is already reached by its checkpoint says so and exits 0; one resumed past its end
is refused. Rerunning a stopped run's command (same --log_dir) resumes it from its newest complete
checkpoint set; one run at a time per --log_dir.
Example:
    python scripts/image_train.py --data_dir digits --image_size 8 --num_channels 32 --channel_mult 1,2 \
        --attention_resolutions "" --class_cond True --num_classes 10 --batch_size 64 --lr 2e-4 \
        --max_steps 3000 --save_interval 1000 --log_dir runs/digits
    mpirun -n 8 python scripts/image_train.py ...   (or torchrun --nproc_per_node 8 ...)
"""

import argparse

from guided_diffusion import dist_util, logger
from guided_diffusion.image_datasets import load_data
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.run.collective import together
from adm_common.errors import UsageError
from adm_common.cli import cli_main
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    diffusion_training_defaults,
    model_and_diffusion_defaults,
)
from guided_diffusion.train_util import parse_resume_step_from_filename, start_training, train_loop_from_args


def create_argparser():
    defaults = diffusion_training_defaults()
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    if args.eps_scaler and args.input_perturbation:
        raise UsageError("--eps_scaler (ADM-ES's input perturbation) and --input_perturbation are the same "
                         "DDPM-IP perturbation; give one of them")

    def build():
        model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))
        return model, diffusion, create_named_schedule_sampler(args.schedule_sampler, diffusion)

    with start_training(args, build) as run:
        model, diffusion, schedule_sampler = run.built
        model.to(dist_util.dev())
        logger.log("created model and diffusion; creating data loader...")
        data = together(lambda: load_data(
            data_dir=args.data_dir,
            batch_size=args.batch_size,
            image_size=args.image_size,
            class_cond=args.class_cond,
            seed=args.seed,
            start_batch=parse_resume_step_from_filename(args.resume_checkpoint),
            num_classes=args.num_classes,
            skip_bad_images=args.skip_bad_images,
        ))
        logger.log("training...")
        train_loop_from_args(args, model, diffusion, data, schedule_sampler).run_loop()


if __name__ == "__main__":
    cli_main(main)
