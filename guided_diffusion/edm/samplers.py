"""EDM's samplers (Karras et al., NeurIPS 2022) with Epsilon Scaling, on any denoiser.

A denoiser is a callable ``D(x, sigma, class_labels)`` returning its estimate of the clean image
from x = x0 + sigma * noise; ``sigma`` arrives as a 0-d tensor (one noise level for the whole
batch, as EDM's sampler passes it; ADMDenoiser also takes one value per sample). It may carry
``sigma_min`` / ``sigma_max`` (the sampler's range is clipped to them) and ``round_sigma``
(noise levels snap to the ones the network knows), as EDM's networks do; ``BoundDenoiser``
keeps them on a wrapped call. ``ADMDenoiser`` makes one out of an ADM epsilon model.

Randomness comes in from the caller: per-image streams (image_noise.ImageNoise), or EDM's per-seed
generators (``EDMSeedNoise``), with which karras_sample reproduces EDM's generate.py bit for bit
on the same device (checked against EDM's code on its own pickles: VP, EDM, iDDPM, Heun and
Euler, churn, iddpm levels; and against EDM-ES's generate.py with lambda 1.0006).

The probability-flow ODE is dx/dsigma = eps(x; sigma) with eps = (x - D(x; sigma)) / sigma.
Epsilon Scaling divides eps by lambda at every network evaluation, i.e. uses
D' = x - sigma * eps / lambda in place of D, for the Euler step and the Heun correction alike.
Step i of N in sampling order (i = 0 from sigma_max) has lambda at chain index
t = sampling_order_t(i, N); the Heun correction of a step uses that step's lambda.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from guided_diffusion.edm.networks import iddpm_sigma_levels
from guided_diffusion.eps_scaling import resolve_eps_scale, sampling_order_t, scale_eps
from guided_diffusion.image_noise import standard_normal

__all__ = [
    "SOLVERS", "DISCRETIZATIONS", "edm_sigmas", "iddpm_sigmas", "sampling_sigmas",
    "network_evaluations", "karras_sample", "BoundDenoiser", "EDMSeedNoise", "ADMDenoiser",
]

SOLVERS = ("heun", "euler")
DISCRETIZATIONS = ("edm", "iddpm")


def _check_steps(num_steps):
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2, got {num_steps!r}")


def _check_range(sigma_min, sigma_max):
    if not 0 < sigma_min < sigma_max or not math.isfinite(sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def edm_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's noise levels: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, float64."""
    _check_steps(num_steps)
    _check_range(sigma_min, sigma_max)
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    ramp = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def iddpm_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 81.0, M: int = 1000,
                 C_1: float = 0.001, C_2: float = 0.008) -> torch.Tensor:
    """iDDPM's noise levels as EDM's ablations use them: N of its M levels in [sigma_min, sigma_max], evenly picked.

    The levels are EDM's float64 ones (edm.networks.iddpm_sigma_levels), so the range test keeps
    the same levels as EDM's sampler when a bound is a network's float32 level.
    """
    _check_steps(num_steps)
    _check_range(sigma_min, sigma_max)
    levels = iddpm_sigma_levels(M, C_1, C_2, dtype=torch.float64)
    inside = levels[(levels >= sigma_min) & (levels <= sigma_max)]
    if len(inside) < 2:
        raise ValueError(f"iDDPM has fewer than 2 noise levels in [{sigma_min}, {sigma_max}]; widen the range")
    picks = ((len(inside) - 1) / (num_steps - 1) * torch.arange(num_steps, dtype=torch.float64)).round().long()
    return inside[picks]


