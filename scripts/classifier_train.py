"""Train a noise-aware classifier (for classifier guidance) on images.

ADM's command line, plus --use_bf16 (bfloat16 autocast), --seed, --log_dir,
--allow_incomplete_resume (resume from a checkpoint set that lacks its optimizer state) and
--skip_bad_images (leave out unreadable images instead of refusing the data folder). Labels are the
file-name prefixes before the first "_" (or the digits, with --data_dir digits); data with more
classes than --num_classes is refused before training. --iterations N ends the run at step N, as
ADM's loop does (0: no step at all); a checkpoint already at N says so and exits 0, one past it is
refused. Rerunning a stopped run's command (same --log_dir) resumes it from its newest complete
checkpoint set; one run at a time per --log_dir.
Example:
    python scripts/classifier_train.py --data_dir digits --image_size 8 --num_classes 10 \
        --classifier_width 32 --classifier_depth 1 --classifier_channel_mult 1,2 \
        --classifier_attention_resolutions "" --classifier_pool adaptive --batch_size 64 \
        --iterations 2000 --log_dir runs/digits_classifier
"""

import argparse

from guided_diffusion import dist_util, logger
from guided_diffusion.image_datasets import load_data
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.run.collective import together
from adm_common.cli import cli_main
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    classifier_and_diffusion_defaults,
    classifier_training_defaults,
    create_classifier_and_diffusion,
)
from guided_diffusion.train_util import ClassifierTrainLoop, parse_resume_step_from_filename, start_training


def create_argparser():
    defaults = classifier_training_defaults()
    defaults.update(classifier_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)

    def build():
        model, diffusion = create_classifier_and_diffusion(
            **args_to_dict(args, classifier_and_diffusion_defaults().keys())
        )
        return model, diffusion, create_named_schedule_sampler(args.schedule_sampler, diffusion)

    with start_training(args, build) as run:
        model, diffusion, schedule_sampler = run.built
        model.to(dist_util.dev())
        logger.log("created model and diffusion; creating data loader...")
        data = together(lambda: load_data(
            data_dir=args.data_dir,
            batch_size=args.batch_size,
            image_size=args.image_size,
            class_cond=True,
            random_crop=True,
            seed=args.seed,
            start_batch=parse_resume_step_from_filename(args.resume_checkpoint),
            num_classes=args.num_classes,
            skip_bad_images=args.skip_bad_images,
        ))
        val_data = None
        if args.val_data_dir:
            val_data = together(lambda: load_data(
                data_dir=args.val_data_dir,
                batch_size=args.batch_size,
                image_size=args.image_size,
                class_cond=True,
                seed=args.seed,
                num_classes=args.num_classes,
                skip_bad_images=args.skip_bad_images,
            ))
        logger.log("training classifier model...")
        ClassifierTrainLoop(
            model=model,
            diffusion=diffusion,
            data=data,
            val_data=val_data,
            noised=args.noised,
            schedule_sampler=schedule_sampler,
            eval_interval=args.eval_interval,
            batch_size=args.batch_size,
            microbatch=args.microbatch,
            lr=args.lr,
            weight_decay=args.weight_decay,
            lr_anneal_steps=args.iterations if args.anneal_lr else 0,
            max_steps=args.iterations,  # 0: no step, as ADM's range(iterations - resume_step)
            log_interval=args.log_interval,
            save_interval=args.save_interval,
            resume_checkpoint=args.resume_checkpoint,
            use_fp16=args.classifier_use_fp16,
            use_bf16=args.use_bf16,
            seed=args.seed,
            allow_incomplete_resume=args.allow_incomplete_resume,
        ).run_loop()

if __name__ == "__main__":
    cli_main(main)
