"""Gaussian diffusion as in ADM (openai/guided-diffusion): schedules, training losses, likelihood,
ancestral and DDIM samplers, classifier guidance; plus Epsilon Scaling at sampling time.

The schedule is kept in float64 numpy and each coefficient is cast to float32 only when it is
gathered for a batch (``_gather``, ADM's ``_extract_into_tensor`` with each array uploaded once
per device and diffusion), so results match ADM's.

The four sampling loops are one private loop (``_sample_loop``), which resolves the lambda
schedule and the time shift once per call and hands the resolved objects to every step.

Epsilon Scaling: every sampling entry point takes ``eps_scale`` (None = the diffusion's default).
``p_mean_variance`` divides the predicted noise by lambda_t once per network evaluation, before
the x0 prediction; everything downstream (posterior mean, DDIM direction, guidance) is derived
from that x0 and so carries the scaling without dividing again. Training losses and likelihoods
never scale.

Time-Shift sampling (time_shift.py): the loops take ``time_shift``; a shifted DDIM step uses the
chosen alpha_bar in place of alpha_bar_{t-1}, a shifted ancestral step the posterior
q(x_s | x_t, x_0) to it (``_shifted_posterior``); lambda stays indexed by the sampling step.
"""

import collections
import enum
import math

import numpy as np
import torch as th
from tqdm.auto import tqdm

from guided_diffusion.eps_scaling import EpsScale, adm_es_eps_scale, parse_eps_scale, resolve_eps_scale, scale_eps
from guided_diffusion.losses import discretized_gaussian_log_likelihood, normal_kl
from guided_diffusion.nn import mean_flat
from guided_diffusion.image_noise import standard_normal
from guided_diffusion.time_shift import StepShifter, parse_time_shift

BETA_SCHEDULES = ("linear", "cosine")

# Training and likelihood evaluate the model as trained: no Epsilon Scaling, whatever the default.
_UNSCALED = EpsScale()


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """Betas of a named schedule ("linear" or "cosine") with ``num_diffusion_timesteps`` steps.

    "linear" is DDPM's 1e-4 .. 0.02 for 1000 steps, rescaled so any step count covers the same
    noise range; "cosine" is Nichol & Dhariwal's alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi / 2).
    """
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(f"unknown beta schedule {schedule_name!r}; use one of {', '.join(BETA_SCHEDULES)}")


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Discretize a continuous alpha_bar(s), s in [0, 1], into betas; clip each beta to max_beta
    so the last steps of schedules that reach alpha_bar = 0 stay finite."""
    n = num_diffusion_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.array(betas, dtype=np.float64)


class ModelMeanType(enum.Enum):
    """What the network predicts."""

    PREVIOUS_X = enum.auto()  # the posterior mean of x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise


class ModelVarType(enum.Enum):
    """Where the reverse-process variance comes from.

    LEARNED_RANGE: the network outputs v in [-1, 1] and log-variance interpolates between the
    posterior variance (v = -1) and beta_t (v = 1), as in Improved DDPM.
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE of the mean prediction (plus the VLB when the variance is learned)
    RESCALED_MSE = enum.auto()  # as MSE, with the VLB term scaled like RESCALED_KL
    KL = enum.auto()  # the variational bound
    RESCALED_KL = enum.auto()  # the variational bound times num_timesteps (the true VLB)

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


