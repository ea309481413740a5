"""Epsilon Scaling for diffusers pipelines: divide the predicted noise by lambda_t inside any pipeline.

The scheduler's ``step`` is wrapped on the scheduler instance, so an unmodified pipeline
(DDPMPipeline, DDIMPipeline, LDMPipeline, StableDiffusionPipeline, ...) samples with ES after one
call::

    apply_eps_scaling(pipe, "1.017")      # or: with eps_scaling(pipe, "linear:k=0.0025,b=1.0"): ...
    images = pipe(...).images
    remove_eps_scaling(pipe)

The wrapper divides the noise prediction by lambda_t before the scheduler sees it, which is where
ES acts: every supported scheduler turns that noise into its x0 prediction (and DDIM's direction
and Euler's derivative) and nothing else. A model that predicts v or x0 (``prediction_type``
"v_prediction", "sample"; "flow_prediction" on flow sigmas) gets the output whose noise, read the
way its scheduler reads it at that step, is the model's noise divided by lambda_t, for the same
sample: with x_t = alpha_t x0 + sigma_t eps that is ``out / lambda + (1 / lambda - 1) * k * sample``,
k from the step's alpha_t and sigma_t (``_sample_coefficient``); a step with lambda_t = 1 leaves
the output untouched. A learned-variance output (2*C channels) keeps its last C variance channels
as they are. lambda_t comes from ``eps_scaling``; t is the scheduler's position
in its own timestep list, counted as the chain index (T'-1 at the first, noisiest step), so it
stays right when a pipeline calls ``set_timesteps`` again or starts part-way (image-to-image).
``scale_model_input`` and everything else of the scheduler is left alone.

ADM's samplers map onto diffusers' schedulers where both can express them: ADM's cosine schedule
is ``beta_schedule="squaredcos_cap_v2"``; respacing "ddimN" is ``timestep_spacing="leading"``
(steps_offset 0, set_alpha_to_one); ADM's DDIM clips x0 and re-derives the noise from it, which is
``use_clipped_model_output=True``; respacing "N" for ancestral sampling is DDPMScheduler with
ADM's step set as custom ``timesteps`` (tests/test_diffusers_es.py shows both give ADM's trajectory).

The second half samples unconditional pipelines image by image for scripts/diffusers_sample.py:
every image gets its own generator from ``image_noise`` (its steps included, where the pipeline does
not pass one) and its networks run on index-aligned chunks, so image i depends on (seed, i) alone,
bit for bit, whatever the batch size, and equals the scheduler's own loop run on that image.
``check_pairing`` refuses the pipeline/scheduler pairings that cannot be made right
(``SAMPLED_PIPELINES`` lists the others), and ``load_pipeline`` loads silently and fails in one line.

diffusers is an optional dependency (``pip install 'guided-diffusion-es[diffusers]'``); it is
imported only when a function here needs it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import json
import logging
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from guided_diffusion.eps_scaling import EpsScale, parse_eps_scale, sampling_order_t, scale_eps
from adm_common.errors import UsageError, first_line
from guided_diffusion.run.batching import DEFAULT_NETWORK_BATCH, AlignedNetwork
from guided_diffusion.image_noise import ImageNoise

__all__ = [
    "SAMPLED_PIPELINES",
    "SCALABLE_SCHEDULERS",
    "SCHEDULER_FLAGS",
    "UNetNetwork",
    "aligned_networks",
    "apply_eps_scaling",
    "check_pairing",
    "eps_scaling",
    "image_shape",
    "installed_eps_scale",
    "load_pipeline",
    "pipeline_weights_sha256",
    "quiet_loading",
    "remove_eps_scaling",
    "require_diffusers",
    "rescale_prediction",
    "sample_images",
    "scale_model_output",
    "use_scheduler",
]

# Schedulers whose ``step`` uses an epsilon prediction only through its x0 prediction (and the
# quantities derived from it), so scaling ``model_output`` is exactly Epsilon Scaling.
SCALABLE_SCHEDULERS = (
    "DDPMScheduler",
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
)


def require_diffusers():
    """Import diffusers, or fail with the command that installs it."""
    try:
        import diffusers
    except ImportError:
        raise ImportError(
            "Epsilon Scaling for diffusers pipelines needs the diffusers package; "
            "install it with: pip install 'guided-diffusion-es[diffusers]'"
        ) from None
    return diffusers


def _scheduler_of(target):
    """The scheduler of a pipeline, or ``target`` itself when it is a scheduler."""
    diffusers = require_diffusers()
    if isinstance(target, diffusers.SchedulerMixin):
        return target
    scheduler = getattr(target, "scheduler", None)
    if isinstance(scheduler, diffusers.SchedulerMixin):
        return scheduler
    raise ValueError(
        f"expected a diffusers pipeline with a scheduler, or a diffusers scheduler, got {type(target).__name__}"
    )


# The prediction types each supported scheduler's step reads (diffusers 0.42); Euler's
# "original_sample" is its older name for "sample".
_READ_PREDICTIONS = {
    "DDPMScheduler": ("epsilon", "sample", "v_prediction"),
    "DDIMScheduler": ("epsilon", "sample", "v_prediction"),
    "EulerDiscreteScheduler": ("epsilon", "sample", "original_sample", "v_prediction"),
    "EulerAncestralDiscreteScheduler": ("epsilon", "v_prediction"),
    "DPMSolverMultistepScheduler": ("epsilon", "sample", "v_prediction", "flow_prediction"),
}


def _supported_kind(scheduler) -> str:
    """The name of the supported scheduler class that ``scheduler`` is (or derives from)."""
    diffusers = require_diffusers()
    return next(name for name in SCALABLE_SCHEDULERS if isinstance(scheduler, getattr(diffusers, name)))


def _prediction_type(scheduler) -> str:
    return scheduler.config.get("prediction_type", "epsilon")


def _prediction_refusal(scheduler) -> str | None:
    """Why Epsilon Scaling cannot be defined for what this scheduler's model predicts, or None."""
    name, prediction = _supported_kind(scheduler), _prediction_type(scheduler)
    if prediction not in _READ_PREDICTIONS[name]:
        return (f"{name} does not read a model with prediction_type {prediction!r} (it reads "
                f"{_listed(repr(p) for p in _READ_PREDICTIONS[name])}), so there is no noise to scale; "
                "set the prediction_type the model was trained with, or use a scheduler that reads it")
    flow_sigmas = bool(scheduler.config.get("use_flow_sigmas", False))
    if prediction == "flow_prediction" and not flow_sigmas:
        return (f"{name} reads prediction_type 'flow_prediction' on its variance-preserving sigmas "
                "(use_flow_sigmas=False), where a flow prediction names no noise; set use_flow_sigmas=True")
    if prediction == "flow_prediction" and scheduler.config.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
        return (f"{name} with algorithm_type {scheduler.config.algorithm_type!r} cannot step a flow prediction; "
                "use algorithm_type dpmsolver++ or sde-dpmsolver++")
    if prediction == "v_prediction" and flow_sigmas:
        return (f"{name} reads a v-prediction with variance-preserving coefficients on flow sigmas "
                "(use_flow_sigmas=True), where x0 and the noise it implies disagree, so its noise is not defined")
    return None


