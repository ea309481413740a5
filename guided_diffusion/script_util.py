"""Flag defaults and factories, as in ADM's script_util.

Every flag default lives here. ``create_*`` turn ADM's command-line flags into networks and
diffusions; a released checkpoint's flags come from its config (run/configs.py).
"""

from __future__ import annotations

import argparse
import inspect

from guided_diffusion import gaussian_diffusion as gd
from adm_common.errors import UsageError
from guided_diffusion.respace import SpacedDiffusion, space_timesteps
from guided_diffusion.unet import EncoderUNetModel, SuperResModel, UNetModel

NUM_CLASSES = 1000

# Default channel multipliers by image size, as the released checkpoints use them.
_UNET_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}
_SR_CHANNEL_MULT = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}


def diffusion_defaults():
    """Defaults for image and classifier training."""
    return dict(
        learn_sigma=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
    )


def classifier_defaults():
    return dict(
        image_size=64,
        classifier_use_fp16=False,
        classifier_width=128,
        classifier_depth=2,
        classifier_attention_resolutions="32,16,8",
        classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True,
        classifier_pool="attention",
        classifier_channel_mult="",
        num_classes=NUM_CLASSES,
    )


def model_and_diffusion_defaults():
    res = dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
        eps_scaler=0.0,  # ADM-ES's key: lambda in sampling, input perturbation in training; 0 is off
        num_classes=NUM_CLASSES,
    )
    res.update(diffusion_defaults())
    return res


def diffusion_training_defaults():
    """Flags of image_train.py and super_res_train.py: ADM's, then the new ones."""
    return dict(
        data_dir="",
        schedule_sampler="uniform",
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,
        batch_size=1,
        microbatch=-1,
        ema_rate="0.9999",
        log_interval=10,
        save_interval=10000,
        resume_checkpoint="",
        use_fp16=False,
        fp16_scale_growth=1e-3,
        use_bf16=False,
        input_perturbation=0.0,
        max_steps=-1,  # the step at which the run ends; 0: no step at all, -1: no limit
        seed=0,
        log_dir="",
        allow_incomplete_resume=False,
        skip_bad_images=False,  # leave out unreadable images (counted) instead of refusing the data
    )


def classifier_training_defaults():
    """Flags of classifier_train.py: ADM's, then the new ones (fp16 is --classifier_use_fp16)."""
    return dict(
        data_dir="",
        val_data_dir="",
        noised=True,
        iterations=150000,
        lr=3e-4,
        weight_decay=0.0,
        anneal_lr=False,
        batch_size=4,
        microbatch=-1,
        schedule_sampler="uniform",
        resume_checkpoint="",
        log_interval=10,
        eval_interval=5,
        save_interval=10000,
        use_bf16=False,
        seed=0,
        log_dir="",
        allow_incomplete_resume=False,
        skip_bad_images=False,  # leave out unreadable images (counted) instead of refusing the data
    )


def classifier_and_diffusion_defaults():
    res = classifier_defaults()
    res.update(diffusion_defaults())
    return res


def sr_model_and_diffusion_defaults():
    res = model_and_diffusion_defaults()
    res["large_size"] = 256
    res["small_size"] = 64
    accepted = inspect.signature(sr_create_model_and_diffusion).parameters
    return {k: v for k, v in res.items() if k in accepted}


def _parse_channel_mult(channel_mult, image_size: int, table: dict) -> tuple:
    if channel_mult == "" or channel_mult is None:
        if image_size not in table:
            raise UsageError(
                f"no default channel_mult for image_size {image_size}; "
                f"pass --channel_mult (e.g. 1,2,2) or use one of {sorted(table)}"
            )
        return table[image_size]
    if isinstance(channel_mult, str):
        try:
            return tuple(float(m) if "." in m else int(m) for m in channel_mult.split(","))
        except ValueError:
            raise UsageError(f"cannot read channel_mult {channel_mult!r}; use e.g. 1,2,2,2") from None
    return tuple(channel_mult)


