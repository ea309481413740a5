"""Train a super-resolution diffusion model (the network also sees the image downsampled to --small_size).

ADM's command line, plus the new training flags of image_train.py (--max_steps, --use_bf16,
--input_perturbation, --seed, --log_dir, --allow_incomplete_resume, --skip_bad_images), which also
says what the step limits mean and how a stopped run resumes.
Example:
    python scripts/super_res_train.py --data_dir images/ --large_size 256 --small_size 64 \
        --num_channels 192 --num_res_blocks 2 --learn_sigma True --batch_size 4 --log_dir runs/sr
"""

from adm_common.cli import cli_main
from guided_diffusion.run.training import super_res_train_argparser, train_super_res_model


def create_argparser():
    return super_res_train_argparser(__doc__.splitlines()[0])


def main(argv=None):
    train_super_res_model(create_argparser().parse_args(argv))


if __name__ == "__main__":
    cli_main(main)
