"""The tiny random-weight checkpoints and the script runner that the sampling-script tests share."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from guided_diffusion import script_util as su

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
            num_head_channels=16, diffusion_steps=40, noise_schedule="cosine", learn_sigma=True,
            use_new_attention_order=True, resblock_updown=True)
TINY_FLAGS = [f"--{k}={v}" for k, v in TINY.items()] + ["--timestep_respacing=6"]


def script_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PYTHONPATH=str(ROOT))
    for name in ("OPENAI_LOGDIR", "MASTER_ADDR", "MASTER_PORT"):  # a script starts as from a fresh shell
        env.pop(name, None)
    return env


def run_script(name, *flags, launcher=(), check=True):
    cmd = [*launcher, sys.executable, str(ROOT / "scripts" / name), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=script_env(), timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _randomized(net):
    """ADM zero-initialises output layers; perturb every weight so all branches matter."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.state_dict()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    uncond = dict(su.model_and_diffusion_defaults(), **TINY)
    model, _ = su.create_model_and_diffusion(**uncond)
    torch.save(_randomized(model), folder / "uncond.pt")
    cond = dict(uncond, class_cond=True, num_classes=10)
    model, _ = su.create_model_and_diffusion(**cond)
    torch.save(_randomized(model), folder / "cond.pt")
    classifier = su.create_classifier(8, False, 32, 1, "4", True, True, "attention", classifier_channel_mult="1,2",
                                      num_classes=10)
    torch.save(_randomized(classifier), folder / "classifier.pt")
    return folder