def _check_scalable(scheduler) -> None:
    diffusers = require_diffusers()
    known = tuple(getattr(diffusers, name) for name in SCALABLE_SCHEDULERS)
    if not isinstance(scheduler, known):
        raise ValueError(
            f"Epsilon Scaling does not support {type(scheduler).__name__}; switch the pipeline to one of "
            f"{', '.join(SCALABLE_SCHEDULERS)}, e.g. pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)"
        )
    refusal = _prediction_refusal(scheduler)
    if refusal is not None:
        raise ValueError(refusal)


def _signal_and_noise(scheduler, timestep, position: int) -> tuple[float, float, float]:
    """(alpha_t, sigma_t, c) of the step: c * sample = alpha_t * x0 + sigma_t * eps, with the sample
    ``step`` receives and the coefficients its step reads the prediction with.

    DDPM and DDIM read alphas_cumprod at the timestep and step the model's own x_t (c = 1).
    DPM-Solver reads its sigma at the step, as alpha_t = 1 / sqrt(1 + sigma^2) (or 1 - sigma on
    flow sigmas), on x_t itself. Euler steps x0 + sigma * eps, the model's x_t divided by alpha_t
    (what ``scale_model_input`` undoes), so c = alpha_t.
    """
    name = _supported_kind(scheduler)
    if name in ("DDPMScheduler", "DDIMScheduler"):
        abar = float(scheduler.alphas_cumprod[int(timestep)])
        return abar ** 0.5, (1.0 - abar) ** 0.5, 1.0
    sigma = float(scheduler.sigmas[position])
    if name == "DPMSolverMultistepScheduler" and scheduler.config.use_flow_sigmas:
        return 1.0 - sigma, sigma, 1.0
    alpha = 1.0 / (1.0 + sigma ** 2) ** 0.5
    return alpha, sigma * alpha, alpha if name.startswith("Euler") else 1.0


