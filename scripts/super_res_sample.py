"""Upsample base samples (an NPZ from image_sample.py) with a super-resolution model.

Image i is conditioned on base sample i (cycling when there are fewer base samples), with its label
when the model is class-conditional. Example:
    python scripts/super_res_sample.py --config upsampler64_256 --model_path 64_256_upsampler.pt \
        --base_samples samples_50000x64x64x3.npz --timestep_respacing 250 --num_samples 50000
"""

import argparse
import zipfile
from pathlib import Path

import numpy as np
import torch

from adm_common.cli import cli_main
from adm_common.errors import UsageError
from guided_diffusion import dist_util
from guided_diffusion.run import pipeline as sampling
from guided_diffusion.run.configs import parse_args_with_config
from guided_diffusion.run.output import dequantize
from guided_diffusion.script_util import (
    NUM_CLASSES,
    add_dict_to_argparser,
    add_sampling_args,
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


def load_base_samples(path, small_size, class_cond, num_classes=None):
    """The base images and labels, checked against the model's input size and classes.

    Every problem of the file (missing, empty, cut short, not an NPZ, wrong shape, labels out of
    range) is one UsageError line before anything is sampled.
    """
    if not path:
        raise UsageError("--base_samples is required: an NPZ of low-resolution samples (arr_0, NHWC uint8)")
    if not Path(path).is_file():
        raise UsageError(f"--base_samples {path} does not exist (or is not a file); pass an NPZ from image_sample.py")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise UsageError(f"--base_samples {path} is a single .npy array, not an NPZ; pass an NPZ from image_sample.py")
            if "arr_0" not in data.files:
                raise UsageError(f"--base_samples {path} has no arr_0 (the images); pass an NPZ from image_sample.py")
            images = data["arr_0"]
            labels = data["arr_1"] if class_cond and "arr_1" in data.files else None
    except UsageError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot read --base_samples {path} ({reason}): an empty, cut-short or non-NPZ file") from None
    if images.ndim != 4 or images.shape[1:] != (small_size, small_size, 3) or images.dtype != np.uint8:
        raise UsageError(
            f"--base_samples {path} holds {images.dtype} images of shape {images.shape[1:]}; this upsampler "
            f"needs uint8 {small_size}x{small_size}x3 (set --small_size or pass other samples)"
        )
    if len(images) == 0:
        raise UsageError(f"--base_samples {path} holds no images")
    if class_cond:
        if labels is None:
            raise UsageError(f"--base_samples {path} has no arr_1 labels, which a class-conditional upsampler needs")
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise UsageError(f"--base_samples {path}: arr_1 should hold {len(images)} integer labels, "
                             f"found {labels.dtype} {labels.shape}")
        if num_classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise UsageError(f"--base_samples {path} has labels from {labels.min()} to {labels.max()}; this "
                             f"upsampler knows classes 0..{num_classes - 1} (--num_classes {num_classes})")
        labels = labels.astype(np.int64)
    return images, labels


def main():
    args, config, _ = parse_args_with_config(create_argparser())
    sampling.check_size_flags(args)
    images, labels = load_base_samples(args.base_samples, args.small_size, args.class_cond,
                                       getattr(args, "num_classes", NUM_CLASSES))
    sampling.start(args)
    model, diffusion, weights = sampling.load_network(
        sr_create_model_and_diffusion, args, sr_model_and_diffusion_defaults().keys(), args.model_path, "model",
        args.large_size,
    )
    eps = sampling.decide_eps_scale(args, config, diffusion.num_timesteps)
    device = dist_util.dev()

    def base_kwargs(indices):
        rows = [i % len(images) for i in indices]
        kwargs = {"low_res": dequantize(images[rows]).to(device)}
        if labels is not None:
            kwargs["y"] = torch.from_numpy(labels[rows]).to(device)
        return kwargs

    sample_batch = sampling.batch_sampler(model, diffusion, args, eps.schedule, (3, args.large_size, args.large_size),
                                          extra_kwargs=base_kwargs,
                                          time_shift=sampling.decide_time_shift(args))
    job = sampling.SamplingJob(sample_batch, (args.large_size, args.large_size, 3), args.class_cond, eps,
                               [weights, sampling.InputFile.of("base_samples", args.base_samples, "base_samples")])
    sampling.run_sampling_job(args, config, job)


if __name__ == "__main__":
    cli_main(main)
