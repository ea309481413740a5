"""What ADM's sampling scripts share: set-up from flags, the per-image batch sampler, the sidecar.

The scripts in scripts/ only declare their flags and call these functions.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from guided_diffusion import dist_util, logger
from guided_diffusion.run.checkpoints import SHAPE_FLAGS, infer_unet_flags, load_model_weights, load_state_dict
from adm_common.files import lock_output_folder
from guided_diffusion.run.batching import DEFAULT_NETWORK_BATCH, AlignedNetwork
from guided_diffusion.image_noise import ImageNoise, image_labels
from guided_diffusion.run.output import SampleRun, quantize, run_sampling
from guided_diffusion.run.collective import together
from adm_common.errors import UsageError
from guided_diffusion.script_util import args_to_dict, eps_scale_flag, output_folder, sampling_eps_scale
from guided_diffusion.run.speed import SpeedSettings, optimize_for_sampling, parse_autocast_dtype


def start(args) -> None:
    """Distributed set-up and the log folder (ADM's scripts log to $OPENAI_LOGDIR)."""
    check_speed_flags(args)
    if args.num_samples < 1:
        raise UsageError(f"--num_samples must be at least 1, got {args.num_samples}")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {args.batch_size}")
    check_size_flags(args)
    check_noise_schedule(args)
    args.output_dir = str(output_folder(args.output_dir, "samples"))
    dist_util.setup_dist()
    # One writer per output folder: rank 0 holds its lock until the process ends; a second run on
    # the folder stops here, on every rank, before it logs or writes anything.
    folder = args.output_dir
    together((lambda: lock_output_folder(folder)) if dist_util.get_rank() == 0 else None)
    logger.configure(dir=args.output_dir)


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


def load_network(factory, args, keys, path: str, what: str, image_size: int):
    """Build a network with ``factory(**flags)``, load ``path`` into it; return (net, extra, sha256).

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
    return net, extra, sha


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


def eps_schedule(args, config, num_steps: int, table: str | None = None):
    """The run's lambda schedule (``script_util.sampling_eps_scale``), logged."""
    schedule, source = sampling_eps_scale(eps_scale_flag(args), config, num_steps, table)
    logger.log(f"epsilon scaling: {schedule} [{source}]")
    return schedule, source


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
                  classifier_scale=1.0, extra_kwargs=None, model_takes_labels=True):
    """``sample_batch(indices)`` for run_sampling: noise, per-step noise and labels per image.

    Labels are drawn per image when ``num_classes`` is given, or come from ``extra_kwargs``'s "y".
    The networks run in fixed, index-aligned chunks of ``args.network_batch_size`` images
    (run.batching.AlignedNetwork), so no pixel depends on the batch size or the number of ranks; the
    model runs behind the speed switches of ``args`` (``sampling_network``). The guidance
    classifier is differentiated, so it runs as it is. ``model_takes_labels=False`` keeps the labels
    from an unconditional model (they still reach the classifier), as ADM's classifier_sample does.
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
        images = loop(
            aligned if model_takes_labels else (lambda x, t, y=None, **kwargs: aligned(x, t, **kwargs)),
            (len(indices), *shape),
            clip_denoised=args.clip_denoised,
            model_kwargs=model_kwargs,
            cond_fn=cond_fn,
            device=device,
            generator=ImageNoise(args.seed, indices),
            eps_scale=schedule,
        )
        return images, model_kwargs.get("y")

    return sample_batch


def sample_to_npz(args, settings: dict, sample_batch, image_shape, class_cond: bool, sidecar: dict,
                  quantize=quantize):
    """Run the sharded, resumable loop and log where the NPZ went (``quantize``: float images to uint8)."""
    run = SampleRun(
        args.output_dir, settings, args.num_samples, args.batch_size, image_shape, class_cond,
        rank=dist_util.get_rank(), world_size=dist_util.get_world_size(), keep_shards=args.keep_shards,
    )
    if run.is_complete():
        logger.log(f"{run.final_path} is already complete; nothing to do")
    path = run_sampling(run, sample_batch, sidecar, progress=args.progress, quantize=quantize)
    if path is not None:
        logger.log(f"saved {path}")
        logger.log("sampling complete")
    return path


# Flags that only say where a file is; the run's settings carry the content's sha256 instead.
LOCATION_FLAGS = ("model_path", "classifier_path", "config", "network", "base_samples", "model")


def run_settings(args, **extra) -> dict:
    """Every flag, less the ones that only locate files, plus what identifies the weights."""
    settings = {k: v for k, v in vars(args).items() if k not in LOCATION_FLAGS}
    settings.update(extra)
    return settings