def _sample_coefficient(scheduler, timestep, position: int, lam: float) -> float:
    """k for which ``out / lam + (1 / lam - 1) * k * sample`` is the output whose noise is divided by lam.

    With eps' = eps / lam and the sample kept, x0' = (x_t - sigma eps') / alpha, and the new output
    follows from (x0', eps') as the old from (x0, eps): x0' = x0 / lam + (1 - 1 / lam) x_t / alpha;
    v = alpha eps - sigma x0 gives v' = v / lam + (1 / lam - 1) (sigma / alpha) x_t; a flow output
    u = eps - x0 (alpha + sigma = 1) gives u' = u / lam + (1 / lam - 1) x_t / alpha. Each needs alpha > 0.
    """
    alpha, sigma, c = _signal_and_noise(scheduler, timestep, position)
    prediction = _prediction_type(scheduler)
    if alpha == 0.0:
        raise ValueError(
            f"at timestep {int(timestep)} alpha_t is 0 (a zero terminal SNR schedule): x_t is pure noise there, so a "
            f"{prediction!r} model's noise is x_t itself and cannot be divided by lambda = {lam:g}; "
            "give that step lambda 1 (e.g. a table: schedule)"
        )
    if prediction == "v_prediction":
        return sigma * c / alpha
    if prediction == "flow_prediction":
        return c / alpha
    return -c / alpha  # "sample", "original_sample"


def rescale_prediction(prediction: torch.Tensor, sample: torch.Tensor, lam: float,
                       sample_coefficient: float) -> torch.Tensor:
    """``prediction / lam + (1 / lam - 1) * sample_coefficient * sample``, computed in at least float32
    and returned in the prediction's dtype (the dtype the scheduler is handed)."""
    work = torch.promote_types(prediction.dtype, torch.float32)
    scaled = prediction.to(work) / lam + ((1.0 / lam - 1.0) * sample_coefficient) * sample.to(work)
    return scaled.to(prediction.dtype)


def scale_model_output(
    model_output: torch.Tensor, sample: torch.Tensor, schedule: EpsScale, t: int, num_steps: int,
    sample_coefficient: float = 0.0,
) -> torch.Tensor:
    """Divide the noise that ``model_output`` stands for by lambda_t; learned-variance channels are kept.

    A noise prediction (``sample_coefficient`` 0) is divided by lambda_t; any other prediction is
    rescaled by ``rescale_prediction`` with the step's ``_sample_coefficient``, and left as it is
    where lambda_t is 1.
    """
    channels = sample.shape[1]
    if model_output.shape[1] not in (channels, 2 * channels):
        raise ValueError(
            f"model output has {model_output.shape[1]} channels but the sample has {channels}; Epsilon Scaling "
            f"expects {channels} prediction channels, or {2 * channels} with learned variance"
        )
    learned_variance = model_output.shape[1] == 2 * channels
    prediction, variance = model_output.split(channels, dim=1) if learned_variance else (model_output, None)
    if sample_coefficient == 0.0:
        scaled = scale_eps(prediction, schedule, t, num_steps)
    else:
        lam = schedule.value(t, num_steps)
        scaled = prediction if lam == 1.0 else rescale_prediction(prediction, sample, lam, sample_coefficient)
    return torch.cat([scaled, variance], dim=1) if learned_variance else scaled


def _chain_position(scheduler, timestep) -> int:
    """Index of the current step in ``scheduler.timesteps`` (0 = first, noisiest), as the scheduler sees it."""
    position = getattr(scheduler, "step_index", None)
    if position is None:
        position = getattr(scheduler, "begin_index", None)
    if position is None and hasattr(scheduler, "index_for_timestep"):
        position = scheduler.index_for_timestep(timestep)
    if position is None:
        matches = (scheduler.timesteps == timestep).nonzero().flatten()
        if len(matches) != 1:
            raise ValueError(
                f"timestep {timestep!r} is not exactly one of the scheduler's timesteps; "
                "call scheduler.set_timesteps(...) and pass the timesteps it lists"
            )
        position = int(matches[0])
    return int(position)


