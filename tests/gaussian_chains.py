"""Shared by the exposure-bias and lambda-search tests: Gaussian data with its exact noise predictor
(so chains have closed forms) and a tiny random-weight UNet."""

import math
from pathlib import Path

import numpy as np
import torch

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.script_util import (
    create_gaussian_diffusion,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)

ROOT = Path(__file__).resolve().parents[1]
BASE_STEPS = 100
NUM_CHAINS = 400
IMAGE_SHAPE = (3, 8, 8)


class GaussianEps(torch.nn.Module):
    """The exact E[eps | x_t] for x0 ~ N(0, s2 I), times ``mult``; t is the original timestep."""

    def __init__(self, s2, mult=1.0, steps=BASE_STEPS, schedule="linear"):
        super().__init__()
        self.s2, self.mult = s2, mult
        self.abar = torch.from_numpy(np.cumprod(1 - gd.get_named_beta_schedule(schedule, steps)))

    def forward(self, x, t):
        abar = self.abar[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return self.mult * torch.sqrt(1 - abar) * x / (abar * self.s2 + 1 - abar)


def gaussian_diffusion(respacing="10"):
    return create_gaussian_diffusion(steps=BASE_STEPS, noise_schedule="linear", timestep_respacing=respacing)


def gaussian_data(s2, n=NUM_CHAINS, seed=0):
    return torch.randn(n, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(seed)) * math.sqrt(s2)


def closed_form(diffusion, s2, mult=1.0, lambdas=None, calibrate=False, ddim=False):
    """Per step in sampling order: std of x_t - sqrt(abar) x0, norm ratio, lambda; and the final std.

    ``lambdas[t]`` divides the noise at step t; ``calibrate`` sets it to the norm ratio at x_t
    (sampling over forward-noised), which for isotropic Gaussians is sqrt(V_sampling / V_forward).
    Ancestral steps use ADM's fixed-large variance (beta_t; the posterior variance at t = 0).
    """
    abar = diffusion.alphas_cumprod
    steps = diffusion.num_timesteps
    variance = np.append(diffusion.posterior_variance[1], diffusion.betas[1:])
    c, v = math.sqrt(abar[-1]), 1 - abar[-1]
    rows = []
    for t in range(steps - 1, -1, -1):
        a, sigma = math.sqrt(abar[t]), math.sqrt(1 - abar[t])
        v_sampling, v_forward = c * c * s2 + v, abar[t] * s2 + 1 - abar[t]
        ratio = math.sqrt(v_sampling / v_forward)
        lam = ratio if calibrate else (1.0 if lambdas is None else lambdas[t])
        gain = mult * sigma / v_forward / lam  # eps / lambda = gain * x_t
        x0_coef = (1 - sigma * gain) / a
        if ddim:
            prev = diffusion.alphas_cumprod_prev[t]
            A, B2 = math.sqrt(prev) * x0_coef + math.sqrt(1 - prev) * gain, 0.0
        else:
            A = diffusion.posterior_mean_coef1[t] * x0_coef + diffusion.posterior_mean_coef2[t]
            B2 = variance[t] if t > 0 else 0.0
        rows.append({"t": t, "std": math.sqrt((c - a) ** 2 * s2 + v), "ratio": ratio, "lambda": lam,
                     "marginal": math.sqrt(v_sampling), "target": sigma})
        c, v = A * c, A * A * v + B2
    return rows, math.sqrt(c * c * s2 + v)


def tiny_unet_and_diffusion():
    flags = dict(model_and_diffusion_defaults(), image_size=8, num_channels=32, num_res_blocks=1,
                 channel_mult="1,2", attention_resolutions="4", num_head_channels=16, diffusion_steps=40,
                 noise_schedule="cosine", learn_sigma=True, timestep_respacing="5")
    torch.manual_seed(1)
    model, diffusion = create_model_and_diffusion(**flags)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval(), diffusion


TINY_FLAGS = ["--image_size=8", "--num_channels=32", "--num_res_blocks=1", "--channel_mult=1,2",
              "--attention_resolutions=4", "--num_head_channels=16", "--diffusion_steps=40",
              "--noise_schedule=cosine", "--learn_sigma=True", "--timestep_respacing=5", "--progress=False"]
