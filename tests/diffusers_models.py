"""Tiny random-weight diffusers models and script runs that the diffusers tests share."""

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

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


def run_script_in_process(monkeypatch, capsys, *flags):
    """diffusers_sample.py with ``flags`` as its command line runs it: (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["diffusers_sample.py", *flags])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "scripts" / "diffusers_sample.py"), run_name="__main__")
    return exit_info.value.code, capsys.readouterr().err
