"""Sample with EDM's Heun or Euler sampler and Epsilon Scaling, into ADM's NPZ format.

The network is one of EDM's released pickles (--network, read without running its code; or a
file written by scripts/convert_edm_pkl.py), or an ADM checkpoint (--model_path plus ADM's
model flags or --config). Seeds, sharding, resume and the sidecar work as in image_sample.py.
Examples:
    python scripts/edm_sample.py --config edm_cifar10_32x32_cond_vp \
        --network edm-cifar10-32x32-cond-vp.pkl --solver heun --num_steps 18 --eps_scale paper
    python scripts/edm_sample.py --config imagenet64_cond --model_path 64x64_diffusion.pt \
        --solver heun --num_steps 18 --num_samples 50000 --batch_size 256 --eps_scale 1.0
"""

import argparse

from guided_diffusion import dist_util, logger, sampling
from guided_diffusion.edm_pickle import load_edm_network
from guided_diffusion.file_util import sha256_file
from guided_diffusion.karras import (
    DISCRETIZATIONS,
    SOLVERS,
    ADMDenoiser,
    karras_sample,
    network_evaluations,
    sampling_sigmas,
)
from guided_diffusion.sample_io import STREAM_EXTRA, AlignedNetwork, ImageNoise, image_labels
from guided_diffusion.script_util import (
    UsageError,
    add_dict_to_argparser,
    add_sampling_args,
    cli_main,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    parse_args_with_config,
)


def create_argparser():
    defaults = dict(network="", network_key="ema", model_path="", num_samples=10000, batch_size=64,
                    num_steps=18, rho=7.0, S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0)
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    parser.add_argument("--solver", default="heun", choices=SOLVERS)
    parser.add_argument("--discretization", default="edm", choices=DISCRETIZATIONS)
    parser.add_argument("--sigma_min", type=float, default=None, help="lowest noise level (default 0.002)")
    parser.add_argument("--sigma_max", type=float, default=None, help="highest noise level (default 80; 81 for iddpm)")
    add_sampling_args(parser)
    return parser


def load_denoiser(args):
    """(denoiser, image shape C x H x W, number of classes or 0, sidecar facts about the network)."""
    if bool(args.network) == bool(args.model_path):
        raise UsageError("give exactly one of --network (an EDM .pkl or converted .safetensors) and --model_path (ADM)")
    if args.network:
        net, config = load_edm_network(args.network, args.network_key)
        net.to(dist_util.dev()).eval()
        shape = (net.img_channels, net.img_resolution, net.img_resolution)
        facts = dict(network=args.network, network_sha256=sha256_file(args.network), network_config=config)
        return sampling.sampling_network(net, args), shape, net.label_dim, facts
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


def main():
    args, config, _ = parse_args_with_config(create_argparser())
    sampling.start(args)
    denoiser, shape, num_classes, facts = load_denoiser(args)
    # EDM's published lambdas are per solver and step count
    schedule, source = sampling.eps_schedule(args, config, args.num_steps, table=args.solver)
    sampler_kwargs = dict(
        num_steps=args.num_steps, solver=args.solver, discretization=args.discretization,
        sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho, S_churn=args.S_churn,
        S_min=args.S_min, S_max=args.S_max, S_noise=args.S_noise, eps_scale=schedule,
    )
    sigmas = sampling_sigmas(denoiser, args.num_steps, args.discretization, args.sigma_min, args.sigma_max, args.rho)
    device = dist_util.dev()

    def sample_batch(indices):
        labels = image_labels(args.seed, indices, num_classes, device=device) if num_classes else None
        aligned = AlignedNetwork(lambda x, sigma, labels=None: denoiser(x, sigma, class_labels=labels), indices,
                                 args.network_batch_size)
        images = karras_sample(
            lambda x, sigma, labels: aligned(x, sigma, labels=labels), (len(indices), *shape),
            class_labels=labels, device=device,
            generator=ImageNoise(args.seed, indices), churn_generator=ImageNoise(args.seed, indices, STREAM_EXTRA),
            **sampler_kwargs,
        )
        return images.float(), labels

    identity = {k: v for k, v in facts.items() if k.endswith("sha256")}
    settings = sampling.run_settings(args, eps_scale=str(schedule), **identity)
    sidecar = dict(
        settings, **facts, sampler="karras", eps_scale_source=source,
        eps_scale_values=schedule.values(args.num_steps),
        network_evaluations=network_evaluations(args.solver, args.num_steps),
        sigmas=[float(s) for s in sigmas], config=config["path"] if config else None,
    )
    image_shape = (shape[1], shape[2], shape[0])
    sampling.sample_to_npz(args, settings, sample_batch, image_shape, bool(num_classes), sidecar)


if __name__ == "__main__":
    cli_main(main)
