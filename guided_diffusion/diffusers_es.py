"""Epsilon Scaling for diffusers pipelines: divide the predicted noise by lambda_t inside any pipeline.

The scheduler's ``step`` is wrapped on the scheduler instance, so an unmodified pipeline
(DDPMPipeline, DDIMPipeline, LDMPipeline, StableDiffusionPipeline, ...) samples with ES after one
call::

    apply_eps_scaling(pipe, "1.017")      # or: with eps_scaling(pipe, "linear:k=0.0025,b=1.0"): ...
    images = pipe(...).images
    remove_eps_scaling(pipe)

The wrapper divides the noise prediction by lambda_t before the scheduler sees it, which is where
ES acts: every supported scheduler turns that noise into its x0 prediction (and DDIM's direction
and Euler's derivative) and nothing else. A learned-variance output (2*C channels) keeps its last
C variance channels as they are. lambda_t comes from ``eps_scaling``; t is the scheduler's position
in its own timestep list, counted as the chain index (T'-1 at the first, noisiest step), so it
stays right when a pipeline calls ``set_timesteps`` again or starts part-way (image-to-image).
``scale_model_input`` and everything else of the scheduler is left alone.

ADM's samplers map onto diffusers' schedulers where both can express them: ADM's cosine schedule
is ``beta_schedule="squaredcos_cap_v2"``; respacing "ddimN" is ``timestep_spacing="leading"``
(steps_offset 0, set_alpha_to_one); ADM's DDIM clips x0 and re-derives the noise from it, which is
``use_clipped_model_output=True``; respacing "N" for ancestral sampling is DDPMScheduler with
ADM's step set as custom ``timesteps`` (tests/test_diffusers_es.py shows both give ADM's trajectory).

The second half samples unconditional pipelines image by image for scripts/diffusers_sample.py:
every image gets its own generator from ``sample_io`` and its networks run on index-aligned chunks,
so image i depends on (seed, i) alone, bit for bit, whatever the batch size.

diffusers is an optional dependency (``pip install 'guided-diffusion-es[diffusers]'``); it is
imported only when a function here needs it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .eps_scaling import EpsScale, parse_eps_scale, sampling_order_t, scale_eps
from .sample_io import DEFAULT_NETWORK_BATCH, AlignedNetwork, ImageNoise

__all__ = [
    "SCALABLE_SCHEDULERS",
    "SCHEDULER_FLAGS",
    "UNetNetwork",
    "aligned_networks",
    "apply_eps_scaling",
    "eps_scaling",
    "image_shape",
    "installed_eps_scale",
    "load_pipeline",
    "pipeline_weights_sha256",
    "remove_eps_scaling",
    "require_diffusers",
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


def _check_scalable(scheduler) -> None:
    diffusers = require_diffusers()
    known = tuple(getattr(diffusers, name) for name in SCALABLE_SCHEDULERS)
    if not isinstance(scheduler, known):
        raise ValueError(
            f"Epsilon Scaling does not support {type(scheduler).__name__}; switch the pipeline to one of "
            f"{', '.join(SCALABLE_SCHEDULERS)}, e.g. pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)"
        )
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type != "epsilon":
        raise ValueError(
            f"this scheduler's model predicts {prediction_type!r}, not noise; Epsilon Scaling divides a noise "
            "prediction and only applies to models with prediction_type='epsilon'"
        )


def scale_model_output(
    model_output: torch.Tensor, sample: torch.Tensor, schedule: EpsScale, t: int, num_steps: int
) -> torch.Tensor:
    """Divide the noise channels of ``model_output`` by lambda_t; learned-variance channels are kept."""
    channels = sample.shape[1]
    if model_output.shape[1] == channels:
        return scale_eps(model_output, schedule, t, num_steps)
    if model_output.shape[1] == 2 * channels:
        eps, variance = model_output.split(channels, dim=1)
        return torch.cat([scale_eps(eps, schedule, t, num_steps), variance], dim=1)
    raise ValueError(
        f"model output has {model_output.shape[1]} channels but the sample has {channels}; Epsilon Scaling "
        f"expects {channels} noise channels, or {2 * channels} with learned variance"
    )


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
        t = sampling_order_t(_chain_position(scheduler, timestep), num_steps)
        model_output = scale_model_output(model_output, sample, self.eps_scale, t, num_steps)
        return self.__wrapped__(model_output, timestep, sample, *args, **kwargs)


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

_CALL_ARGUMENTS = ("batch_size", "generator", "num_inference_steps", "output_type")


def load_pipeline(model: str):
    """A diffusers pipeline from a folder written by ``save_pretrained`` or a model id, on the CPU."""
    diffusers = require_diffusers()
    if Path(model).is_file():
        raise ValueError(f"--model {model} is a file; give the pipeline's folder (with model_index.json) or a model id")
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(model)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(
            f"cannot load a diffusers pipeline from {model!r} ({reason}); give a folder written by "
            "save_pretrained or a model id such as google/ddpm-cifar10-32"
        ) from None
    missing = [name for name in _CALL_ARGUMENTS if name not in inspect.signature(pipe.__call__).parameters]
    if missing:
        raise ValueError(
            f"{type(pipe).__name__} is not an unconditional image pipeline (its call lacks {', '.join(missing)}); "
            "this sampler drives DDPMPipeline, DDIMPipeline and LDMPipeline"
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def use_scheduler(pipe, name: str):
    """Replace the pipeline's scheduler by the one a --scheduler name gives, from the same config."""
    if name == "pipeline":
        return pipe.scheduler
    if name not in SCHEDULER_FLAGS:
        raise ValueError(f"unknown scheduler {name!r}; choose pipeline or one of {', '.join(SCHEDULER_FLAGS)}")
    cls = getattr(require_diffusers(), SCHEDULER_FLAGS[name])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    return pipe.scheduler


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
    on index-aligned chunks of ``chunk`` images (``sample_io.AlignedNetwork``), so that no pixel
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