class _ScaledStep:
    """The scheduler's ``step`` with the noise divided by lambda_t first; set on the instance.

    An object holding its scheduler and the step it wraps (not a closure), so
    ``copy.deepcopy(scheduler)`` gives a copy whose step drives the copy. Its signature is the
    wrapped step's, for pipelines that inspect it (LDMPipeline looks for ``eta``).
    """

    def __init__(self, scheduler, schedule: EpsScale):
        functools.update_wrapper(self, scheduler.step)
        self.scheduler = scheduler
        self.eps_scale = schedule

    def __call__(self, model_output, timestep, sample, *args, **kwargs):
        scheduler = self.scheduler
        num_steps = len(scheduler.timesteps)
        self.eps_scale.validate(num_steps)
        position = _chain_position(scheduler, timestep)
        t = sampling_order_t(position, num_steps)
        if _prediction_type(scheduler) == "epsilon":
            model_output = scale_model_output(model_output, sample, self.eps_scale, t, num_steps)
        elif (lam := self.eps_scale.value(t, num_steps)) != 1.0:  # lambda 1: the output as the model gave it
            self._check_no_churn(model_output, timestep, sample, *args, **kwargs)
            coefficient = _sample_coefficient(scheduler, timestep, position, lam)
            model_output = scale_model_output(model_output, sample, self.eps_scale, t, num_steps, coefficient)
        return self.__wrapped__(model_output, timestep, sample, *args, **kwargs)

    def _check_no_churn(self, *step_args, **step_kwargs) -> None:
        """Euler's s_churn adds noise to the sample inside ``step`` before it reads the prediction,
        so a v or x0 prediction cannot be rescaled against the sample its step will use."""
        churn = inspect.signature(self.__wrapped__).bind(*step_args, **step_kwargs).arguments.get("s_churn", 0.0)
        if churn:
            raise ValueError(
                f"s_churn={churn}: {type(self.scheduler).__name__} adds noise to the sample before it reads a "
                f"{_prediction_type(self.scheduler)!r} prediction, so Epsilon Scaling cannot rescale it; use s_churn=0"
            )


def installed_eps_scale(target) -> EpsScale | None:
    """The lambda schedule applied to this pipeline's (or scheduler's) steps, or None."""
    wrapper = vars(_scheduler_of(target)).get("step")
    return wrapper.eps_scale if isinstance(wrapper, _ScaledStep) else None


def apply_eps_scaling(target, eps_scale):
    """Make every ``step`` of the pipeline's scheduler divide the predicted noise by lambda_t.

    ``eps_scale`` is anything ``parse_eps_scale`` reads ('1.017', 'linear:k=...,b=...', 'table:...').
    Applying again replaces the schedule. Returns the scheduler. Replacing ``pipe.scheduler``
    afterwards drops the scaling: apply it to the new scheduler.
    """
    scheduler = _scheduler_of(target)
    _check_scalable(scheduler)
    schedule = parse_eps_scale(eps_scale)
    wrapper = vars(scheduler).get("step")
    if isinstance(wrapper, _ScaledStep):
        wrapper.eps_scale = schedule
    else:
        scheduler.step = _ScaledStep(scheduler, schedule)
    return scheduler


def remove_eps_scaling(target) -> None:
    """Undo ``apply_eps_scaling``; a scheduler without it is left as it is."""
    scheduler = _scheduler_of(target)
    wrapper = vars(scheduler).get("step")
    if isinstance(wrapper, _ScaledStep):
        del scheduler.step
        if scheduler.step != wrapper.__wrapped__:  # a step set on the instance before ours
            scheduler.step = wrapper.__wrapped__


@contextlib.contextmanager
def eps_scaling(target, eps_scale) -> Iterator:
    """Sample with Epsilon Scaling inside the block; the previous state comes back afterwards."""
    previous = installed_eps_scale(target)
    scheduler = apply_eps_scaling(target, eps_scale)
    try:
        yield scheduler
    finally:
        if previous is None:
            remove_eps_scaling(scheduler)
        else:
            apply_eps_scaling(scheduler, previous)


# ---------------------------------------------------------------------------------------------
# Sampling unconditional pipelines (DDPMPipeline, DDIMPipeline, LDMPipeline) image by image

# --scheduler names of scripts/diffusers_sample.py; "pipeline" keeps the pipeline's own.
SCHEDULER_FLAGS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
}

