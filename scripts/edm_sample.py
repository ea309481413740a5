"""Sample with EDM's Heun or Euler sampler and Epsilon Scaling, into ADM's NPZ or EDM's PNG folder.

The network is one of EDM's released pickles (--network, read without running its code; or a
file written by scripts/convert_edm_pkl.py), or an ADM checkpoint (--model_path plus ADM's
model flags or --config).

Two ways to draw the randomness:
- default: this project's per-image seeds (--seed, --num_samples): image i depends on (seed, i)
  alone; sharded, resumable ADM NPZ; quantized as ADM's scripts do (floor of (x + 1) * 127.5).
- --seeds LIST (EDM's generate.py, e.g. --seeds 0-49999): each seed's latent, class label and
  per-step noise drawn as EDM draws them, in EDM's batches (--batch), rounded as EDM rounds
  (x * 127.5 + 128, truncated), written as EDM's folder of {seed:06d}.png (--subdirs, --class as
  in EDM) or, with --output_format npz, as ADM's NPZ: the same seeds give EDM's images.
ADM floors and EDM rounds: about half the pixels differ by one level; --quantization picks.
Examples:
    python scripts/edm_sample.py --config edm_cifar10_32x32_cond_vp \\
        --network edm-cifar10-32x32-cond-vp.pkl --solver heun --num_steps 18 --eps_scale paper
    python scripts/edm_sample.py --network edm-cifar10-32x32-cond-vp.pkl --outdir out \\
        --seeds 0-49999 --batch 64 --steps 18 --eps_scaler 1.0006
    python scripts/edm_sample.py --config imagenet64_cond --model_path 64x64_diffusion.pt \\
        --solver heun --num_steps 18 --num_samples 50000 --batch_size 256 --eps_scale 1.0
"""

import argparse

from adm_common.cli import cli_main
from adm_common.errors import UsageError
from guided_diffusion import dist_util
from guided_diffusion.edm.generate import (
    OUTPUT_FORMATS,
    QUANTIZATIONS,
    decide_seed_mode,
    quantizer,
    sample_cast,
    sample_seeds,
    write_seed_images,
)
from guided_diffusion.edm.samplers import DISCRETIZATIONS, SOLVERS, network_evaluations, sampling_sigmas
from guided_diffusion.run import pipeline as sampling
from guided_diffusion.run.configs import parse_args_with_config
from guided_diffusion.script_util import add_dict_to_argparser, add_sampling_args, model_and_diffusion_defaults, str2bool


def create_argparser():
    defaults = dict(network="", network_key="ema", model_path="", num_samples=10000,
                    rho=7.0, S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0)
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dict_to_argparser(parser, defaults)
    parser.add_argument("--num_steps", "--steps", dest="num_steps", type=int, default=18,
                        help="noise levels N (Heun: 2N - 1 network evaluations); --steps is EDM's name")
    parser.add_argument("--batch_size", "--batch", dest="batch_size", type=int, default=64,
                        help="images per batch; with --seeds the largest batch, as EDM's --batch")
    parser.add_argument("--solver", default="heun", choices=SOLVERS)
    parser.add_argument("--discretization", "--disc", dest="discretization", default="edm", choices=DISCRETIZATIONS)
    parser.add_argument("--sigma_min", type=float, default=None, help="lowest noise level (default 0.002)")
    parser.add_argument("--sigma_max", type=float, default=None, help="highest noise level (default 80; 81 for iddpm)")
    parser.add_argument(
        "--seeds", default="",
        help="EDM's generate.py mode: the seeds of the images, e.g. 0-49999 or 1,2,5-10 (replaces --seed "
        "and --num_samples); latents, labels and per-step noise drawn per seed as EDM draws them",
    )
    parser.add_argument("--subdirs", type=str2bool, nargs="?", const=True, default=False,
                        help="with --seeds and PNG output: a subfolder for every 1000 seeds, as EDM's --subdirs")
    parser.add_argument("--class", dest="class_idx", type=int, default=None,
                        help="one class label for every image (EDM's --class); default: random per image")
    parser.add_argument(
        "--quantization", choices=QUANTIZATIONS, default=None,
        help="how samples in [-1, 1] become uint8: adm = floor((x + 1) * 127.5), as ADM's scripts; "
        "edm = x * 127.5 + 128 truncated (round half up), as EDM's generate.py. About half the pixels "
        "differ by one level. Default: edm with --seeds, adm without; the sidecar records it",
    )
    parser.add_argument(
        "--output_format", choices=OUTPUT_FORMATS, default=None,
        help="npz = ADM's NPZ plus JSON sidecar; png = EDM's folder of {seed:06d}.png plus "
        "edm_sample.json (only with --seeds). Default: png with --seeds, npz without",
    )
    add_sampling_args(parser)
    parser.add_argument("--outdir", dest="output_dir", default=argparse.SUPPRESS,
                        help="EDM's name for --output_dir")
    return parser


def main():
    args, config, explicit = parse_args_with_config(create_argparser())
    seeds = decide_seed_mode(args, explicit)
    if seeds is not None:
        args.num_samples = len(seeds)  # for the checks and the sidecar; the seeds decide
    sampling.refuse_time_shift(args, "EDM's samplers")
    sampling.start(args)
    denoiser, shape, num_classes, weights, facts = sampling.load_karras_denoiser(args)
    if args.class_idx is not None and not 0 <= args.class_idx < num_classes:
        has = f"classes 0..{num_classes - 1}" if num_classes else "no class labels"
        raise UsageError(f"--class {args.class_idx}: the network has {has}")
    # EDM's published lambdas are per solver and step count
    eps = sampling.decide_eps_scale(args, config, args.num_steps, table=args.solver)
    sampler_kwargs = dict(
        num_steps=args.num_steps, solver=args.solver, discretization=args.discretization,
        sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho, S_churn=args.S_churn,
        S_min=args.S_min, S_max=args.S_max, S_noise=args.S_noise, eps_scale=eps.schedule,
    )
    sigmas = sampling_sigmas(denoiser, args.num_steps, args.discretization, args.sigma_min, args.sigma_max, args.rho)
    device = dist_util.dev()
    cast = sample_cast(args.quantization)
    facts.update(
        sampler="karras", network_evaluations=network_evaluations(args.solver, args.num_steps),
        sigmas=[float(s) for s in sigmas], quantization=args.quantization,
        randomness=("EDM's generate.py: a torch.Generator per seed on " + device.type) if seeds is not None
        else "per image: image_noise.ImageNoise(seed, index)",
    )
    job = sampling.SamplingJob(None, (shape[1], shape[2], shape[0]), bool(num_classes), eps, [weights], facts=facts,
                               quantize=quantizer(args.quantization))
    if seeds is None:
        job.sample_batch = sampling.karras_batch_sampler(denoiser, args, shape, num_classes, sampler_kwargs, cast)
        sampling.run_sampling_job(args, config, job)
        return

    def sample_seed_list(batch_seeds):  # EDM's generate.py: the network sees each of EDM's batches whole
        images, labels = sample_seeds(denoiser, batch_seeds, shape, num_classes, args.class_idx, device,
                                      **sampler_kwargs)
        return cast(images), labels

    settings, sidecar = job.record(args, config)
    write_seed_images(args, seeds, sample_seed_list, settings, sidecar, job.image_shape, job.class_cond, job.quantize)


if __name__ == "__main__":
    cli_main(main)