def _attention_ds(attention_resolutions, image_size: int) -> tuple:
    """Attention resolutions in pixels ("32,16,8") -> downsample rates, as the networks take them."""
    if attention_resolutions in ("", None):
        return ()
    try:
        pixels = [int(r) for r in str(attention_resolutions).split(",")]
    except ValueError:
        raise UsageError(
            f"cannot read attention_resolutions {attention_resolutions!r}; use pixel sizes such as 32,16,8"
        ) from None
    for p in pixels:
        if p <= 0 or image_size % p:
            raise UsageError(f"attention resolution {p} does not divide image_size {image_size}")
    return tuple(image_size // p for p in pixels)


def create_model_and_diffusion(
    image_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    channel_mult,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    use_new_attention_order,
    eps_scaler=0.0,
    num_classes=NUM_CLASSES,
    eps_scale=None,
):
    """ADM's factory. ``eps_scaler`` is ADM-ES's key (see GaussianDiffusion); ``num_classes`` and
    ``eps_scale`` (any lambda schedule: the samplers' default) are new."""
    model = create_model(
        image_size,
        num_channels,
        num_res_blocks,
        channel_mult=channel_mult,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        use_new_attention_order=use_new_attention_order,
        num_classes=num_classes,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
        eps_scale=eps_scale,
        eps_scaler=eps_scaler,
    )
    return model, diffusion


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    num_classes=NUM_CLASSES,
):
    """ADM's UNet from script flags. ``num_classes`` (new) is the label count when class_cond."""
    return UNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=(6 if learn_sigma else 3),
        num_res_blocks=num_res_blocks,
        attention_resolutions=_attention_ds(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=_parse_channel_mult(channel_mult, image_size, _UNET_CHANNEL_MULT),
        num_classes=(num_classes if class_cond else None),
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
    )


def create_classifier_and_diffusion(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    learn_sigma,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    classifier_channel_mult="",
    num_classes=NUM_CLASSES,
):
    classifier = create_classifier(
        image_size,
        classifier_use_fp16,
        classifier_width,
        classifier_depth,
        classifier_attention_resolutions,
        classifier_use_scale_shift_norm,
        classifier_resblock_updown,
        classifier_pool,
        classifier_channel_mult=classifier_channel_mult,
        num_classes=num_classes,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
    )
    return classifier, diffusion


def create_classifier(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    classifier_channel_mult="",
    num_classes=NUM_CLASSES,
):
    """ADM's noise-aware classifier. ``classifier_channel_mult`` and ``num_classes`` are new (small data)."""
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=classifier_width,
        out_channels=num_classes,
        num_res_blocks=classifier_depth,
        attention_resolutions=_attention_ds(classifier_attention_resolutions, image_size),
        channel_mult=_parse_channel_mult(classifier_channel_mult, image_size, _UNET_CHANNEL_MULT),
        use_fp16=classifier_use_fp16,
        num_head_channels=64,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
    )


def sr_create_model_and_diffusion(
    large_size,
    small_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    eps_scale=None,
):
    model = sr_create_model(
        large_size,
        small_size,
        num_channels,
        num_res_blocks,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
        eps_scale=eps_scale,
    )
    return model, diffusion


def sr_create_model(
    large_size,
    small_size,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    use_checkpoint,
    attention_resolutions,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    resblock_updown,
    use_fp16,
):
    if large_size not in _SR_CHANNEL_MULT:
        raise UsageError(f"unsupported large_size {large_size}; use one of {sorted(_SR_CHANNEL_MULT)}")
    if small_size >= large_size:
        raise UsageError(f"small_size {small_size} must be smaller than large_size {large_size}")
    return SuperResModel(
        image_size=large_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=(6 if learn_sigma else 3),
        num_res_blocks=num_res_blocks,
        attention_resolutions=_attention_ds(attention_resolutions, large_size),
        dropout=dropout,
        channel_mult=_SR_CHANNEL_MULT[large_size],
        num_classes=(NUM_CLASSES if class_cond else None),
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
    )