def sampling_sigmas(denoiser, num_steps: int, discretization: str = "edm", sigma_min=None, sigma_max=None,
                    rho: float = 7.0) -> torch.Tensor:
    """The N noise levels a run visits, then 0: EDM's range clipped to the denoiser's and snapped to its grid."""
    if discretization not in DISCRETIZATIONS:
        raise ValueError(f"discretization {discretization!r} is not one of {', '.join(DISCRETIZATIONS)}")
    defaults = {"edm": (0.002, 80.0), "iddpm": (0.002, 81.0)}[discretization]
    sigma_min = defaults[0] if sigma_min is None else float(sigma_min)
    sigma_max = defaults[1] if sigma_max is None else float(sigma_max)
    sigma_min = max(sigma_min, float(getattr(denoiser, "sigma_min", 0.0)))
    sigma_max = min(sigma_max, float(getattr(denoiser, "sigma_max", math.inf)))
    if discretization == "edm":
        sigmas = edm_sigmas(num_steps, sigma_min, sigma_max, rho)
    else:
        sigmas = iddpm_sigmas(num_steps, sigma_min, sigma_max)
    sigmas = _round_sigma(denoiser, sigmas)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _round_sigma(denoiser, sigma: torch.Tensor) -> torch.Tensor:
    rounding = getattr(denoiser, "round_sigma", None)
    if rounding is None:
        return sigma
    return torch.as_tensor(rounding(sigma)).to(device=sigma.device, dtype=torch.float64)


def network_evaluations(solver: str, num_steps: int) -> int:
    """Network calls of a run: Heun corrects every step but the last (2N - 1), Euler N."""
    return 2 * num_steps - 1 if solver == "heun" else num_steps


