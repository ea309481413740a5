"""The analysis commands (scripts/exposure_bias.py, scripts/search_eps_scale.py) as library functions.

Both set up as the sampling scripts do (run.pipeline: flag checks, the model, the folder's lock;
run.eps_choice: lambda from the flags and the config), then measure (analysis.exposure_bias) or
search (analysis.lambda_search). Each ``*_main`` reads ``sys.argv``; run it through ``cli_main``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import warnings
from pathlib import Path

from adm_common.devices import check_device
from adm_common.errors import UsageError
from adm_common.files import sha256_file
from guided_diffusion.analysis.exposure_bias import (
    load_images,
    measure_exposure_bias,
    runs_to_dict,
    write_csv,
    write_json,
    write_plot,
)
from guided_diffusion.analysis.lambda_search import (
    EVALUATOR_METRICS,
    EvaluationCache,
    LambdaSearch,
    calibrate_eps_scale,
    compare_schedules,
    default_k_range,
    evaluator_score,
    frechet_score,
    pixel_features,
    sampling_metric,
    write_search_plot,
)
from guided_diffusion.eps_scaling import EpsScale
from guided_diffusion.run import pipeline as sampling
from guided_diffusion.run.configs import parse_args_with_config
from guided_diffusion.run.eps_choice import choose_eps_scale
from guided_diffusion.run.output import quantize
from guided_diffusion.script_util import add_dict_to_argparser, model_and_diffusion_defaults


# ---------------------------------------------------------------------------------------------
# scripts/exposure_bias.py


def exposure_bias_argparser():
    defaults = dict(
        data_dir="", num_images=256, batch_size=64, clip_denoised=True, use_ddim=False, model_path="",
        seed=0, output_dir="", config="", progress=True, calibrate=False,
    )
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(
        description="Measure exposure bias per sampling step (delta_t, noise-prediction norms) with and without "
        "Epsilon Scaling.")
    add_dict_to_argparser(parser, defaults)
    parser.add_argument(
        "--eps_scale", default=None,
        help="the ES schedule compared with the baseline: 1.017, linear:k=0.0025,b=1.0, table:..., paper. "
        "Default: the config's paper value for this step count, else the baseline only",
    )
    return parser


def exposure_bias_main():
    """scripts/exposure_bias.py: measure, write exposure_bias.csv, .json and .png, print a summary."""
    args, config, _ = parse_args_with_config(exposure_bias_argparser())
    for flag in ("num_images", "batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    sampling.check_size_flags(args)
    sampling.check_noise_schedule(args)
    folder = sampling.own_output_folder(args.output_dir, "exposure_bias")
    images, labels = load_images(args.data_dir, args.image_size, args.num_images, args.seed,
                                 with_labels=args.class_cond)
    model, diffusion, weights = sampling.load_adm_model(args)
    eps = choose_eps_scale(args, config, diffusion.num_timesteps)
    common = dict(labels=labels, seed=args.seed, batch_size=args.batch_size, clip_denoised=args.clip_denoised,
                  use_ddim=args.use_ddim, progress=args.progress)
    runs = [measure_exposure_bias(diffusion, model, images, None, **common)]
    if not eps.schedule.is_identity:
        runs.append(measure_exposure_bias(diffusion, model, images, eps.schedule, **common))
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
    settings = dict(vars(args), model_sha256=weights.sha256, eps_scale=str(eps.schedule), eps_scale_source=eps.source,
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


# ---------------------------------------------------------------------------------------------
# scripts/search_eps_scale.py

DATA_METRICS = ("digit_fd", "pixel_fd")  # Frechet distances against --data_dir
METRICS = (*DATA_METRICS, *EVALUATOR_METRICS)
FEATURE_DIMS = {"digit_fd": 64, "pixel_fd": 64, "fid": 2048, "sfid": 2023}  # pixel_fd: at most 64



def search_argparser():
    defaults = dict(
        metric="fid", ref_batch="", data_dir="", num_images=500, num_samples=1000, batch_size=64, seeds="0",
        family="both", b_range="0.98,1.03", k_range="", grid=5, rounds=3, cache="", calibrate=True,
        clip_denoised=True, use_ddim=False, model_path="", output_dir="", config="", progress=True,
        backend="tf", inception_path="", device="",
    )
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(
        description="Search the Epsilon Scaling lambda (uniform b and linear k, b) that optimises a sample metric.")
    add_dict_to_argparser(parser, defaults)
    return parser


def parse_numbers(text: str, flag: str, kind=float, count=None) -> list:
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"cannot read --{flag} {text!r}; give comma-separated numbers such as 0.98,1.03") from None
    if count is not None and len(values) != count:
        raise UsageError(f"--{flag} needs {count} comma-separated numbers (low,high), got {text!r}")
    return values


def check_search_args(args):
    if args.metric not in METRICS:
        raise UsageError(f"unknown --metric {args.metric!r}; use one of {', '.join(METRICS)}")
    if args.family not in ("uniform", "linear", "both"):
        raise UsageError(f"--family must be uniform, linear or both, got {args.family!r}")
    if args.metric in DATA_METRICS and not args.data_dir:
        raise UsageError(f"--metric {args.metric} compares with data images; pass --data_dir (a folder, an .npz or digits)")
    if args.metric not in DATA_METRICS and not args.ref_batch:
        raise UsageError(f"--metric {args.metric} needs ADM's reference batch; pass --ref_batch REF.npz")
    check_device(args.device)
    for flag in ("num_images", "num_samples", "batch_size", "grid", "rounds"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    sampling.check_size_flags(args)
    sampling.check_noise_schedule(args)
    if args.ref_batch and not Path(args.ref_batch).is_file():
        raise FileNotFoundError(f"reference batch {args.ref_batch} does not exist; check --ref_batch")


def search_score(args, data_images):
    """score(uint8 images) for --metric, and a record of what it compares against."""
    if args.metric in DATA_METRICS:
        reference = {"data_dir": args.data_dir, "num_images": len(data_images), "seed": 0}
        features = pixel_features
        if args.metric == "digit_fd":
            from guided_diffusion.digits.features import FEATURES_FILE, digit_features, load_digit_features

            features = functools.partial(digit_features, load_digit_features())
            reference["features_sha256"] = sha256_file(FEATURES_FILE)
        return frechet_score(features, quantize(data_images)), reference
    from evaluations.inception import create_inception
    from evaluations.inception_file import locate_inception_graph

    path, digest = locate_inception_graph(args.inception_path or None)
    inception = create_inception(args.backend, path, device=args.device or None)
    reference = {"ref_batch_sha256": sha256_file(args.ref_batch), "inception_sha256": digest, "backend": args.backend}
    return evaluator_score(args.metric, inception, args.ref_batch, args.batch_size), reference


def search_main():
    """scripts/search_eps_scale.py: search, print the best schedules, write search.json and search.png."""
    args, _, _ = parse_args_with_config(search_argparser())
    check_search_args(args)
    dims = FEATURE_DIMS.get(args.metric)
    if dims and args.num_samples <= dims:  # said once here, not at every evaluation
        print(f"note: {args.num_samples} samples for {dims} features: covariances are singular and the Frechet "
              "distance adds 1e-6 to their diagonals (as ADM's evaluator); compare values within this search only")
        warnings.filterwarnings("ignore", message="the covariance product is singular")
    seeds = parse_numbers(args.seeds, "seeds", int)
    b_range = parse_numbers(args.b_range, "b_range", count=2)
    folder = sampling.own_output_folder(args.output_dir, "eps_scale_search")
    data_images = data_labels = None
    if args.data_dir:
        data_images, data_labels = load_images(args.data_dir, args.image_size, args.num_images, seed=0,
                                               with_labels=args.class_cond)
    model, diffusion, weights = sampling.load_adm_model(args)
    num_steps = diffusion.num_timesteps
    k_range = parse_numbers(args.k_range, "k_range", count=2) if args.k_range else default_k_range(num_steps)
    score, reference = search_score(args, data_images)
    metric = sampling_metric(model, diffusion, score, num_samples=args.num_samples, batch_size=args.batch_size,
                             image_size=args.image_size, use_ddim=args.use_ddim, clip_denoised=args.clip_denoised,
                             num_classes=args.num_classes if args.class_cond else None, progress=args.progress)
    context = {
        "model_sha256": weights.sha256, "flags": {k: getattr(args, k) for k in model_and_diffusion_defaults()},
        "metric": args.metric, "reference": reference, "num_samples": args.num_samples,
        "use_ddim": args.use_ddim, "clip_denoised": args.clip_denoised,
    }
    cache = EvaluationCache(args.cache or folder / "search_cache.json", context)
    search = LambdaSearch(metric, seeds, cache=cache, minimize=EVALUATOR_METRICS.get(args.metric, True),
                          num_steps=num_steps, progress=args.progress)
    print(f"{len(cache)} cached evaluations in {cache.path}")

    results = []
    if args.family in ("uniform", "both"):
        results.append(search.search_uniform(b_range, args.grid, args.rounds))
    if args.family in ("linear", "both"):
        results.append(search.search_linear(k_range, b_range, args.grid, args.rounds))
    optimum = min(results, key=lambda r: r.best.mean if search.minimize else -r.best.mean).best

    compared = {"baseline": EpsScale()}
    calibration = None
    if args.calibrate and data_images is not None:
        calibration = calibrate_eps_scale(diffusion, model, data_images, labels=data_labels, seed=0,
                                          batch_size=args.batch_size, clip_denoised=args.clip_denoised,
                                          use_ddim=args.use_ddim, progress=args.progress)
        compared.update({"calibrated table": calibration.table, "calibrated uniform": calibration.uniform,
                         "calibrated linear": calibration.linear})
    elif args.calibrate:
        print("no --data_dir: calibration skipped")
    comparison = compare_schedules(search, compared, optimum)

    spread = f"over {len(seeds)} seeds" if len(seeds) > 1 else "one seed"
    for result in results:
        best = result.best
        print(f"best {result.family}: --eps_scale {best.schedule}   {args.metric} {best.mean:.4f} ± {best.std:.4f} ({spread})")
    for row in comparison:
        print(f"{row['name']:<20} {args.metric} {row['mean']:.4f} ± {row['std']:.4f}, "
              f"{row['gap_to_optimum']:+.4f} from the optimum  (--eps_scale {row['eps_scale'][:60]})")
    print(f"{search.calls} new evaluations; {len(cache)} in the cache")

    record = {
        "settings": dict(vars(args), model_sha256=weights.sha256, num_steps=num_steps, k_range=list(k_range), seeds=seeds),
        "metric": args.metric, "minimize": search.minimize,
        "best": {r.family: str(r.best.schedule) for r in results}, "optimum": optimum.to_dict(),
        "searches": [r.to_dict() for r in results], "comparison": comparison,
        "calibration": calibration.to_dict() if calibration else None,
    }
    write_json(json.loads(json.dumps(record, default=str)), folder / "search.json")
    marks = {k: v for k, v in compared.items() if k in ("calibrated uniform", "calibrated linear")}
    write_search_plot(results, folder / "search.png", args.metric, len(seeds), marks)
    print(f"wrote {folder / 'search.json'} and {folder / 'search.png'}")
