"""Search the Epsilon Scaling lambda (uniform b and linear k, b) that optimises a sample metric.

Coarse-to-fine grids over b (and k), each schedule scored on --num_samples samples for every seed
in --seeds; every value is kept in --cache, so an interrupted search resumes where it stopped.
With --calibrate True (and --data_dir) lambda is also calibrated without any metric network
(matching noise-prediction norms to forward-noised data) and scored against the search's optimum.
Metrics: fid, sfid, inception_score, precision, recall (ADM's evaluator, against --ref_batch);
digit_fd (a Frechet distance on the shipped digit-classifier features, against --data_dir digits);
pixel_fd (a Frechet distance on 8x8 grey pixels against --data_dir: for quick checks).
Example:
    python scripts/search_eps_scale.py --config cifar10_uncond_admes --model_path cifar10_uncond.pt \
        --timestep_respacing 20 --metric fid --ref_batch cifar10_train_ref.npz --num_samples 5000 \
        --seeds 0,1,2 --data_dir cifar_train --output_dir search_cifar20
Prints the best schedules as --eps_scale values; writes search.json and search.png to --output_dir.
"""

import argparse
import functools
import json
import warnings
from pathlib import Path

from adm_common.devices import check_device
from guided_diffusion.run import pipeline as sampling
from guided_diffusion.eps_scaling import EpsScale
from guided_diffusion.analysis.exposure_bias import load_images, write_json
from adm_common.files import lock_output_folder, sha256_file
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
from guided_diffusion.run.output import quantize
from adm_common.errors import UsageError
from adm_common.cli import cli_main
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    output_folder,
    parse_args_with_config,
)

DATA_METRICS = ("digit_fd", "pixel_fd")  # Frechet distances against --data_dir
METRICS = (*DATA_METRICS, *EVALUATOR_METRICS)
FEATURE_DIMS = {"digit_fd": 64, "pixel_fd": 64, "fid": 2048, "sfid": 2023}  # pixel_fd: at most 64


def create_argparser():
    defaults = dict(
        metric="fid", ref_batch="", data_dir="", num_images=500, num_samples=1000, batch_size=64, seeds="0",
        family="both", b_range="0.98,1.03", k_range="", grid=5, rounds=3, cache="", calibrate=True,
        clip_denoised=True, use_ddim=False, model_path="", output_dir="", config="", progress=True,
        backend="tf", inception_path="", device="",
    )
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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


def check_args(args):
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


def make_score(args, data_images):
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


def main():
    args, _, _ = parse_args_with_config(create_argparser())
    check_args(args)
    dims = FEATURE_DIMS.get(args.metric)
    if dims and args.num_samples <= dims:  # said once here, not at every evaluation
        print(f"note: {args.num_samples} samples for {dims} features: covariances are singular and the Frechet "
              "distance adds 1e-6 to their diagonals (as ADM's evaluator); compare values within this search only")
        warnings.filterwarnings("ignore", message="the covariance product is singular")
    seeds = parse_numbers(args.seeds, "seeds", int)
    b_range = parse_numbers(args.b_range, "b_range", count=2)
    folder = output_folder(args.output_dir, "eps_scale_search")
    lock_output_folder(folder)  # one writer per folder; a second run is refused in one line
    data_images = data_labels = None
    if args.data_dir:
        data_images, data_labels = load_images(args.data_dir, args.image_size, args.num_images, seed=0,
                                               with_labels=args.class_cond)
    model, diffusion, sha = sampling.load_network(
        create_model_and_diffusion, args, model_and_diffusion_defaults().keys(), args.model_path, "model",
        args.image_size,
    )
    num_steps = diffusion.num_timesteps
    k_range = parse_numbers(args.k_range, "k_range", count=2) if args.k_range else default_k_range(num_steps)
    score, reference = make_score(args, data_images)
    metric = sampling_metric(model, diffusion, score, num_samples=args.num_samples, batch_size=args.batch_size,
                             image_size=args.image_size, use_ddim=args.use_ddim, clip_denoised=args.clip_denoised,
                             num_classes=args.num_classes if args.class_cond else None, progress=args.progress)
    context = {
        "model_sha256": sha, "flags": {k: getattr(args, k) for k in model_and_diffusion_defaults()},
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
        "settings": dict(vars(args), model_sha256=sha, num_steps=num_steps, k_range=list(k_range), seeds=seeds),
        "metric": args.metric, "minimize": search.minimize,
        "best": {r.family: str(r.best.schedule) for r in results}, "optimum": optimum.to_dict(),
        "searches": [r.to_dict() for r in results], "comparison": comparison,
        "calibration": calibration.to_dict() if calibration else None,
    }
    write_json(json.loads(json.dumps(record, default=str)), folder / "search.json")
    marks = {k: v for k, v in compared.items() if k in ("calibrated uniform", "calibrated linear")}
    write_search_plot(results, folder / "search.png", args.metric, len(seeds), marks)
    print(f"wrote {folder / 'search.json'} and {folder / 'search.png'}")


if __name__ == "__main__":
    cli_main(main)