# The pipelines ``sample_images`` drives, each with the schedulers it drives correctly (images
# equal to the scheduler's own loop, per image, whatever the batch) and why it cannot drive the
# others. LDMPipeline calls scale_model_input and reads init_noise_sigma, so it drives them all
# once its timesteps are set before it reads init_noise_sigma and its scheduler steps draw from
# the images' generators (both done by ``sample_images``).
SAMPLED_PIPELINES = {
    "DDPMPipeline": (
        ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"),
        "neither multiplies its initial noise by init_noise_sigma nor calls scale_model_input, "
        "and {scheduler} needs both",
    ),
    "DDIMPipeline": (
        ("DDIMScheduler",),
        "passes eta to scheduler.step, which only DDIMScheduler takes, and never calls scale_model_input",
    ),
    "LDMPipeline": (SCALABLE_SCHEDULERS, ""),
}

# Schedulers that read a learned variance (the UNet's last C of 2C output channels).
_VARIANCE_SCHEDULERS = ("DDPMScheduler", "DPMSolverMultistepScheduler")


def _listed(words, last: str = "or") -> str:
    words = list(words)
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {last} {words[-1]}"


def _flags_for(scheduler_names) -> str:
    return _listed(flag for flag, name in SCHEDULER_FLAGS.items() if name in scheduler_names)


# Above every level these libraries log at: their logged errors too (a failed load becomes our one line).
_SILENT = logging.CRITICAL + 1


@contextlib.contextmanager
def quiet_loading() -> Iterator:
    """Inside the block, diffusers, transformers and huggingface_hub print nothing: their log
    messages (errors included), progress bars and Python warnings are off; afterwards they are as
    they were."""
    restore = []
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            library = importlib.import_module(name)
        except ImportError:
            continue
        verbosity, bars = library.get_verbosity(), library.is_progress_bar_enabled()
        library.set_verbosity(_SILENT)
        library.disable_progress_bar()
        restore.append(functools.partial(_restore_library, library, verbosity, bars))
    try:
        import huggingface_hub.utils as hub
    except ImportError:
        hub = None
    if hub is not None:
        verbosity, bars_off = hub.logging.get_verbosity(), hub.are_progress_bars_disabled()
        hub.logging.set_verbosity(_SILENT)
        hub.disable_progress_bars()
        restore.append(functools.partial(_restore_hub, hub, verbosity, bars_off))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for undo in reversed(restore):
            undo()


def _restore_library(library, verbosity: int, bars: bool) -> None:
    library.set_verbosity(verbosity)
    if bars:
        library.enable_progress_bar()


def _restore_hub(hub, verbosity: int, bars_off: bool) -> None:
    hub.logging.set_verbosity(verbosity)
    if not bars_off:
        hub.enable_progress_bars()


_ANY_PIPELINE = "give a folder written by pipe.save_pretrained(...) or a model id such as google/ddpm-cifar10-32"


def _hub_model_index(model: str) -> Path:
    """model_index.json of a Hugging Face model id: from the local cache, else from the Hub."""
    import huggingface_hub
    from huggingface_hub import errors

    try:
        huggingface_hub.utils.validate_repo_id(model)
    except errors.HFValidationError:
        raise UsageError(f"--model {model}: there is no such folder, and it is not a model id (owner/name); "
                         f"{_ANY_PIPELINE}") from None
    cached = huggingface_hub.try_to_load_from_cache(model, "model_index.json")
    if isinstance(cached, str):
        return Path(cached)
    not_here = f"--model {model} is not a folder here and not in the Hugging Face cache"
    fetch = (f"download it with: hf download {model} (where the Hub can be reached; it fills that cache), "
             "or give a folder written by pipe.save_pretrained(...)")
    with quiet_loading():
        try:
            huggingface_hub.model_info(model)  # fails at once offline, where a file download retries for long
            return Path(huggingface_hub.hf_hub_download(model, "model_index.json"))
        except errors.OfflineModeIsEnabled:
            raise UsageError(f"{not_here}, and HF_HUB_OFFLINE is set; {fetch}") from None
        except errors.RepositoryNotFoundError:
            raise UsageError(f"there is no model {model} on the Hugging Face Hub (or it is private or gated: "
                             f"log in with hf auth login); {_ANY_PIPELINE}") from None
        except errors.EntryNotFoundError:
            raise UsageError(f"model {model} has no model_index.json, so it is not a diffusers pipeline; "
                             f"{_ANY_PIPELINE}") from None
        except Exception as exc:  # network failures come as several types (httpx, OSError, ...)
            raise UsageError(f"{not_here}, and fetching it from the Hub failed ({first_line(exc).rstrip('.')}); {fetch}") from None


