"""One sampling pipeline for the sampling scripts: flags -> networks -> sampler -> sharded output.

A script declares its flags, builds its networks with ``load_network`` (or ``load_karras_denoiser``),
decides lambda once (``decide_eps_scale``), makes a per-image ``sample_batch`` (``batch_sampler`` for
ADM's loops, ``karras_batch_sampler`` for EDM's) and hands a ``SamplingJob`` to ``run_sampling_job``,
which writes the sharded, resumable NPZ and its sidecar. ``SamplingJob.record`` is the one place
the run's settings and sidecar are made. A flag that changes how the sampler steps is read from
``args`` where the sampler is called (``batch_sampler``) and is recorded with every other flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from adm_common.errors import UsageError
from adm_common.files import lock_output_folder, sha256_file
from guided_diffusion import dist_util, logger
from guided_diffusion.image_noise import STREAM_EXTRA, ImageNoise, image_labels
from guided_diffusion.run.batching import DEFAULT_NETWORK_BATCH, AlignedNetwork
from guided_diffusion.run.checkpoints import SHAPE_FLAGS, infer_unet_flags, load_model_weights, load_state_dict
from guided_diffusion.run.collective import together
from guided_diffusion.run.eps_choice import EpsChoice, choose_eps_scale
from guided_diffusion.run.output import SampleRun, output_folder, quantize, run_sampling
from guided_diffusion.run.speed import SpeedSettings, optimize_for_sampling, parse_autocast_dtype, slow_autocast_warning
from guided_diffusion.respace import space_timesteps
from guided_diffusion.script_util import args_to_dict, create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion.time_shift import time_shift_from_flags


def start(args) -> None:
    """Distributed set-up and the log folder (ADM's scripts log to $OPENAI_LOGDIR)."""
    check_speed_flags(args)
    if args.num_samples < 1:
        raise UsageError(f"--num_samples must be at least 1, got {args.num_samples}")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {args.batch_size}")
    check_size_flags(args)
    check_noise_schedule(args)
    check_time_shift_flags(args)
    args.output_dir = str(output_folder(args.output_dir, "samples"))
    dist_util.setup_dist()
    # One writer per output folder: rank 0 holds its lock until the process ends; a second run on
    # the folder stops here, on every rank, before it logs or writes anything.
    folder = args.output_dir
    together((lambda: lock_output_folder(folder)) if dist_util.get_rank() == 0 else None)
    logger.configure(dir=args.output_dir)


def own_output_folder(output_dir: str, default: str) -> Path:
    """A single-process command's output folder (``output_folder``), held by this process until it ends:
    a second run on the folder is refused in one line."""
    folder = output_folder(output_dir, default)
    lock_output_folder(folder)
    return folder


# Flags that are sizes or counts: a value below 1 is a typo, refused before anything is built.
POSITIVE_FLAGS = ("image_size", "large_size", "small_size", "num_channels", "num_classes", "diffusion_steps",
                  "classifier_width")


def check_size_flags(args) -> None:
    for name in POSITIVE_FLAGS:
        if name == "num_classes" and not getattr(args, "class_cond", True):
            continue  # an unconditional model has no classes to count
        value = getattr(args, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise UsageError(f"--{name} must be at least 1, got {value}")


def check_noise_schedule(args) -> None:
    """Refuse a noise schedule whose betas reach 1 (alpha_bar 0: every sample NaN), before sampling."""
    from guided_diffusion.gaussian_diffusion import get_named_beta_schedule

    name, steps = getattr(args, "noise_schedule", None), getattr(args, "diffusion_steps", None)
    if name is None or not isinstance(steps, int):
        return
    if steps < 2:
        raise UsageError(f"--diffusion_steps must be at least 2, got {steps}")
    try:
        betas = get_named_beta_schedule(name, steps)
    except ValueError as exc:
        raise UsageError(f"--noise_schedule: {exc}") from None
    if not (betas < 1).all():
        raise UsageError(
            f"--noise_schedule {name} with --diffusion_steps {steps} has betas up to {betas.max():g}; a beta of 1 "
            "leaves no signal and every sample would be NaN: use more --diffusion_steps (the linear schedule "
            "needs more than 20) or --noise_schedule cosine"
        )


@dataclass(frozen=True)
class InputFile:
    """A file a run reads: the settings keep its content's sha256 (``NAME_sha256``), the sidecar
    also the path under the flag that gave it."""

    flag: str
    path: str
    sha256: str
    name: str

    @classmethod
    def of(cls, flag: str, path: str, name: str, sha256: str | None = None) -> "InputFile":
        return cls(flag, path, sha256 or sha256_file(path), name)


def load_network(factory, args, keys, path: str, what: str, image_size: int):
    """Build a network with ``factory(**flags)``, load ``path`` into it; return (net, extra, InputFile).

    ``factory`` may return a (network, diffusion) pair; ``extra`` is then the diffusion.
    """
    if not path:
        raise UsageError(f"--{what}_path is required: the checkpoint file to sample from")
    if not Path(path).exists():
        raise FileNotFoundError(f"{what} checkpoint {path} does not exist; check --{what}_path")
    if what == "model" and getattr(args, "infer_flags", False):
        adopt_checkpoint_flags(args, path, image_size)
    built = factory(**args_to_dict(args, keys))
    net, extra = built if isinstance(built, tuple) else (built, None)
    sha = load_model_weights(net, path, image_size)
    net.to(dist_util.dev())
    if getattr(args, "use_fp16" if what == "model" else f"{what}_use_fp16", False):
        if dist_util.dev().type == "cuda":
            net.convert_to_fp16()
        else:
            logger.log(f"{what}: use_fp16 ignored on CPU (float16 convolutions there are slow); running float32")
    net.eval()
    return net, extra, InputFile(f"{what}_path", path, sha, what)


def load_adm_model(args):
    """ADM's model and diffusion from the model flags and --model_path: (model, diffusion, InputFile)."""
    return load_network(create_model_and_diffusion, args, model_and_diffusion_defaults().keys(), args.model_path,
                        "model", args.image_size)


def load_karras_denoiser(args):
    """EDM's denoiser from --network (an EDM pickle or converted file) or --model_path (ADM, as a denoiser).

    Returns (denoiser, image shape C x H x W, number of classes or 0, InputFile, sidecar facts).
    """
    from guided_diffusion.edm.pickles import load_edm_network
    from guided_diffusion.edm.samplers import ADMDenoiser, BoundDenoiser

    if bool(args.network) == bool(args.model_path):
        raise UsageError("give exactly one of --network (an EDM .pkl or converted .safetensors) and --model_path (ADM)")
    if args.network:
        net, config = load_edm_network(args.network, args.network_key)
        net.to(dist_util.dev()).eval()
        shape = (net.img_channels, net.img_resolution, net.img_resolution)
        facts = dict(network_config=config, network_sigma_min=float(net.sigma_min),
                     network_sigma_max=float(net.sigma_max))
        fast = sampling_network(net, args)
        denoiser = BoundDenoiser(lambda x, sigma, labels: fast(x, sigma, class_labels=labels), net)
        return denoiser, shape, net.label_dim, InputFile.of("network", args.network, "network"), facts
    if args.timestep_respacing:
        logger.log(f"ignoring --timestep_respacing {args.timestep_respacing}: the noise levels come from --num_steps")
        args.timestep_respacing = ""
    model, diffusion, weights = load_adm_model(args)
    num_classes = args.num_classes if args.class_cond else 0
    denoiser = ADMDenoiser.from_diffusion(sampling_network(model, args), diffusion)
    return denoiser, (3, args.image_size, args.image_size), num_classes, weights, {}


def check_speed_flags(args) -> None:
    """Refuse network flags this machine cannot run (speed switches, chunk size), before anything is written."""
    try:
        parse_autocast_dtype(getattr(args, "autocast_dtype", None))
    except ValueError:
        raise UsageError(f"--autocast_dtype {args.autocast_dtype}: use none, bf16 or fp16") from None
    if getattr(args, "network_batch_size", DEFAULT_NETWORK_BATCH) < 1:
        raise UsageError(f"--network_batch_size must be at least 1, got {args.network_batch_size}")
    if getattr(args, "cuda_graphs", False) and not torch.cuda.is_available():
        raise UsageError("--cuda_graphs True needs a CUDA GPU and none is visible; leave --cuda_graphs False")


def sampling_network(net, args):
    """``net`` (an eval-mode torch module) behind the speed switches its flags ask for (speed.py).

    The defaults (fused attention, inference mode) give the same pixels as the bare network;
    every switch is part of the run's settings, so shards made with other switches are refused.
    """
    defaults = SpeedSettings()
    slow = slow_autocast_warning(parse_autocast_dtype(getattr(args, "autocast_dtype", None)), dist_util.dev())
    if slow:
        logger.log(f"warning: {slow}")
    try:
        return optimize_for_sampling(
            net,
            fused_attention=getattr(args, "fused_attention", defaults.fused_attention),
            channels_last=getattr(args, "channels_last", defaults.channels_last),
            inference_mode=getattr(args, "inference_mode", defaults.inference_mode),
            autocast_dtype=getattr(args, "autocast_dtype", None),
            compile=getattr(args, "compile", defaults.compile),
            cuda_graphs=getattr(args, "cuda_graphs", defaults.cuda_graphs),
        )
    except ValueError as exc:
        raise UsageError(f"speed switches: {exc}") from None


def adopt_checkpoint_flags(args, path, image_size: int) -> None:
    """Set the flags that the checkpoint's tensor shapes determine (--infer_flags True).

    Head settings, dropout, the noise schedule and timestep rescaling leave no trace in the
    shapes; they still come from the flags or the config.
    """
    inferred = infer_unet_flags(load_state_dict(path), image_size)
    changed = []
    for key in SHAPE_FLAGS:
        if key in inferred and hasattr(args, key) and getattr(args, key) != inferred[key]:
            setattr(args, key, inferred[key])
            changed.append(f"--{key} {inferred[key]}")
    logger.log("flags from the checkpoint's shapes: " + (", ".join(changed) or "all already agree"))


def decide_eps_scale(args, config, num_steps: int, table: str | None = None) -> EpsChoice:
    """The run's lambda, decided once (``eps_choice.choose_eps_scale``) and logged."""
    eps = choose_eps_scale(args, config, num_steps, table)
    logger.log(f"epsilon scaling: {eps.schedule} [{eps.source}]")
    return eps


def check_time_shift_flags(args) -> None:
    """Refuse Time-Shift flags the respaced chain of the flags cannot take, before any folder is made."""
    if not getattr(args, "do_time_shift", False) or not isinstance(getattr(args, "diffusion_steps", None), int):
        return
    shift = time_shift_from_flags(True, args.window, args.cutoff, args.time_shift_rule)
    if shift is not None:
        steps = space_timesteps(args.diffusion_steps, args.timestep_respacing or [args.diffusion_steps])
        shift.validate(args.diffusion_steps, len(steps), bool(args.use_ddim))


def decide_time_shift(args):
    """The run's Time-Shift setting from --do_time_shift, --window, --cutoff and --time_shift_rule
    (TS-DPM-ADM's flags; checked against the chain by ``start``, and again by the sampling loop);
    None when off."""
    shift = time_shift_from_flags(args.do_time_shift, args.window, args.cutoff, args.time_shift_rule)
    if shift is not None:
        logger.log(f"time shift: {shift}")
    return shift


def refuse_time_shift(args, sampler: str) -> None:
    """Samplers that have no Time-Shift rule refuse --do_time_shift in one line."""
    if getattr(args, "do_time_shift", False):
        raise UsageError(f"--do_time_shift is defined for ADM's ancestral and DDIM loops only, not for {sampler}; "
                         "drop --do_time_shift")


def classifier_cond_fn(classifier, scale: float):
    """ADM's guidance gradient: scale * d/dx log p(y | x_t) from a noise-aware classifier."""

    def cond_fn(x, t, y=None):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[torch.arange(len(log_probs), device=x.device), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn


def batch_sampler(model, diffusion, args, schedule, shape, num_classes=None, classifier=None,
                  classifier_scale=1.0, extra_kwargs=None, model_takes_labels=True, time_shift=None):
    """``sample_batch(indices)`` for run_sampling: noise, per-step noise and labels per image.

    Labels are drawn per image when ``num_classes`` is given, or come from ``extra_kwargs``'s "y".
    The networks run in fixed, index-aligned chunks of ``args.network_batch_size`` images
    (run.batching.AlignedNetwork), so no pixel depends on the batch size or the number of ranks; the
    model runs behind the speed switches of ``args`` (``sampling_network``). The guidance
    classifier is differentiated, so it runs as it is. ``model_takes_labels=False`` keeps the labels
    from an unconditional model (they still reach the classifier), as ADM's classifier_sample does.
    With a ``time_shift`` (``decide_time_shift``), ``sample_batch`` also returns each image's chosen
    timestep per step ([n, steps], int64), which the output summarises in the sidecar.
    """
    device = dist_util.dev()
    loop = diffusion.ddim_sample_loop if args.use_ddim else diffusion.p_sample_loop
    chunk = getattr(args, "network_batch_size", DEFAULT_NETWORK_BATCH)
    network = sampling_network(model, args)  # once: compiled code and CUDA graphs are kept

    def sample_batch(indices):
        model_kwargs = dict(extra_kwargs(indices) if extra_kwargs else {})
        if num_classes:
            model_kwargs["y"] = image_labels(args.seed, indices, num_classes, device=device)
        cond_fn = None
        if classifier is not None:
            cond_fn = classifier_cond_fn(AlignedNetwork(classifier, indices, chunk), classifier_scale)
        aligned = AlignedNetwork(network, indices, chunk)
        record = [] if time_shift is not None else None
        images = loop(
            aligned if model_takes_labels else (lambda x, t, y=None, **kwargs: aligned(x, t, **kwargs)),
            (len(indices), *shape),
            clip_denoised=args.clip_denoised,
            model_kwargs=model_kwargs,
            cond_fn=cond_fn,
            device=device,
            generator=ImageNoise(args.seed, indices),
            eps_scale=schedule,
            time_shift=time_shift,
            time_shift_record=record,
        )
        if record is None:
            return images, model_kwargs.get("y")
        return images, model_kwargs.get("y"), torch.stack(record, dim=1).cpu().numpy()

    return sample_batch


def karras_batch_sampler(denoiser, args, shape, num_classes: int, sampler_kwargs: dict, cast=None):
    """``sample_batch(indices)`` for EDM's samplers: per-image noise, churn noise and labels.

    Labels are drawn per image when the network has ``num_classes`` (``--class`` sets one for all).
    The denoiser runs in index-aligned chunks of ``args.network_batch_size`` images, as in
    ``batch_sampler``; ``cast`` converts the sampled images (EDM's float64) before they are quantized.
    """
    from guided_diffusion.edm.samplers import BoundDenoiser, karras_sample

    device = dist_util.dev()
    class_idx = getattr(args, "class_idx", None)

    def sample_batch(indices):
        labels = image_labels(args.seed, indices, num_classes, device=device) if num_classes else None
        if labels is not None and class_idx is not None:
            labels = labels.new_full(labels.shape, class_idx)
        aligned = AlignedNetwork(lambda x, sigma, labels=None: denoiser(x, sigma, labels), indices,
                                 args.network_batch_size)
        images = karras_sample(
            BoundDenoiser(lambda x, sigma, labels: aligned(x, sigma, labels=labels), denoiser),
            (len(indices), *shape),
            class_labels=labels, device=device,
            generator=ImageNoise(args.seed, indices),
            churn_generator=ImageNoise(args.seed, indices, STREAM_EXTRA),
            **sampler_kwargs,
        )
        return (images if cast is None else cast(images)), labels

    return sample_batch


# The Time-Shift flags (script_util.sampling_defaults); with --do_time_shift False they change nothing.
TIME_SHIFT_FLAGS = ("do_time_shift", "window", "cutoff", "time_shift_rule")

# Flags that only say where a file is; the run's settings carry the content's sha256 instead.
LOCATION_FLAGS = ("model_path", "classifier_path", "config", "network", "base_samples", "model")


def run_settings(args, **extra) -> dict:
    """Every flag, less the ones that only locate files, plus what identifies the weights."""
    settings = {k: v for k, v in vars(args).items() if k not in LOCATION_FLAGS}
    settings.update(extra)
    return settings


@dataclass
class SamplingJob:
    """What a sampling script decided: how a batch of images is made, and what the sidecar says of it.

    ``sample_batch(indices)`` returns (images in [-1, 1], NCHW; labels or None); ``image_shape`` is
    the output's H, W, C. ``inputs`` are the files read (their sha256 join the settings),
    ``identity`` further settings that decide pixels (a diffusers scheduler's config), ``facts``
    further sidecar entries that do not.
    """

    sample_batch: Callable | None
    image_shape: tuple
    class_cond: bool
    eps: EpsChoice
    inputs: Sequence[InputFile] = ()
    identity: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)
    quantize: Callable = quantize

    def record(self, args, config) -> tuple[dict, dict]:
        """(settings, sidecar): every flag but the file locations, the files' sha256, lambda; the
        sidecar adds the locations, the config's path, where lambda came from and ``facts``."""
        settings = run_settings(args, **{f"{f.name}_sha256": f.sha256 for f in self.inputs}, **self.identity,
                                **self.eps.settings())
        shift_flags = {k: settings.pop(k) for k in TIME_SHIFT_FLAGS if k in settings}
        if shift_flags.get("do_time_shift"):  # off, they decide no pixel: not part of the run's identity
            settings.update(shift_flags)
        sidecar = dict(settings)
        if shift_flags and not shift_flags.get("do_time_shift"):
            sidecar["do_time_shift"] = False
        sidecar.update({f.flag: f.path for f in self.inputs})
        sidecar.update(self.facts)
        sidecar.update(self.eps.record())
        sidecar["config"] = config["path"] if config else None
        return settings, sidecar


def run_sampling_job(args, config, job: SamplingJob):
    """Make every missing image of the job into --output_dir's shards, then ADM's NPZ and its sidecar."""
    settings, sidecar = job.record(args, config)
    run = SampleRun(
        args.output_dir, settings, args.num_samples, args.batch_size, job.image_shape, job.class_cond,
        rank=dist_util.get_rank(), world_size=dist_util.get_world_size(), keep_shards=args.keep_shards,
    )
    if run.is_complete():
        logger.log(f"{run.final_path} is already complete; nothing to do")
    path = run_sampling(run, job.sample_batch, sidecar, progress=args.progress, quantize=job.quantize)
    if path is not None:
        logger.log(f"saved {path}")
        logger.log("sampling complete")
    return path
