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

from adm_common.cli import cli_main
from guided_diffusion.run.training import image_train_argparser, train_image_model


def create_argparser():
    return image_train_argparser(__doc__.splitlines()[0])


def main(argv=None):
    train_image_model(create_argparser().parse_args(argv))


if __name__ == "__main__":
    cli_main(main)
