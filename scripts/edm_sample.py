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

from guided_diffusion import dist_util, logger
from guided_diffusion.run import pipeline as sampling
from guided_diffusion.edm.generate import (
    OUTPUT_FORMATS,
    QUANTIZATIONS,
    SeedListRun,
    parse_seeds,
    quantizer,
    sample_seeds,
    seed_batches,
    write_png_folder,
)
from guided_diffusion.edm.pickles import load_edm_network
from adm_common.files import sha256_file
from guided_diffusion.edm.samplers import (
    DISCRETIZATIONS,
    SOLVERS,
    ADMDenoiser,
    BoundDenoiser,
    karras_sample,
    network_evaluations,
    sampling_sigmas,
)
from guided_diffusion.image_noise import STREAM_EXTRA, ImageNoise, image_labels
from guided_diffusion.run.batching import AlignedNetwork
from guided_diffusion.run.output import run_sampling
from adm_common.errors import UsageError
from adm_common.cli import cli_main
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    add_sampling_args,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    parse_args_with_config,
    str2bool,
)


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


def load_denoiser(args):
    """(denoiser, image shape C x H x W, number of classes or 0, sidecar facts about the network)."""
    if bool(args.network) == bool(args.model_path):
        raise UsageError("give exactly one of --network (an EDM .pkl or converted .safetensors) and --model_path (ADM)")
    if args.network:
        net, config = load_edm_network(args.network, args.network_key)
        net.to(dist_util.dev()).eval()
        shape = (net.img_channels, net.img_resolution, net.img_resolution)
        facts = dict(network=args.network, network_sha256=sha256_file(args.network), network_config=config,
                     network_sigma_min=float(net.sigma_min), network_sigma_max=float(net.sigma_max))
        fast = sampling.sampling_network(net, args)
        denoiser = BoundDenoiser(lambda x, sigma, labels: fast(x, sigma, class_labels=labels), net)
        return denoiser, shape, net.label_dim, facts
    if args.timestep_respacing:
        logger.log(f"ignoring --timestep_respacing {args.timestep_respacing}: the noise levels come from --num_steps")
        args.timestep_respacing = ""
    model, diffusion, sha = sampling.load_network(
        create_model_and_diffusion, args, model_and_diffusion_defaults().keys(), args.model_path, "model",
        args.image_size,
    )
    shape = (3, args.image_size, args.image_size)
    num_classes = args.num_classes if args.class_cond else 0
    facts = dict(model_path=args.model_path, model_sha256=sha)
    return ADMDenoiser.from_diffusion(sampling.sampling_network(model, args), diffusion), shape, num_classes, facts


def check_mode_flags(args, explicit):
    """Decide the EDM-seed flags once: the seed list (or None), quantization and output format."""
    seeds = parse_seeds(args.seeds) if args.seeds else None
    if seeds is not None:
        typed = sorted({"seed", "num_samples", "network_batch_size"} & explicit)
        if typed:
            raise UsageError(f"--seeds decides the images; drop --{typed[0]} (EDM's mode has no such flag)")
    elif args.output_format == "png" or args.subdirs:
        raise UsageError("EDM's PNG folder (--output_format png, --subdirs) needs --seeds; "
                         "scripts/npz_to_png.py writes the images of an NPZ as PNG files")
    if args.quantization is None:
        args.quantization = "edm" if seeds is not None else "adm"
    if args.output_format is None:
        args.output_format = "png" if seeds is not None else "npz"
    if args.subdirs and args.output_format != "png":
        raise UsageError("--subdirs arranges PNG files; it does nothing with --output_format npz")
    return seeds


def main():
    args, config, explicit = parse_args_with_config(create_argparser())
    seeds = check_mode_flags(args, explicit)
    if seeds is not None:
        args.num_samples = len(seeds)  # for the checks and the sidecar; the seeds decide
    sampling.start(args)
    denoiser, shape, num_classes, facts = load_denoiser(args)
    if args.class_idx is not None and not 0 <= args.class_idx < num_classes:
        has = f"classes 0..{num_classes - 1}" if num_classes else "no class labels"
        raise UsageError(f"--class {args.class_idx}: the network has {has}")
    # EDM's published lambdas are per solver and step count
    schedule, source = sampling.eps_schedule(args, config, args.num_steps, table=args.solver)
    sampler_kwargs = dict(
        num_steps=args.num_steps, solver=args.solver, discretization=args.discretization,
        sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho, S_churn=args.S_churn,
        S_min=args.S_min, S_max=args.S_max, S_noise=args.S_noise, eps_scale=schedule,
    )
    sigmas = sampling_sigmas(denoiser, args.num_steps, args.discretization, args.sigma_min, args.sigma_max, args.rho)
    device = dist_util.dev()
    quantize = quantizer(args.quantization)
    # EDM quantizes its float64 sample; ADM's path keeps the float32 images it always had
    precision = (lambda images: images) if args.quantization == "edm" else (lambda images: images.float())

    identity = {k: v for k, v in facts.items() if k.endswith("sha256")}
    settings = sampling.run_settings(args, eps_scale=str(schedule), **identity)
    sidecar = dict(
        settings, **facts, sampler="karras", eps_scale_source=source,
        eps_scale_values=schedule.values(args.num_steps),
        network_evaluations=network_evaluations(args.solver, args.num_steps),
        sigmas=[float(s) for s in sigmas], config=config["path"] if config else None,
        quantization=args.quantization,
        randomness=("EDM's generate.py: a torch.Generator per seed on " + device.type) if seeds is not None
        else "per image: image_noise.ImageNoise(seed, index)",
    )
    image_shape = (shape[1], shape[2], shape[0])

    if seeds is None:
        def sample_batch(indices):
            labels = image_labels(args.seed, indices, num_classes, device=device) if num_classes else None
            if labels is not None and args.class_idx is not None:
                labels = labels.new_full(labels.shape, args.class_idx)
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
            return precision(images), labels

        sampling.sample_to_npz(args, settings, sample_batch, image_shape, bool(num_classes), sidecar,
                               quantize=quantize)
        return

    # EDM's generate.py: the network sees each of EDM's batches whole
    def sample_seed_list(batch_seeds):
        images, labels = sample_seeds(denoiser, batch_seeds, shape, num_classes, args.class_idx, device,
                                      **sampler_kwargs)
        return precision(images), labels

    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    if args.output_format == "png":
        batches = seed_batches(len(seeds), args.batch_size, world)
        path = write_png_folder(args.output_dir, seeds, batches, sample_seed_list, quantize, args.subdirs,
                                settings, sidecar, rank=rank, world_size=world, progress=args.progress)
        if path is not None:
            logger.log(f"saved {len(seeds)} PNG files in {args.output_dir} ({path.name} holds the settings)")
        return
    run = SeedListRun(args.output_dir, settings, seeds, args.batch_size, image_shape, bool(num_classes),
                      rank=rank, world_size=world, keep_shards=args.keep_shards)
    path = run_sampling(run, lambda indices: sample_seed_list([seeds[i] for i in indices]), sidecar,
                        progress=args.progress, quantize=quantize)
    if path is not None:
        logger.log(f"saved {path}")


if __name__ == "__main__":
    cli_main(main)
