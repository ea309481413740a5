"""The tiny training set-up the training tests share: an 8 px UNet on scikit-learn's digits, its
TrainLoop, and the training commands run in-process (the scripts' own functions, with their flags, or the
scripts themselves through sample_scripts.run_in_process)."""

from pathlib import Path

import torch

from guided_diffusion.image_datasets import load_data
from guided_diffusion.run.training import (
    classifier_train_argparser,
    image_train_argparser,
    super_res_train_argparser,
    train_classifier,
    train_image_model,
    train_super_res_model,
)
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion.train_util import TrainLoop, parse_resume_step_from_filename

REPO = Path(__file__).resolve().parents[1]
STEPS = 50  # diffusion steps of the tiny models

# The tiny model as command-line flags (add --data_dir and --batch_size).
TINY_FLAGS = ["--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1",
              "--attention_resolutions", "", "--diffusion_steps", str(STEPS), "--lr", "1e-3", "--ema_rate", "0.9"]

COMMANDS = {  # script name -> (its flags, what it runs)
    "image_train": (image_train_argparser, train_image_model),
    "classifier_train": (classifier_train_argparser, train_classifier),
    "super_res_train": (super_res_train_argparser, train_super_res_model),
}


def tiny_model_and_diffusion(class_cond=False, learn_sigma=False, use_fp16=False, init_seed=0, num_channels=32):
    flags = model_and_diffusion_defaults()
    flags.update(
        image_size=8, num_channels=num_channels, num_res_blocks=1, channel_mult="1", attention_resolutions="",
        diffusion_steps=STEPS, class_cond=class_cond, num_classes=10, learn_sigma=learn_sigma, use_fp16=use_fp16,
    )
    torch.manual_seed(init_seed)
    return create_model_and_diffusion(**flags)


def make_loop(folder, data=None, resume="", class_cond=False, model_and_diffusion=None, batch_size=8, **overrides):
    """A TrainLoop of the tiny model in ``folder``, resuming from ``resume`` with the data where it was."""
    model, diffusion = model_and_diffusion or tiny_model_and_diffusion(class_cond=class_cond)
    if data is None:
        data = load_data(data_dir="digits", batch_size=batch_size, image_size=8, class_cond=class_cond, seed=1,
                         start_batch=parse_resume_step_from_filename(resume))
    kwargs = dict(batch_size=batch_size, microbatch=-1, lr=1e-3, ema_rate="0.9", log_interval=1000,
                  save_interval=1000, resume_checkpoint=str(resume), seed=0, checkpoint_dir=str(folder))
    kwargs.update(overrides)
    Path(folder).mkdir(parents=True, exist_ok=True)
    return TrainLoop(model=model, diffusion=diffusion, data=data, **kwargs)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def train_command(name, argv) -> None:
    """What ``scripts/{name}.py ARGV`` runs, in this process (errors raised, not printed)."""
    parser, train = COMMANDS[name]
    train(parser().parse_args(argv))


def cli_status(name, argv, capsys=None):
    """``scripts/{name}.py ARGV`` in this process as its command line ends: (exit status, stderr, stdout).
    (``capsys`` is not needed: sample_scripts.run_in_process captures the script's output itself.)"""
    from sample_scripts import run_in_process

    proc = run_in_process(f"{name}.py", *argv, check=False)
    return proc.returncode, proc.stderr.strip(), proc.stdout


def one_line(code, err):
    """The one ``error:`` line of a refused command (exit status 2, no traceback)."""
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err