class GaussianDiffusion:
    """A diffusion process with fixed betas: training losses, likelihood and samplers.

    :param betas: 1-D array of betas, one per timestep, each in (0, 1].
    :param model_mean_type: a ModelMeanType.
    :param model_var_type: a ModelVarType.
    :param loss_type: a LossType.
    :param rescale_timesteps: pass the network t scaled to 0..1000 (as if there were 1000 steps).
    :param eps_scale: default Epsilon Scaling schedule of the samplers (anything parse_eps_scale
        takes); None means lambda = 1.
    :param eps_scaler: ADM-ES's key, for code written against ADM-ES: a number that is at once
        the samplers' constant lambda and the input perturbation gamma of ``training_losses``
        (x_t made from noise + gamma * extra noise), as in ADM-ES; 0.0, ADM-ES's default, is off.
        ADM-ES also divides the VLB term's noise by it during training (infinite at its default);
        that is not reproduced: training and likelihoods never scale.
    """

    def __init__(
        self,
        *,
        betas,
        model_mean_type,
        model_var_type,
        loss_type,
        rescale_timesteps=False,
        eps_scale=None,
        eps_scaler=0.0,
    ):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"betas must be a 1-D array of at least 2 steps, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas < 1).all()):
            # ADM admits beta = 1, but it makes alpha_bar 0 and every x0 prediction infinite
            raise ValueError("every beta must be in (0, 1); check the noise schedule and --diffusion_steps")
        self.betas = betas
        self.num_timesteps = len(betas)
        adm_es = adm_es_eps_scale(eps_scaler)
        if adm_es is not None and eps_scale is not None and parse_eps_scale(eps_scale) != adm_es:
            raise ValueError(f"eps_scale {eps_scale} and ADM-ES's eps_scaler {eps_scaler} disagree; give one")
        self.eps_scale = adm_es if adm_es is not None else parse_eps_scale(eps_scale)
        self.eps_scale.validate(self.num_timesteps)
        self.eps_scaler = 0.0 if adm_es is None else adm_es.b

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; its log takes the value of t = 1 there.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        # Arrays the per-step code reads, made once so each is uploaded to a device once.
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.log_betas = np.log(betas)
        # fixed-large variance: beta_t, except at t = 0 where the posterior variance gives a better decoder
        self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        # x_0 from x_{t-1} as ADM inverts the posterior mean: 1/coef1 * x_{t-1} - coef2/coef1 * x_t
        self.recip_posterior_mean_coef1 = 1.0 / self.posterior_mean_coef1
        self.posterior_mean_coef2_over_coef1 = self.posterior_mean_coef2 / self.posterior_mean_coef1
        self._device_schedule = {}  # (attribute name, device) -> (its array, that array as a tensor there)

    def _gather(self, name, t, broadcast_shape):
        """``_extract_into_tensor`` of the schedule array ``self.<name>``, uploaded once per device
        (a copy per call would stall a GPU loop) and again only if the attribute is replaced."""
        return _broadcast(self._on_device(name, t.device)[t].float(), broadcast_shape)

    def _gather_float64(self, name, t):
        """``self.<name>[t]`` as a float64 (N,) tensor on t's device (uploaded as ``_gather``'s)."""
        return self._on_device(name, t.device)[t]

    def _on_device(self, name, device):
        arr = getattr(self, name)
        key = (name, str(device))
        cached = self._device_schedule.get(key)
        if cached is None or cached[0] is not arr:
            cached = (arr, th.from_numpy(arr).to(device=device))
            self._device_schedule[key] = cached
        return cached[1]

    # ------------------------------------------------------------------ forward process

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = self._gather("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = self._gather("one_minus_alphas_cumprod", t, x_start.shape)
        log_variance = self._gather("log_one_minus_alphas_cumprod", t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0) (``noise`` is the N(0, I) draw; fresh from torch's RNG if None)."""
        if noise is None:
            noise = th.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x_start {tuple(x_start.shape)}")
        return (
            self._gather("sqrt_alphas_cumprod", t, x_start.shape) * x_start
            + self._gather("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {tuple(x_start.shape)} differs from x_t {tuple(x_t.shape)}")
        mean = (
            self._gather("posterior_mean_coef1", t, x_t.shape) * x_start
            + self._gather("posterior_mean_coef2", t, x_t.shape) * x_t
        )
        variance = self._gather("posterior_variance", t, x_t.shape)
        log_variance = self._gather("posterior_log_variance_clipped", t, x_t.shape)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ reverse process

    def _sampling_schedule(self, eps_scale):
        """The lambda schedule of a sampling call, checked against this chain before any work.

        The sampling loops call this once and pass the resulting EpsScale down; an EpsScale or
        None reaching p_mean_variance is used as it is (None: the default, checked at __init__).
        """
        if eps_scale is None:
            return self.eps_scale
        schedule = resolve_eps_scale(eps_scale, self.eps_scale)
        schedule.validate(self.num_timesteps)
        return schedule

    def p_mean_variance(
        self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eps_scale=None
    ):
        """One network evaluation: p(x_{t-1} | x_t) and the x_0 it implies.

        :param model: called as model(x, timesteps, **model_kwargs).
        :param t: (N,) int tensor of chain indices.
        :param clip_denoised: clip the x_0 prediction to [-1, 1].
        :param denoised_fn: applied to the x_0 prediction before clipping.
        :param eps_scale: lambda schedule; the predicted noise is divided by lambda_t here (for
            START_X and PREVIOUS_X models, the noise their x_0 implies).
        :return: dict with 'mean', 'variance', 'log_variance', 'pred_xstart'.
        """
        schedule = eps_scale if isinstance(eps_scale, EpsScale) else self._sampling_schedule(eps_scale)
        if model_kwargs is None:
            model_kwargs = {}
        B, C = x.shape[:2]
        if t.shape != (B,):
            raise ValueError(f"t must hold one timestep per sample, shape ({B},), got {tuple(t.shape)}")
        model_output = model(x, self._scale_timesteps(t), **model_kwargs)

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape[1] != 2 * C:
                raise ValueError(
                    f"a model with learned variance must output {2 * C} channels, got "
                    f"{model_output.shape[1]}; check learn_sigma"
                )
            model_output, var_values = th.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = var_values
            else:
                min_log = self._gather("posterior_log_variance_clipped", t, x.shape)
                max_log = self._gather("log_betas", t, x.shape)
                frac = (var_values + 1) / 2
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = th.exp(model_log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                variance, log_variance = "fixed_large_variance", "fixed_large_log_variance"
            else:
                variance, log_variance = "posterior_variance", "posterior_log_variance_clipped"
            model_variance = self._gather(variance, t, x.shape)
            model_log_variance = self._gather(log_variance, t, x.shape)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.EPSILON:
            eps = scale_eps(model_output, schedule, t, self.num_timesteps)
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=eps))
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        elif self.model_mean_type == ModelMeanType.START_X:
            raw_xstart = self._scale_implied_eps(x, t, model_output, schedule)
            pred_xstart = process_xstart(raw_xstart)
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        elif self.model_mean_type == ModelMeanType.PREVIOUS_X:
            raw_xstart = self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output)
            if schedule.is_identity:
                model_mean = model_output
            else:
                # The scaled mean follows the scaled x_0, unclipped like the model's own mean.
                raw_xstart = self._scale_implied_eps(x, t, raw_xstart, schedule)
                model_mean, _, _ = self.q_posterior_mean_variance(x_start=raw_xstart, x_t=x, t=t)
            pred_xstart = process_xstart(raw_xstart)
        else:
            raise ValueError(f"unknown model_mean_type {self.model_mean_type!r}")

        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    def _scale_implied_eps(self, x_t, t, xstart, schedule):
        """Epsilon Scaling for models that predict x_0: divide the noise that x_0 implies."""
        if schedule.is_identity:
            return xstart
        eps = self._predict_eps_from_xstart(x_t, t, xstart)
        eps = scale_eps(eps, schedule, t, self.num_timesteps)
        return self._predict_xstart_from_eps(x_t, t, eps)

    def _predict_xstart_from_eps(self, x_t, t, eps):
        if x_t.shape != eps.shape:
            raise ValueError(f"eps shape {tuple(eps.shape)} differs from x_t {tuple(x_t.shape)}")
        return (
            self._gather("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
            - self._gather("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        if x_t.shape != xprev.shape:
            raise ValueError(f"xprev shape {tuple(xprev.shape)} differs from x_t {tuple(x_t.shape)}")
        return (
            self._gather("recip_posterior_mean_coef1", t, x_t.shape) * xprev
            - self._gather("posterior_mean_coef2_over_coef1", t, x_t.shape) * x_t
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            self._gather("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart
        ) / self._gather("sqrt_recipm1_alphas_cumprod", t, x_t.shape)

    def _scale_timesteps(self, t):
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Shift the mean by variance * grad log p(y | x_t) (Sohl-Dickstein et al. 2015).

        ``p_mean_var`` already carries any Epsilon Scaling. cond_fn(x, t, **model_kwargs) returns
        the gradient.
        """
        if model_kwargs is None:
            model_kwargs = {}
        gradient = cond_fn(x, self._scale_timesteps(t), **model_kwargs)
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Shift the score by the classifier gradient (Song et al. 2020), for DDIM.

        The noise is re-derived from ``p_mean_var['pred_xstart']``, which already carries any
        Epsilon Scaling, so lambda is not applied a second time here.
        """
        if model_kwargs is None:
            model_kwargs = {}
        alpha_bar = self._gather("alphas_cumprod", t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, self._scale_timesteps(t), **model_kwargs)
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    def p_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        eps_scale=None,
        generator=None,
    ):
        """One ancestral step x_t -> x_{t-1}; returns dict 'sample', 'pred_xstart'.

        ``generator``: None (torch's global RNG), a torch.Generator or a image_noise.ImageNoise.
        """
        return self._ancestral_step(model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs,
                                    eps_scale, generator)

    def _ancestral_step(self, model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs, eps_scale,
                        generator, target_alpha_bar=None):
        """p_sample; where ``target_alpha_bar`` (N,) is given (a time shift), an image moves to that
        noise level by the posterior q(x_s | x_t, x_0) instead (``_shifted_posterior``)."""
        out = self.p_mean_variance(
            model,
            x,
            t,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
            eps_scale=eps_scale,
        )
        # Drawn at every step, the last included, so the random stream matches ADM's.
        noise = standard_normal(x.shape, generator, x.device, x.dtype)
        nonzero_mask = _nonzero_mask(t, x)
        if target_alpha_bar is None:
            if cond_fn is not None:
                out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
            sample = out["mean"] + nonzero_mask * th.exp(0.5 * out["log_variance"]) * noise
            return {"sample": sample, "pred_xstart": out["pred_xstart"]}
        shifted_mean, shifted_variance = self._shifted_posterior(out["pred_xstart"], x, t, target_alpha_bar)
        if cond_fn is not None:
            # the classifier gradient once: condition_mean of mean -0.0 and variance 1 is that
            # gradient exactly (-0.0 + g keeps g's zeros' signs)
            gradient = self.condition_mean(cond_fn, {"mean": th.full_like(x, -0.0), "variance": 1.0}, x, t,
                                           model_kwargs=model_kwargs)
            out["mean"] = out["mean"].float() + out["variance"] * gradient
            shifted_mean = shifted_mean + shifted_variance * gradient
        sample = out["mean"] + nonzero_mask * th.exp(0.5 * out["log_variance"]) * noise
        shifted_sample = shifted_mean + th.sqrt(shifted_variance) * noise
        moved = (target_alpha_bar != self._gather_float64("alphas_cumprod_prev", t)).view(-1, *([1] * (x.dim() - 1)))
        return {"sample": th.where(moved, shifted_sample, sample), "pred_xstart": out["pred_xstart"]}

    def _shifted_posterior(self, x_start, x_t, t, target_alpha_bar):
        """Mean and variance of q(x_s | x_t, x_0) for per-image alpha_bar_s = ``target_alpha_bar``.

        With alpha_ts = abar_t / abar_s and beta_ts = 1 - alpha_ts this is ADM's posterior of the
        pair (t, s); the variance is beta_ts for FIXED_LARGE, else the posterior variance
        beta_ts (1 - abar_s) / (1 - abar_t): a learned variance was learned for the scheduled pair,
        not for (t, s), so it is not used on a shifted step.
        """
        abar_t = self._gather_float64("alphas_cumprod", t)
        abar_s = target_alpha_bar.to(th.float64)
        alpha_ts = abar_t / abar_s
        beta_ts = 1.0 - alpha_ts
        coef_start = th.sqrt(abar_s) * beta_ts / (1.0 - abar_t)
        coef_t = th.sqrt(alpha_ts) * (1.0 - abar_s) / (1.0 - abar_t)
        if self.model_var_type == ModelVarType.FIXED_LARGE:
            variance = beta_ts
        else:
            variance = beta_ts * (1.0 - abar_s) / (1.0 - abar_t)
        shape = x_t.shape
        mean = _broadcast(coef_start.float(), shape) * x_start + _broadcast(coef_t.float(), shape) * x_t
        return mean, _broadcast(variance.float(), shape)

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eps_scale=None,
        generator=None,
        time_shift=None,
        time_shift_record=None,
    ):
        """Ancestral sampling from x_T (``noise``, or drawn from ``generator``) to x_0.

        ``time_shift``: a time_shift.TimeShift (or its string form; None: off), see time_shift.py.
        ``time_shift_record``: a list to which each step appends the (N,) int64 timesteps the time
        shift chose for each image (``StepShifter.step``); only while a time shift is on.
        """
        return _last(self._sample_loop(
            "ancestral", model, shape, noise, device, progress, eps_scale, generator, time_shift,
            time_shift_record, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs,
        ))["sample"]

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eps_scale=None,
        generator=None,
        time_shift=None,
        time_shift_record=None,
    ):
        """Yield p_sample's output at each step, from t = T' - 1 down to 0 (with a time shift,
        also 'time_shift_t', what p_sample_loop records)."""
        return self._sample_loop(
            "ancestral", model, shape, noise, device, progress, eps_scale, generator, time_shift,
            time_shift_record, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs,
        )

    def ddim_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        eta=0.0,
        eps_scale=None,
        generator=None,
    ):
        """One DDIM step x_t -> x_{t-1}; returns dict 'sample', 'pred_xstart'.

        The direction term uses the noise re-derived from the (clipped, scaled) x_0 prediction.
        """
        return self._ddim_step(model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs, eps_scale,
                               generator, eta=eta)

    def _ddim_step(self, model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs, eps_scale, generator,
                   eta, target_alpha_bar=None):
        """ddim_sample; ``target_alpha_bar`` (N,), where given (a time shift), replaces each image's
        alpha_bar_{t-1} in the DDIM update."""
        out = self.p_mean_variance(
            model,
            x,
            t,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
            eps_scale=eps_scale,
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._gather("alphas_cumprod", t, x.shape)
        if target_alpha_bar is None:
            alpha_bar_prev = self._gather("alphas_cumprod_prev", t, x.shape)
        else:
            alpha_bar_prev = _broadcast(target_alpha_bar.float(), x.shape)
        sigma = (
            eta * th.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * th.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        noise = standard_normal(x.shape, generator, x.device, x.dtype)
        mean_pred = (
            out["pred_xstart"] * th.sqrt(alpha_bar_prev) + th.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        )
        sample = mean_pred + _nonzero_mask(t, x) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        eta=0.0,
        eps_scale=None,
    ):
        """One deterministic DDIM step backwards, x_t -> x_{t+1} (encoding an image into noise)."""
        if eta != 0.0:
            raise ValueError("ddim_reverse_sample is deterministic; use eta=0.0")
        out = self.p_mean_variance(
            model,
            x,
            t,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
            eps_scale=eps_scale,
        )
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._gather("alphas_cumprod_next", t, x.shape)
        mean_pred = out["pred_xstart"] * th.sqrt(alpha_bar_next) + th.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        eps_scale=None,
        generator=None,
        time_shift=None,
        time_shift_record=None,
    ):
        """DDIM sampling from x_T (``noise``, or drawn from ``generator``) to x_0.

        ``time_shift`` and ``time_shift_record``: as for p_sample_loop.
        """
        return _last(self._sample_loop(
            "ddim", model, shape, noise, device, progress, eps_scale, generator, time_shift, time_shift_record,
            clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs,
            eta=eta,
        ))["sample"]

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        eps_scale=None,
        generator=None,
        time_shift=None,
        time_shift_record=None,
    ):
        """Yield ddim_sample's output at each step, from t = T' - 1 down to 0 (with a time shift,
        also 'time_shift_t', what ddim_sample_loop records)."""
        return self._sample_loop(
            "ddim", model, shape, noise, device, progress, eps_scale, generator, time_shift, time_shift_record,
            clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs,
            eta=eta,
        )

    def _sample_loop(self, kind, model, shape, noise, device, progress, eps_scale, generator, time_shift,
                     time_shift_record, **step_options):
        """The loop behind the four public ones ("ancestral" or "ddim"): yields each step's output.

        The lambda schedule and the time shift are resolved and checked here, once per call; the
        steps receive the resolved objects. Without a time shift each step is the public
        ``p_sample`` / ``ddim_sample``, as in ADM, so a subclass that overrides them is still used.
        """
        schedule = self._sampling_schedule(eps_scale)
        shifter = self.time_shifter(time_shift, ddim=kind == "ddim")
        if shifter is None:
            step = self.ddim_sample if kind == "ddim" else self.p_sample
            # only what ADM's signature lacks and differs from its default, so that a fork's
            # override with ADM's exact signature still runs
            public_options = {} if schedule is self.eps_scale else {"eps_scale": schedule}
            if generator is not None:
                public_options["generator"] = generator
        else:
            step = self._ddim_step if kind == "ddim" else self._ancestral_step
        img, device = self._initial_noise(model, shape, noise, device, generator)
        for i in self._chain_indices(progress):
            t = th.full((shape[0],), i, device=device, dtype=th.long)
            with th.no_grad():
                if shifter is None:
                    out = step(model, img, t, **public_options, **step_options)
                else:
                    chosen, target = shifter.step(img, i)
                    out = step(model, img, t, eps_scale=schedule, generator=generator, target_alpha_bar=target,
                               **step_options)
            if shifter is not None:
                out["time_shift_t"] = chosen
                if time_shift_record is not None:
                    time_shift_record.append(chosen)
            yield out
            img = out["sample"]

    def time_shifter(self, time_shift, ddim):
        """A time_shift.StepShifter for this chain, checked against it; None when the time shift is off."""
        shift = parse_time_shift(time_shift)
        if shift is None:
            return None
        timestep_map, original_alphas_cumprod = self._original_chain()
        shift.validate(len(original_alphas_cumprod), self.num_timesteps, ddim)
        return StepShifter(shift, timestep_map, original_alphas_cumprod, self.alphas_cumprod_prev)

    def _original_chain(self):
        """(original timestep of each chain index, the original chain's alpha_bar): this chain itself."""
        return range(self.num_timesteps), self.alphas_cumprod

    def _initial_noise(self, model, shape, noise, device, generator):
        """x_T for a sampling loop and the device it runs on."""
        if not isinstance(shape, (tuple, list)):
            raise ValueError(f"shape must be a tuple or list such as (N, C, H, W), got {shape!r}")
        if device is None:
            device = _model_device(model, noise)
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} differs from shape {tuple(shape)}")
            return noise, device
        return standard_normal(tuple(shape), generator, device, th.float32), device

    def _chain_indices(self, progress):
        indices = list(range(self.num_timesteps))[::-1]
        return tqdm(indices) if progress else indices

    # ------------------------------------------------------------------ training and likelihood

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One term of the variational bound in bits per dimension.

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, the decoder NLL of x_0 at t = 0.
        Returns dict 'output' (per sample) and 'pred_xstart'.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(
            model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs, eps_scale=_UNSCALED
        )
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        return {"output": th.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None, input_noise=None):
        """Per-sample training losses at timesteps t.

        :param input_noise: if given, x_t is made with it instead of ``noise`` while the epsilon
            target stays ``noise`` (DDPM-IP's input perturbation: noise + gamma * extra noise).
            Otherwise, with ADM-ES's ``eps_scaler`` set, it is drawn here as ADM-ES draws it.
        :return: dict with 'loss' and, depending on the loss type, 'mse' and 'vb'.
        """
        if model_kwargs is None:
            model_kwargs = {}
        if noise is None:
            noise = th.randn_like(x_start)
        if input_noise is None and self.eps_scaler:
            input_noise = noise + self.eps_scaler * th.randn_like(noise)
        x_t = self.q_sample(x_start, t, noise=noise if input_noise is None else input_noise)

        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model=model,
                x_start=x_start,
                x_t=x_t,
                t=t,
                clip_denoised=False,
                model_kwargs=model_kwargs,
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] *= self.num_timesteps
        elif self.loss_type in (LossType.MSE, LossType.RESCALED_MSE):
            model_output = model(x_t, self._scale_timesteps(t), **model_kwargs)
            if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
                C = x_t.shape[1]
                if model_output.shape[1] != 2 * C:
                    raise ValueError(
                        f"a model with learned variance must output {2 * C} channels, got "
                        f"{model_output.shape[1]}; check learn_sigma"
                    )
                model_output, var_values = th.split(model_output, C, dim=1)
                # The VLB trains only the variance: the mean is frozen so the MSE alone drives it.
                frozen = th.cat([model_output.detach(), var_values], dim=1)
                terms["vb"] = self._vb_terms_bpd(
                    model=lambda *args, r=frozen: r,
                    x_start=x_start,
                    x_t=x_t,
                    t=t,
                    clip_denoised=False,
                )["output"]
                if self.loss_type == LossType.RESCALED_MSE:
                    # Keep the VLB's weight as if there were 1000 steps, as the MSE term is per step.
                    terms["vb"] *= self.num_timesteps / 1000.0
            if self.model_mean_type == ModelMeanType.PREVIOUS_X:
                target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
            elif self.model_mean_type == ModelMeanType.START_X:
                target = x_start
            else:
                target = noise
            if model_output.shape != target.shape:
                raise ValueError(
                    f"model output shape {tuple(model_output.shape)} differs from the target "
                    f"{tuple(target.shape)}"
                )
            terms["mse"] = mean_flat((target - model_output) ** 2)
            terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        else:
            raise ValueError(f"unknown loss_type {self.loss_type!r}")
        return terms

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension; it does not depend on the model."""
        t = th.tensor([self.num_timesteps - 1] * x_start.shape[0], device=x_start.device)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / np.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None, generator=None):
        """The whole variational bound in bits per dimension, and per-step terms.

        :return: dict with 'total_bpd', 'prior_bpd' (N,) and 'vb', 'xstart_mse', 'mse' (N, T).
        """
        device = x_start.device
        batch_size = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for t in list(range(self.num_timesteps))[::-1]:
            t_batch = th.tensor([t] * batch_size, device=device)
            noise = standard_normal(x_start.shape, generator, device, x_start.dtype)
            x_t = self.q_sample(x_start=x_start, t=t_batch, noise=noise)
            with th.no_grad():
                out = self._vb_terms_bpd(
                    model,
                    x_start=x_start,
                    x_t=x_t,
                    t=t_batch,
                    clip_denoised=clip_denoised,
                    model_kwargs=model_kwargs,
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))

        vb = th.stack(vb, dim=1)
        xstart_mse = th.stack(xstart_mse, dim=1)
        mse = th.stack(mse, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        total_bpd = vb.sum(dim=1) + prior_bpd
        return {
            "total_bpd": total_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": xstart_mse,
            "mse": mse,
        }


def _last(steps):
    """The final output of a sampling loop, without keeping the others."""
    return collections.deque(steps, maxlen=1).pop()


def _nonzero_mask(t, x):
    """1 for samples with t > 0, 0 at the last step (no noise added), broadcastable to x."""
    return (t != 0).float().view(-1, *([1] * (x.dim() - 1)))


def _model_device(model, noise):
    """Where a sampling loop runs: the model's parameters, else the given noise, else the CPU."""
    parameters = getattr(model, "parameters", None)
    if parameters is not None:
        first = next(iter(parameters()), None)
        if first is not None:
            return first.device
    return noise.device if noise is not None else th.device("cpu")


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    """Gather arr[timesteps] from a numpy array as float32, shaped to broadcast against a batch."""
    return _broadcast(th.from_numpy(arr).to(device=timesteps.device)[timesteps].float(), broadcast_shape)


def _broadcast(values, broadcast_shape):
    """(N,) per-sample values shaped to broadcast against a batch of ``broadcast_shape``."""
    while values.dim() < len(broadcast_shape):
        values = values[..., None]
    return values.expand(broadcast_shape)
