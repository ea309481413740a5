"""Upsample base samples (an NPZ from image_sample.py) with a super-resolution model.

Image i is conditioned on base sample i (cycling when there are fewer base samples), with its label
when the model is class-conditional. Example:
    python scripts/super_res_sample.py --config upsampler64_256 --model_path 64_256_upsampler.pt \
        --base_samples samples_50000x64x64x3.npz --timestep_respacing 250 --num_samples 50000
"""

import argparse

import numpy as np
import torch

from guided_diffusion import dist_util, sampling
from guided_diffusion.file_util import sha256_file
from guided_diffusion.sample_io import dequantize
from guided_diffusion.script_util import (
    UsageError,
    add_dict_to_argparser,
    add_sampling_args,
    cli_main,
    parse_args_with_config,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)


def create_argparser():
    defaults = dict(
        clip_denoised=True, num_samples=10000, batch_size=16, use_ddim=False, base_samples="", model_path="",
    )
    defaults.update(sr_model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    add_sampling_args(parser)
    return parser


def load_base_samples(path, small_size, class_cond):
    """The base images (memory-mapped NPZ member) and labels, checked against the model's input size."""
    if not path:
        raise UsageError("--base_samples is required: an NPZ of low-resolution samples (arr_0, NHWC uint8)")
    try:
        data = np.load(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read --base_samples {path}: {exc}") from None
    if "arr_0" not in data:
        raise UsageError(f"--base_samples {path} has no arr_0 (the images); pass an NPZ from image_sample.py")
    images = data["arr_0"]
    if images.ndim != 4 or images.shape[1:] != (small_size, small_size, 3) or images.dtype != np.uint8:
        raise UsageError(
            f"--base_samples {path} holds {images.dtype} images of shape {images.shape[1:]}; this upsampler "
            f"needs uint8 {small_size}x{small_size}x3 (set --small_size or pass other samples)"
        )
    labels = None
    if class_cond:
        if "arr_1" not in data:
            raise UsageError(f"--base_samples {path} has no arr_1 labels, which a class-conditional upsampler needs")
        labels = data["arr_1"]
    return images, labels


def main():
    args, config, _ = parse_args_with_config(create_argparser())
    images, labels = load_base_samples(args.base_samples, args.small_size, args.class_cond)
    sampling.start(args)
    model, diffusion, sha = sampling.load_network(
        sr_create_model_and_diffusion, args, sr_model_and_diffusion_defaults().keys(), args.model_path, "model",
        args.large_size,
    )
    schedule, source = sampling.eps_schedule(args, config, diffusion.num_timesteps)
    device = dist_util.dev()

    def base_kwargs(indices):
        rows = [i % len(images) for i in indices]
        kwargs = {"low_res": dequantize(images[rows]).to(device)}
        if labels is not None:
            kwargs["y"] = torch.from_numpy(labels[rows]).to(device)
        return kwargs

    sample_batch = sampling.batch_sampler(model, diffusion, args, schedule, (3, args.large_size, args.large_size),
                                          extra_kwargs=base_kwargs)

    settings = sampling.run_settings(args, model_sha256=sha, eps_scale=str(schedule),
                                     base_samples_sha256=sha256_file(args.base_samples))
    sidecar = dict(settings, eps_scale_source=source, eps_scale_values=schedule.values(diffusion.num_timesteps),
                   model_path=args.model_path, base_samples=args.base_samples,
                   config=config["path"] if config else None)
    sampling.sample_to_npz(args, settings, sample_batch, (args.large_size, args.large_size, 3), args.class_cond,
                           sidecar)


if __name__ == "__main__":
    cli_main(main)