def diffusion_from_flags(flags: dict, timestep_respacing: str = "", eps_scale=None):
    """The diffusion that a model's flags (a config's ``flags``, ADM's defaults filled in) describe."""
    flags = {**model_and_diffusion_defaults(), **flags}
    return create_gaussian_diffusion(
        steps=flags["diffusion_steps"],
        learn_sigma=flags["learn_sigma"],
        noise_schedule=flags["noise_schedule"],
        use_kl=flags["use_kl"],
        predict_xstart=flags["predict_xstart"],
        rescale_timesteps=flags["rescale_timesteps"],
        rescale_learned_sigmas=flags["rescale_learned_sigmas"],
        timestep_respacing=timestep_respacing,
        eps_scale=eps_scale,
    )


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
    eps_scaler=0.0,
    eps_scale=None,
):
    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if not timestep_respacing:
        timestep_respacing = [steps]
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing),
        betas=betas,
        model_mean_type=(gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON),
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
        eps_scale=eps_scale,
        eps_scaler=eps_scaler,
    )


# ---------------------------------------------------------------------------------------------
# argparse, as ADM's scripts use it


def add_dict_to_argparser(parser, default_dict):
    for k, v in default_dict.items():
        v_type = type(v)
        if v is None:
            v_type = str
        elif isinstance(v, bool):
            v_type = str2bool
        parser.add_argument(f"--{k}", default=v, type=v_type)


def args_to_dict(args, keys):
    return {k: getattr(args, k) for k in keys}


def str2bool(v):
    """Read True/False flags the way ADM's command lines write them (True, false, 1, no, ...)."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r} (use True or False)")


# ---------------------------------------------------------------------------------------------
# Flags every sampling script shares


# Images per network call (AlignedNetwork's chunk): part of what decides the pixels, so fixed per run.
DEFAULT_NETWORK_BATCH = 16


def sampling_defaults():
    """Flags that ADM's sample scripts lack: seeds, output, Epsilon Scaling, configs."""
    return dict(
        seed=0,
        output_dir="",
        config="",
        keep_shards=False,
        progress=True,
        infer_flags=False,  # take the shape-determined model flags from the checkpoint
        network_batch_size=DEFAULT_NETWORK_BATCH,  # images per network call; fixed so no pixel depends on --batch_size
        # speed switches (guided_diffusion/run/speed.py; benchmarks/RESULTS.md says what each buys)
        fused_attention=True,
        inference_mode=True,
        channels_last=False,
        autocast_dtype="none",  # bf16 or fp16: the network in reduced precision (not ADM's use_fp16)
        compile=False,
        cuda_graphs=False,
        # Time-Shift sampling (time_shift.py), TS-DPM-ADM's flags and defaults; off unless --do_time_shift
        do_time_shift=False,
        window=2,
        cutoff=300,
        time_shift_rule="paper",  # or tsdpm_adm: that code's quirks (DDIM only)
    )


def add_sampling_args(parser) -> None:
    """The sampling flags; call after the model flags. ``--eps_scaler`` is ADM-ES's: a number
    (0: not given) where the model flags have ADM-ES's key, else an alias of ``--eps_scale``."""
    add_dict_to_argparser(parser, sampling_defaults())
    has_adm_es_key = any("--eps_scaler" in action.option_strings for action in parser._actions)
    parser.add_argument(
        *(["--eps_scale"] if has_adm_es_key else ["--eps_scale", "--eps_scaler"]), dest="eps_scale", default=None,
        help="Epsilon Scaling lambda: 1.017, linear:k=0.0025,b=1.0, table:v0,v1,..., paper, "
        "paper:linear (from --config), or 1.0 for none. Default: --eps_scaler (ADM-ES's flag, a "
        "number) when given, else the config's paper value for this step count, else 1.0",
    )