@torch.no_grad()
def karras_sample(denoiser, shape, *, num_steps: int = 18, solver: str = "heun", discretization: str = "edm",
                  sigma_min=None, sigma_max=None, rho: float = 7.0, S_churn: float = 0.0, S_min: float = 0.0,
                  S_max: float = math.inf, S_noise: float = 1.0, eps_scale=None, class_labels=None,
                  noise=None, generator=None, churn_generator=None, device=None, progress: bool = False):
    """EDM's Algorithm 2 (``solver='heun'``; its first-order variant with ``'euler'``), with ES.

    ``noise`` is the N(0, I) latent (drawn from ``generator`` when None; the run starts at
    noise * sigma_max). S_churn > 0 adds EDM's stochastic noise on levels in [S_min, S_max], drawn
    from ``churn_generator`` (default ``generator``): a torch.Generator or image_noise.ImageNoise,
    asked only on the steps that churn. A ``churn_generator`` with a ``randn_like(x)`` method
    (``EDMSeedNoise``) is asked on every step instead, churning or not, for noise shaped and typed
    like the float64 x, as EDM's generate.py draws it. ``eps_scale`` is anything
    eps_scaling.parse_eps_scale accepts, with one value per noise level for tables. Returns the
    float64 sample. The arithmetic is EDM's edm_sampler's: with lambda = 1 and EDM's randomness
    the result is EDM's, bit for bit, on the same device.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver {solver!r} is not one of {', '.join(SOLVERS)}")
    _check_steps(num_steps)
    for name, value in (("S_churn", S_churn), ("S_min", S_min), ("S_max", S_max), ("S_noise", S_noise)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    schedule = resolve_eps_scale(eps_scale, None)
    schedule.validate(num_steps)
    if noise is None:
        noise = standard_normal(tuple(shape), generator, device=device)
    elif tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
    device = noise.device if device is None else torch.device(device)
    churn_generator = generator if churn_generator is None else churn_generator
    every_step_noise = getattr(churn_generator, "randn_like", None)

    sigmas = sampling_sigmas(denoiser, num_steps, discretization, sigma_min, sigma_max, rho).to(device)

    def derivative(x, sigma, t):
        """dx/dsigma at (x, sigma) with ES: (x - D(x; sigma)) / sigma / lambda_t."""
        # sigma goes in as one 0-d level for the whole batch, as EDM's sampler passes it (a network
        # then embeds one noise level, not one per image: the float32 rounding EDM's images have)
        denoised = denoiser(x, sigma, class_labels).to(torch.float64)
        return scale_eps((x - denoised) / sigma, schedule, t, num_steps)

    gamma_churn = min(S_churn / num_steps, math.sqrt(2) - 1)
    x = noise.to(device=device, dtype=torch.float64) * sigmas[0]
    steps = range(num_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"{solver} sampling", leave=False)
    for i in steps:
        t = sampling_order_t(i, num_steps)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        drawn = every_step_noise(x) if every_step_noise is not None else None
        if gamma_churn > 0 and S_min <= float(sigma) <= S_max:
            sigma_hat = _round_sigma(denoiser, sigma + gamma_churn * sigma)
            if drawn is None:
                drawn = standard_normal(tuple(shape), churn_generator, device=device).to(torch.float64)
            x = x + (sigma_hat**2 - sigma**2).sqrt() * S_noise * drawn
            sigma = sigma_hat
        d = derivative(x, sigma, t)
        x_next = x + (sigma_next - sigma) * d
        if solver == "heun" and i < num_steps - 1:
            d_next = derivative(x_next, sigma_next, t)
            x_next = x + (sigma_next - sigma) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return x


class BoundDenoiser:
    """``call(x, sigma, class_labels)`` as a denoiser with the noise range and levels of ``network``.

    A wrapper around a network (speed switches, fixed-size chunks, a lambda) hides the network's
    ``sigma_min``, ``sigma_max`` and ``round_sigma``; karras_sample needs them to clip and snap
    its noise levels as EDM's sampler does. This keeps them.
    """

    def __init__(self, call, network):
        self.call = call
        self.network = network

    @property
    def sigma_min(self) -> float:
        return float(getattr(self.network, "sigma_min", 0.0))

    @property
    def sigma_max(self) -> float:
        return float(getattr(self.network, "sigma_max", math.inf))

    def round_sigma(self, sigma):
        rounding = getattr(self.network, "round_sigma", None)
        return torch.as_tensor(sigma) if rounding is None else rounding(sigma)

    def __call__(self, x, sigma, class_labels=None):
        return self.call(x, sigma, class_labels)


class EDMSeedNoise:
    """EDM's per-seed randomness (its generate.py), for one batch of seeds.

    Each seed has its own torch.Generator on the sampling ``device``, seeded with seed mod 2^32;
    a draw takes one row from each in turn. A batch draws, in this order: the float32 latents
    (``randn``), then, for a conditional network, one class index per seed (``one_hot_labels``),
    then at every sampler step one float64 array shaped like x (``randn_like``), which
    karras_sample adds only on the steps that churn. CPU and CUDA generators give different
    numbers: EDM's images are those of the device it ran on.
    """

    def __init__(self, seeds: Sequence[int], device="cpu"):
        self.seeds = [int(s) for s in seeds]
        if not self.seeds:
            raise ValueError("EDMSeedNoise needs at least one seed")
        self.device = torch.device(device)
        self.generators = []
        for seed in self.seeds:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed % (1 << 32))
            self.generators.append(gen)

    def __len__(self) -> int:
        return len(self.seeds)

    def _check(self, shape):
        if shape[0] != len(self.generators):
            raise ValueError(f"asked for a draw of batch {shape[0]} from the generators of {len(self)} seeds")

    def randn(self, shape, device=None, dtype=torch.float32) -> torch.Tensor:
        shape = tuple(shape)
        self._check(shape)
        rows = [torch.randn(shape[1:], generator=g, dtype=dtype, device=self.device) for g in self.generators]
        return torch.stack(rows).to(self.device if device is None else device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, device=x.device, dtype=x.dtype)

    def randint(self, high: int, device=None) -> torch.Tensor:
        rows = [torch.randint(high, (), generator=g, device=self.device) for g in self.generators]
        return torch.stack(rows).to(self.device if device is None else device)

    def one_hot_labels(self, label_dim: int, class_idx: int | None = None, device=None) -> torch.Tensor:
        """Float32 one-hot rows: a random class per seed (drawn even when ``class_idx`` fixes it, as EDM does)."""
        index = self.randint(label_dim, device=device)
        if class_idx is not None:
            if not 0 <= int(class_idx) < label_dim:
                raise ValueError(f"class {class_idx} is outside the network's {label_dim} classes (0..{label_dim - 1})")
            index = torch.full_like(index, int(class_idx))
        return torch.eye(label_dim, device=index.device)[index]


class ADMDenoiser:
    """An ADM epsilon model as an EDM denoiser D(x; sigma, class_labels).

    ADM's x_t = sqrt(abar_t) (x0 + sigma_t eps) with sigma_t = sqrt((1 - abar_t) / abar_t), so
    the network sees c_in x = x / sqrt(sigma^2 + 1) at the discrete step whose sigma_t is nearest
    to sigma (as EDM's iDDPM preconditioning does), and D = x - sigma * eps_pred. Learned-variance
    output channels are dropped. ``alphas_cumprod`` is the diffusion's (for a respaced diffusion,
    pass its ``timestep_map`` too, or use ``from_diffusion``); ``rescale_timesteps`` feeds the
    network t * 1000 / original_num_steps as ADM does.
    """

    def __init__(self, model, alphas_cumprod, *, rescale_timesteps: bool = False, timestep_map=None,
                 original_num_steps: int | None = None):
        abar = np.asarray(alphas_cumprod, dtype=np.float64)
        if abar.ndim != 1 or len(abar) == 0 or not np.all((abar > 0) & (abar < 1)):
            raise ValueError("alphas_cumprod must be a 1-D array of values in (0, 1), one per diffusion step")
        self.model = model
        self.sigmas = torch.from_numpy(np.sqrt((1 - abar) / abar))
        if np.any(np.diff(self.sigmas.numpy()) <= 0):
            raise ValueError("alphas_cumprod must decrease with t (noise must grow along the chain)")
        if timestep_map is None:
            timestep_map = range(len(abar))
        self.timestep_map = torch.as_tensor(list(timestep_map), dtype=torch.int64)
        if len(self.timestep_map) != len(abar):
            raise ValueError(f"timestep_map has {len(self.timestep_map)} entries for {len(abar)} steps")
        self.original_num_steps = len(abar) if original_num_steps is None else int(original_num_steps)
        self.rescale_timesteps = rescale_timesteps
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    @classmethod
    def from_diffusion(cls, model, diffusion):
        """Wrap ``model`` with the schedule of an ADM GaussianDiffusion or SpacedDiffusion."""
        return cls(
            model, diffusion.alphas_cumprod,
            rescale_timesteps=getattr(diffusion, "rescale_timesteps", False),
            timestep_map=getattr(diffusion, "timestep_map", None),
            original_num_steps=getattr(diffusion, "original_num_steps", None),
        )

    def timestep(self, sigma) -> torch.Tensor:
        """Index of the discrete step whose sigma is nearest (per value of ``sigma``)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).detach().cpu().contiguous()
        above = torch.searchsorted(self.sigmas, sigma).clamp(1, len(self.sigmas) - 1)
        below = above - 1
        # ties go to the lower step
        nearer_above = (self.sigmas[above] - sigma) < (sigma - self.sigmas[below])
        return torch.where(nearer_above, above, below)

    def round_sigma(self, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        return self.sigmas[self.timestep(sigma)].to(device=sigma.device, dtype=sigma.dtype)

    def model_timesteps(self, sigma) -> torch.Tensor:
        """What the network is called with: the original-chain step, rescaled to 0..1000 if asked."""
        t = self.timestep_map[self.timestep(sigma)]
        if self.rescale_timesteps:
            return t.to(torch.float32) * (1000.0 / self.original_num_steps)
        return t

    def __call__(self, x, sigma, class_labels=None):
        batch, channels = x.shape[:2]
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(batch)
        kwargs = {}
        if class_labels is not None:
            if class_labels.is_floating_point():  # one-hot rows, as EDM passes them
                class_labels = class_labels.argmax(dim=1)
            kwargs["y"] = class_labels.to(x.device).long()
        c_in = (1 / (sigma**2 + 1).sqrt()).reshape(-1, 1, 1, 1)
        model_in = (x.to(torch.float64) * c_in).to(torch.float32)
        out = self.model(model_in, self.model_timesteps(sigma).to(x.device), **kwargs)
        if out.shape[1] not in (channels, 2 * channels):
            raise ValueError(
                f"the model returned {out.shape[1]} channels for a {channels}-channel input; "
                "expected epsilon (C) or epsilon plus learned variance (2C)"
            )
        eps = out[:, :channels].to(torch.float64)
        return x.to(torch.float64) - sigma.reshape(-1, 1, 1, 1) * eps
