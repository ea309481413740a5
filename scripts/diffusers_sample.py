"""Sample an unconditional diffusers pipeline with Epsilon Scaling into ADM's NPZ.

The model is a folder written by save_pretrained or a model id (DDPMPipeline, DDIMPipeline,
LDMPipeline). Seeds, sharding, resume, the NPZ and its JSON sidecar are those of image_sample.py,
so the evaluator scores the output the same way. Needs: pip install 'guided-diffusion-es[diffusers]'.
Pairings: DDPMPipeline drives --scheduler ddpm, ddim or dpmsolver; DDIMPipeline ddim; LDMPipeline all
five; the others are refused in one line (diffusers_es.check_pairing says why).
Example:
    python scripts/diffusers_sample.py --model google/ddpm-cifar10-32 --scheduler ddpm --steps 100 \
        --eps_scale 1.017 --num_samples 50000 --batch_size 256 --output_dir samples/ddpm_es
"""

import argparse

from adm_common.cli import cli_main
from adm_common.errors import UsageError
from guided_diffusion import dist_util, logger
from guided_diffusion.bridges import diffusers_es
from guided_diffusion.run import pipeline as sampling
from guided_diffusion.run.configs import parse_args_with_config
from guided_diffusion.run.eps_choice import choose_eps_scale
from guided_diffusion.script_util import add_dict_to_argparser, add_sampling_args


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="diffusers pipeline folder or model id")
    parser.add_argument(
        "--scheduler", default="pipeline",
        choices=["pipeline", *diffusers_es.SCHEDULER_FLAGS],
        help="sampler; 'pipeline' keeps the pipeline's own, the others are built from its config",
    )
    add_dict_to_argparser(parser, dict(steps=100, eta=0.0, num_samples=10000, batch_size=16))
    add_sampling_args(parser)
    return parser


def main():
    args, config, _ = parse_args_with_config(create_argparser())
    try:
        diffusers = diffusers_es.require_diffusers()
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    sampling.refuse_time_shift(args, "diffusers schedulers")
    eps = choose_eps_scale(args, config, args.steps)
    pipe = diffusers_es.load_pipeline(args.model)
    scheduler = diffusers_es.use_scheduler(pipe, args.scheduler)
    diffusers_es.check_pairing(pipe, args.steps, args.eta)  # before anything is written
    diffusers_es.apply_eps_scaling(pipe, eps.schedule)

    sampling.start(args)
    logger.log(f"{type(pipe).__name__} with {type(scheduler).__name__}, {args.steps} steps, "
               f"epsilon scaling: {eps.schedule} [{eps.source}]")
    weights = sampling.InputFile("model", args.model, diffusers_es.pipeline_weights_sha256(pipe), "model")
    pipe.to(dist_util.dev())
    unet_network = sampling.sampling_network(diffusers_es.UNetNetwork(pipe.unet), args)

    def sample_batch(indices):
        images = diffusers_es.sample_images(pipe, args.seed, indices, args.steps, args.network_batch_size,
                                            unet_network, eta=args.eta)
        return images, None

    scheduler_config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    identity = dict(pipeline=type(pipe).__name__, scheduler_class=type(scheduler).__name__,
                    scheduler_config=scheduler_config)
    job = sampling.SamplingJob(sample_batch, diffusers_es.image_shape(pipe), False, eps, [weights], identity=identity,
                               facts=dict(diffusers_version=diffusers.__version__))
    sampling.run_sampling_job(args, config, job)


if __name__ == "__main__":
    cli_main(main)