def _pipeline_index(model: str) -> dict:
    """The model_index.json of ``model`` (a folder or a model id), read before any weights are."""
    path = Path(model).expanduser()
    if path.is_file():
        raise UsageError(f"--model {model} is a file; give the pipeline's folder (the one holding model_index.json) "
                         "or a model id")
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise UsageError(f"--model {model} has no model_index.json, so it is not a diffusers pipeline folder; "
                             f"{_ANY_PIPELINE}")
    else:
        index = _hub_model_index(model)
    try:
        config = json.loads(index.read_text())
        if not isinstance(config, dict) or not isinstance(config.get("_class_name"), str):
            raise ValueError("it names no _class_name")
    except (OSError, ValueError) as exc:
        raise UsageError(f"{index} is not a diffusers model_index.json ({first_line(exc).rstrip('.')}); {_ANY_PIPELINE}") from None
    return config


def load_pipeline(model: str):
    """A DDPMPipeline, DDIMPipeline or LDMPipeline from a folder written by ``save_pretrained`` or a
    model id, on the CPU. Nothing is printed while it loads; every failure is one UsageError line.
    Other pipelines are refused from their model_index.json, before any weights are read."""
    diffusers = require_diffusers()
    index = _pipeline_index(model)
    class_name = index["_class_name"]
    if class_name not in SAMPLED_PIPELINES:
        text = any(isinstance(index.get(part), list) and index[part][0] is not None
                   for part in ("text_encoder", "tokenizer"))
        kind = f"a {class_name}, a text-to-image pipeline" if text else f"a {class_name}"
        raise UsageError(
            f"--model {model} is {kind}, which this script cannot run: it samples the unconditional "
            f"{_listed(SAMPLED_PIPELINES, 'and')}; in Python, "
            "guided_diffusion.bridges.diffusers_es.apply_eps_scaling(pipe, ...) adds Epsilon Scaling to any diffusers pipeline"
        )
    try:
        with quiet_loading():
            pipe = diffusers.DiffusionPipeline.from_pretrained(model)
    except Exception as exc:  # a broken or partly cached pipeline fails in many ways; all are the user's to fix
        raise UsageError(
            f"cannot load the {class_name} of --model {model}: {first_line(exc).rstrip('.')}; {_ANY_PIPELINE}"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def use_scheduler(pipe, name: str):
    """Replace the pipeline's scheduler by the one a --scheduler name gives, from the same config."""
    if name == "pipeline":
        return pipe.scheduler
    if name not in SCHEDULER_FLAGS:
        raise UsageError(f"unknown scheduler {name!r}; choose pipeline or one of {', '.join(SCHEDULER_FLAGS)}")
    cls = getattr(require_diffusers(), SCHEDULER_FLAGS[name])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    return pipe.scheduler


def _takes_eta(pipe) -> bool:
    return "eta" in inspect.signature(pipe.__call__).parameters


def check_pairing(pipe, num_steps: int, eta: float = 0.0) -> None:
    """Refuse, as one UsageError line, a pipeline, scheduler, step count or eta that ``sample_images``
    cannot sample correctly (images equal to the scheduler's own loop, image by image)."""
    pipeline, scheduler = type(pipe).__name__, type(pipe.scheduler).__name__
    if pipeline not in SAMPLED_PIPELINES:
        raise UsageError(f"{pipeline} is not one of the unconditional pipelines this sampler drives "
                         f"({_listed(SAMPLED_PIPELINES, 'and')})")
    if scheduler not in SCALABLE_SCHEDULERS:
        raise UsageError(f"the pipeline's scheduler {scheduler} is not one Epsilon Scaling supports; "
                         f"use --scheduler {_flags_for(SAMPLED_PIPELINES[pipeline][0])}")
    drives, why_not = SAMPLED_PIPELINES[pipeline]
    if scheduler not in drives:
        raise UsageError(f"{pipeline} cannot drive {scheduler}: it {why_not.format(scheduler=scheduler)}; "
                         f"use --scheduler {_flags_for(drives)}")
    refusal = _prediction_refusal(pipe.scheduler)
    if refusal is not None:
        raise UsageError(refusal)
    if eta != 0.0 and not _takes_eta(pipe):
        raise UsageError(f"--eta {eta}: {pipeline} takes no eta; leave --eta at 0")
    if eta != 0.0 and scheduler != "DDIMScheduler":
        raise UsageError(f"--eta {eta} only applies to DDIMScheduler, not {scheduler}; leave --eta at 0 "
                         "or use --scheduler ddim")
    channels, out = pipe.unet.config.in_channels, pipe.unet.config.out_channels
    variance = pipe.scheduler.config.get("variance_type")
    learned = variance in ("learned", "learned_range")
    prediction = _prediction_type(pipe.scheduler)
    if out == 2 * channels:
        predicted = "noise" if prediction == "epsilon" else repr(prediction)
        what = f"the UNet predicts {predicted} and variance ({out} channels for a {channels}-channel sample)"
        if scheduler not in _VARIANCE_SCHEDULERS:
            raise UsageError(
                f"{what}, which {scheduler} cannot read; use --scheduler {_flags_for(_VARIANCE_SCHEDULERS)}"
            )
        if not learned:
            raise UsageError(f"{what}, but the scheduler's variance_type is {variance!r}; "
                             "set variance_type to learned_range in its scheduler_config.json")
        if scheduler == "DPMSolverMultistepScheduler" and prediction != "epsilon":
            raise UsageError(f"{what}; DPMSolverMultistepScheduler sets a learned variance aside only beside a "
                             "noise prediction (prediction_type 'epsilon'); use --scheduler ddpm")
        if scheduler == "DPMSolverMultistepScheduler" and channels != 3:
            raise UsageError(f"{what}; DPMSolverMultistepScheduler keeps the first 3 channels of a learned-variance "
                             "output, not the noise of this sample; use --scheduler ddpm")
    elif out != channels:
        raise UsageError(f"the UNet outputs {out} channels for a {channels}-channel sample; it must predict the "
                         f"noise ({channels} channels), or noise and variance ({2 * channels})")
    elif learned and scheduler == "DDPMScheduler":
        raise UsageError(f"the scheduler's variance_type is {variance!r}, but the UNet predicts no variance "
                         f"({out} channels); set variance_type to fixed_small in its scheduler_config.json")
    train_steps = pipe.scheduler.config.num_train_timesteps
    if not 1 <= num_steps <= train_steps:
        raise UsageError(f"--steps {num_steps}: the model takes 1 to {train_steps} steps (its num_train_timesteps)")


def image_shape(pipe) -> tuple[int, int, int]:
    """(H, W, C) of the pipeline's output images: the UNet's sample, decoded when latent."""
    size = pipe.unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    decoder = getattr(pipe, "vqvae", None) or getattr(pipe, "vae", None)
    if decoder is None:
        return height, width, pipe.unet.config.in_channels
    factor = 2 ** (len(decoder.config.block_out_channels) - 1)
    return height * factor, width * factor, decoder.config.out_channels


def pipeline_weights_sha256(pipe) -> str:
    """One digest of every network's parameters and buffers: the same weights give the same digest."""
    digest = hashlib.sha256()
    for name, component in sorted(pipe.components.items()):
        if isinstance(component, torch.nn.Module):
            for key, tensor in sorted(component.state_dict().items()):
                digest.update(f"{name}.{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _global_rng_states(device: torch.device) -> list[torch.Tensor]:
    states = [torch.random.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


class UNetNetwork(torch.nn.Module):
    """A diffusers UNet as ``net(x, t, **kwargs) -> tensor``: the network interface that
    ``speed.optimize_for_sampling`` (and so ``sampling.sampling_network``) wraps.

    It calls the UNet's ``forward`` as it is when wrapped, so that ``aligned_networks`` can put
    its chunking in place of the UNet's own forward while sampling.
    """

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self._unet_forward = unet.forward
        self.training = unet.training  # the UNet's mode, as loaded pipelines have it (eval)

    def forward(self, x, t, **kwargs):
        return self._unet_forward(x, t, return_dict=False, **kwargs)[0]


class _ModelOutput(tuple):
    """What a diffusers model call returns, as pipelines read it: ``out.sample`` or ``out[0]``."""

    @property
    def sample(self):
        return self[0]


def _aligned_call(network, indices: Sequence[int], chunk: int):
    """A replacement for a diffusers model method called as ``method(x, [t], return_dict=...)``
    that runs ``network(x, t, **kwargs) -> tensor`` on AlignedNetwork's chunks."""
    aligned = AlignedNetwork(network, indices, chunk)

    def call(x, t=None, return_dict=True, **kwargs):
        sample = aligned(x, t, **kwargs)
        return _ModelOutput((sample,)) if return_dict else (sample,)

    return call


@contextlib.contextmanager
def aligned_networks(pipe, indices: Sequence[int], chunk: int = DEFAULT_NETWORK_BATCH, unet_network=None) -> Iterator:
    """While sampling images ``indices``, run the pipeline's UNet and its autoencoder's decoder
    on index-aligned chunks of ``chunk`` images (``run.batching.AlignedNetwork``), so that no pixel
    depends on the batch size: kernels round differently for other batch shapes.

    ``unet_network`` (``x, t, **kwargs -> tensor``, such as ``sampling_network(UNetNetwork(unet))``
    with speed switches) replaces the plain UNet call.
    """
    networks = []
    unet = getattr(pipe, "unet", None)
    if isinstance(unet, torch.nn.Module):
        networks.append((unet, "forward", unet_network or UNetNetwork(unet)))
    for name in ("vqvae", "vae"):
        decoder = getattr(pipe, name, None)
        if isinstance(decoder, torch.nn.Module) and callable(getattr(decoder, "decode", None)):
            decode = decoder.decode
            networks.append((decoder, "decode", lambda z, _t, decode=decode: decode(z, return_dict=False)[0]))
    patched = []
    try:
        for module, method, network in networks:
            patched.append((module, method, vars(module).get(method)))
            setattr(module, method, _aligned_call(network, indices, chunk))
        yield
    finally:
        for module, method, previous in reversed(patched):
            if previous is None:
                delattr(module, method)
            else:
                setattr(module, method, previous)


class _StepWithGenerators:
    """A scheduler's ``step`` that draws from the images' generators when its pipeline passes
    none (LDMPipeline calls ``step`` without its generator, so a stochastic step would draw from
    torch's global one and an image would depend on its batch). Set on the instance while sampling;
    its signature is the wrapped step's, for pipelines that inspect it."""

    def __init__(self, step, generators):
        functools.update_wrapper(self, step, updated=())
        self.generators = generators

    def __call__(self, *args, **kwargs):
        if kwargs.get("generator") is None:
            kwargs["generator"] = self.generators
        return self.__wrapped__(*args, **kwargs)


@contextlib.contextmanager
def _steps_draw_from(scheduler, generators) -> Iterator:
    previous = vars(scheduler).get("step")
    scheduler.step = _StepWithGenerators(scheduler.step, generators)
    try:
        yield
    finally:
        if previous is None:
            del scheduler.step
        else:
            scheduler.step = previous


def sample_images(pipe, seed: int, indices: Sequence[int], num_steps: int,
                  network_batch: int = DEFAULT_NETWORK_BATCH, unet_network=None, eta: float = 0.0) -> torch.Tensor:
    """Images ``indices`` of a run as an NCHW tensor in [-1, 1]; image i depends on (seed, i) alone.

    Each image is what the pipeline's scheduler gives when its own loop samples that image alone:
    x_T = N(0, I) * init_noise_sigma from the image's noise stream (``image_noise``), then per step
    ``scale_model_input``, the UNet and ``step`` with that stream as generator. The pipeline gets
    one generator per image, and diffusers draws row j of the initial noise and of every step's
    noise from generator j; where the pipeline calls ``step`` without its generator (LDMPipeline),
    the step gets them here. The timesteps are set before the pipeline runs, because LDMPipeline
    reads init_noise_sigma before it sets them, and a scheduler that has not set them (Euler)
    reports another value. The networks run on chunks of ``network_batch`` images aligned to the
    image index (``aligned_networks``; ``unet_network`` as there), so no pixel depends on the batch
    size or the rank count. Pairings that cannot be made right are refused (``check_pairing``).
    """
    check_pairing(pipe, num_steps, eta)
    scheduler = pipe.scheduler
    generators = ImageNoise(seed, indices).generators
    call_kwargs = {"eta": eta} if _takes_eta(pipe) else {}
    scheduler.set_timesteps(num_steps)
    before = _global_rng_states(pipe.device)
    with torch.no_grad(), aligned_networks(pipe, indices, network_batch, unet_network), \
            _steps_draw_from(scheduler, generators):
        images = pipe(
            batch_size=len(indices), generator=generators, num_inference_steps=num_steps, output_type="np",
            **call_kwargs,
        ).images
    after = _global_rng_states(pipe.device)
    if any(not torch.equal(a, b) for a, b in zip(before, after)):
        diffusers = require_diffusers()
        raise RuntimeError(
            f"{type(pipe).__name__} with {type(scheduler).__name__} drew noise from torch's global generator, so its "
            f"images would depend on the batch; diffusers {diffusers.__version__} samples otherwise than the "
            "version this bridge was checked against (0.42): please report it"
        )
    images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return images * 2 - 1
