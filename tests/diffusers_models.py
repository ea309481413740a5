"""Tiny random-weight diffusers models and script runs that the diffusers tests share."""

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sample_scripts import run_in_process, run_script

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is not installed: pip install 'guided-diffusion-es[diffusers]'"
)

ROOT = Path(__file__).resolve().parents[1]

TRAIN_STEPS = 100
BETA_START, BETA_END = 1e-3, 0.05  # a short linear schedule that still ends near pure noise


def linear_alphas_cumprod() -> torch.Tensor:
    betas = np.linspace(BETA_START, BETA_END, TRAIN_STEPS, dtype=np.float64)
    return torch.from_numpy(np.cumprod(1.0 - betas))


def tiny_unet(in_channels=3, out_channels=3, seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=out_channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    ).eval()


def linear_scheduler(cls, **kwargs):
    return cls(
        num_train_timesteps=TRAIN_STEPS, beta_schedule="linear", beta_start=BETA_START, beta_end=BETA_END, **kwargs
    )


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_ldm():
    torch.manual_seed(0)
    vqvae = diffusers.VQModel(
        in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, num_vq_embeddings=16, vq_embed_dim=3,
    ).eval()
    scheduler = linear_scheduler(diffusers.DDIMScheduler)
    return quiet(diffusers.LDMPipeline(vqvae=vqvae, unet=tiny_unet(seed=1), scheduler=scheduler))


class _RunsStderr:
    """sys.stderr as it is at each write: the one a script run in this process writes to."""

    def write(self, text):
        return sys.stderr.write(text)

    def flush(self):
        sys.stderr.flush()


def sample_in_process(*flags, check=True, env=None):
    """scripts/diffusers_sample.py --progress=False FLAGS by sample_scripts.run_in_process, with the
    log messages of diffusers, transformers and huggingface_hub on the run's stderr, as a child
    prints them: their handlers hold the stderr they were created with (pytest's), not the run's."""
    handlers = [h for library in ("diffusers", "transformers", "huggingface_hub")
                for h in logging.getLogger(library).handlers if isinstance(h, logging.StreamHandler)]
    streams = [h.stream for h in handlers]
    try:
        for handler in handlers:
            handler.stream = _RunsStderr()
        return run_in_process("diffusers_sample.py", "--progress=False", *flags, check=check, env=env)
    finally:
        for handler, stream in zip(handlers, streams):
            handler.stream = stream


def sample_in_child(*flags, check=True):
    """scripts/diffusers_sample.py --progress=False FLAGS as a user runs it, in a child process."""
    return run_script("diffusers_sample.py", "--progress=False", *flags, check=check)


class NoQuantization(torch.nn.Module):
    """In place of a VQModel's codebook lookup, so that the decoded image is a smooth function of
    the latents and a small change of them (lambda, a step) shows in the pixels."""

    def forward(self, h):
        return h, torch.zeros(h.shape[0]), None


def make_pipe(kind, prediction=None):
    """Tiny pipelines of a model predicting ``prediction`` (None: the schedulers' default, noise).
    Their schedulers spell out timestep_spacing="leading" as a saved scheduler_config.json does, so
    a scheduler built from the config inherits it (where Euler's init_noise_sigma before
    set_timesteps is not its value after)."""
    leading = dict(timestep_spacing="leading", **({"prediction_type": prediction} if prediction else {}))
    if kind == "ddpm_learned":  # ADM-like: noise and a learned-range variance
        scheduler = linear_scheduler(diffusers.DDPMScheduler, variance_type="learned_range", clip_sample=True,
                                     **leading)
        return quiet(diffusers.DDPMPipeline(unet=tiny_unet(out_channels=6), scheduler=scheduler))
    if kind == "ddpm":
        scheduler = linear_scheduler(diffusers.DDPMScheduler, variance_type="fixed_small", **leading)
        return quiet(diffusers.DDPMPipeline(unet=tiny_unet(seed=2), scheduler=scheduler))
    if kind == "ddim":
        return quiet(diffusers.DDIMPipeline(unet=tiny_unet(seed=3),
                                            scheduler=linear_scheduler(diffusers.DDIMScheduler, **leading)))
    pipe = tiny_ldm()
    pipe.vqvae.quantize = NoQuantization()
    if kind == "ldm":
        pipe.scheduler = linear_scheduler(diffusers.DDIMScheduler, **leading)
    elif kind == "ldm_sde":  # a stochastic scheduler of its own
        pipe.scheduler = linear_scheduler(diffusers.DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++",
                                          **leading)
    elif kind == "ldm_pndm":
        pipe.scheduler = linear_scheduler(diffusers.PNDMScheduler, **leading)
    else:
        raise AssertionError(kind)
    return pipe
