"""Measure exposure bias per sampling step (delta_t, noise-prediction norms) with and without Epsilon Scaling.

N data images are forward-noised to the first sampling step and sampled from there, once with
lambda = 1 and once with --eps_scale (default: the config's published lambda for this step count),
and with --calibrate True once more with lambda calibrated step by step from the norms.
Example:
    python scripts/exposure_bias.py --config cifar10_uncond_admes --model_path cifar10_uncond.pt \
        --data_dir cifar_train --num_images 500 --timestep_respacing 20 --eps_scale 1.017
Writes exposure_bias.csv (one row per run and step), exposure_bias.json (settings, summaries,
every step) and exposure_bias.png to --output_dir; see guided_diffusion/exposure_bias.py for the
columns.
"""

import argparse
import math
from pathlib import Path

from guided_diffusion.run import pipeline as sampling
from guided_diffusion.analysis.exposure_bias import (
    load_images,
    measure_exposure_bias,
    runs_to_dict,
    write_csv,
    write_json,
    write_plot,
)
from adm_common.files import lock_output_folder
from guided_diffusion.analysis.lambda_search import calibrate_eps_scale
from adm_common.errors import UsageError
from adm_common.cli import cli_main
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    create_model_and_diffusion,
    eps_scale_flag,
    model_and_diffusion_defaults,
    output_folder,
    parse_args_with_config,
    sampling_eps_scale,
)


def create_argparser():
    defaults = dict(
        data_dir="", num_images=256, batch_size=64, clip_denoised=True, use_ddim=False, model_path="",
        seed=0, output_dir="", config="", progress=True, calibrate=False,
    )
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    parser.add_argument(
        "--eps_scale", default=None,
        help="the ES schedule compared with the baseline: 1.017, linear:k=0.0025,b=1.0, table:..., paper. "
        "Default: the config's paper value for this step count, else the baseline only",
    )
    return parser


def main():
    args, config, _ = parse_args_with_config(create_argparser())
    for flag in ("num_images", "batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    sampling.check_size_flags(args)
    sampling.check_noise_schedule(args)
    folder = output_folder(args.output_dir, "exposure_bias")
    lock_output_folder(folder)  # one writer per folder; a second run is refused in one line
    images, labels = load_images(args.data_dir, args.image_size, args.num_images, args.seed,
                                 with_labels=args.class_cond)
    model, diffusion, sha = sampling.load_network(
        create_model_and_diffusion, args, model_and_diffusion_defaults().keys(), args.model_path, "model",
        args.image_size,
    )
    schedule, source = sampling_eps_scale(eps_scale_flag(args), config, diffusion.num_timesteps)
    common = dict(labels=labels, seed=args.seed, batch_size=args.batch_size, clip_denoised=args.clip_denoised,
                  use_ddim=args.use_ddim, progress=args.progress)
    runs = [measure_exposure_bias(diffusion, model, images, None, **common)]
    if not schedule.is_identity:
        runs.append(measure_exposure_bias(diffusion, model, images, schedule, **common))
    calibration = calibrate_eps_scale(diffusion, model, images, **common) if args.calibrate else None
    if calibration:
        runs.append(calibration.run)

    for run in runs:  # a NaN measurement would be written as null: refuse it, write nothing
        summary = run.summary()
        if not all(math.isfinite(summary[k]) for k in ("mean_delta", "last_delta", "sample_std")):
            raise UsageError(
                f"the {run.label} run ({run.eps_scale}) gave NaN or infinite values; nothing was written: check "
                "the checkpoint, the noise schedule and --eps_scale"
            )
    settings = dict(vars(args), model_sha256=sha, eps_scale=str(schedule), eps_scale_source=source,
                    num_steps=diffusion.num_timesteps, num_images=len(images))
    record = {"settings": settings, "runs": runs_to_dict(runs)}
    if calibration:
        record["calibration"] = calibration.to_dict()
    write_csv(runs, folder / "exposure_bias.csv")
    write_json(record, folder / "exposure_bias.json")
    title = (f"{Path(args.model_path).name}, {diffusion.num_timesteps} {'DDIM' if args.use_ddim else 'ancestral'} "
             f"steps, {len(images)} images of {args.data_dir}")
    write_plot(runs, folder / "exposure_bias.png", title=title)

    print(f"{'run':<12}{'eps_scale':<28}{'mean delta':>12}{'last delta':>12}{'sample std':>12}{'data std':>10}")
    for run in runs:
        s = run.summary()
        shown = run.eps_scale if len(run.eps_scale) <= 26 else run.eps_scale[:23] + "..."
        print(f"{run.label:<12}{shown:<28}{s['mean_delta']:>12.5f}{s['last_delta']:>12.5f}"
              f"{s['sample_std']:>12.4f}{s['data_std']:>10.4f}")
    if calibration:
        print(f"calibrated lambda: uniform --eps_scale {calibration.uniform}, linear --eps_scale {calibration.linear}")
    print(f"wrote {folder / 'exposure_bias.csv'}, exposure_bias.json and exposure_bias.png")


if __name__ == "__main__":
    cli_main(main)