def sample_images(pipe, seed: int, indices: Sequence[int], num_steps: int,
                  network_batch: int = DEFAULT_NETWORK_BATCH, unet_network=None, **call_kwargs) -> torch.Tensor:
    """Images ``indices`` of a run as an NCHW tensor in [-1, 1]; image i depends on (seed, i) alone.

    The pipeline gets one generator per image (``sample_io``'s noise stream of that image), and
    diffusers draws row j of the initial noise and of every step's noise from generator j. Its
    networks run on chunks of ``network_batch`` images aligned to the image index
    (``aligned_networks``; ``unet_network`` as there), so the pixels do not depend on the batch
    size or the rank count either. A pipeline that still draws from torch's global generator (LDMPipeline with a
    stochastic scheduler) or never calls ``scale_model_input`` (Euler under DDPMPipeline) is refused.
    """
    scheduler = pipe.scheduler
    before = _global_rng_states(pipe.device)
    try:
        with torch.no_grad(), aligned_networks(pipe, indices, network_batch, unet_network):
            images = pipe(
                batch_size=len(indices), generator=ImageNoise(seed, indices).generators,
                num_inference_steps=num_steps, output_type="np", **call_kwargs,
            ).images
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        raise ValueError(
            f"{type(pipe).__name__} cannot drive {type(scheduler).__name__} ({exc}); choose another --scheduler"
        ) from None
    after = _global_rng_states(pipe.device)
    if any(not torch.equal(a, b) for a, b in zip(before, after)):
        raise ValueError(
            f"{type(pipe).__name__} with {type(scheduler).__name__} draws noise from torch's global generator, "
            "so an image would depend on its batch; use a deterministic sampler (--scheduler ddim with --eta 0) "
            "or a pipeline that passes its generator to scheduler.step (DDPMPipeline, DDIMPipeline)"
        )
    if getattr(scheduler, "is_scale_input_called", True) is False:
        raise ValueError(
            f"{type(pipe).__name__} never calls scale_model_input, which {type(scheduler).__name__} needs; "
            "use --scheduler ddpm or ddim with this pipeline"
        )
    images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return images * 2 - 1
