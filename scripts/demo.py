"""The main job: Epsilon Scaling on the shipped digits models, end to end on a CPU in minutes.

    python scripts/demo.py                        # writes results/digits/{results.md,*.png,...}
    python scripts/demo.py --num_samples 100 --seeds 0,1 --steps 10 --cond_steps 10   # a quick look
Settings are checked before anything runs; an interrupted run resumes its lambda search from the
cache in --output_dir (the same command again); one run at a time per --output_dir.
"""

import argparse
import sys

import torch

from guided_diffusion.digits.demo import run_demo
from adm_common.errors import UsageError
from adm_common.cli import cli_main


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="results/digits")
    parser.add_argument("--num_samples", type=int, default=400, help="samples per (model, steps, lambda, seed)")
    parser.add_argument("--batch_size", type=int, default=400)
    parser.add_argument("--seeds", default="0,1,2", help="evaluation seeds (lambda is chosen on another)")
    parser.add_argument("--steps", default="10,20,50", help="step counts scored for the unconditional model")
    parser.add_argument("--cond_steps", default="10,20", help="step counts scored for the class-conditional model")
    parser.add_argument("--search_steps", type=int, default=20, help="step count at which lambda is searched")
    parser.add_argument("--guidance_scale", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; the tiny networks gain little from more, and lose much when cores are busy")
    args = parser.parse_args()
    torch.set_num_threads(max(1, args.threads))
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
        steps = tuple(int(s) for s in args.steps.split(","))
        cond_steps = tuple(int(s) for s in args.cond_steps.split(","))
    except ValueError:
        raise UsageError("--seeds, --steps and --cond_steps take comma-separated whole numbers, e.g. 0,1,2") from None
    run_demo(args.output_dir, args.num_samples, args.batch_size, seeds, steps, args.search_steps,
             args.guidance_scale, cond_steps=cond_steps, progress=sys.stderr.isatty())


if __name__ == "__main__":
    cli_main(main)
