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

from adm_common.cli import cli_main
from guided_diffusion.run.training import classifier_train_argparser, train_classifier


def create_argparser():
    return classifier_train_argparser(__doc__.splitlines()[0])


def main(argv=None):
    train_classifier(create_argparser().parse_args(argv))


if __name__ == "__main__":
    cli_main(main)
