"""Side by side: baseline, Epsilon Scaling, Time-Shift and both, on one model, with paired seeds.

    python scripts/compare_fixes.py --config digits_uncond --steps 10,20 --seeds 0,1,2 \\
        --eps_scale 0.9275 --window 2 --cutoff 200 --num_samples 400 --output_dir results/fixes
A checkpoint instead of a shipped digits model: --model_path M.pt with its model flags (or --config),
--metric fid --ref_batch REF.npz (or --metric pixel_fd), and --data_dir for the delta_t chains.
The default --window 2 --cutoff 200 is what --pilot_windows 2,4,8 chose for digits_uncond on seed 100
(results/fixes/results.json, time_shift_choice); --pilot_windows W1,W2,... chooses afresh.
Writes results.md (the table), results.json and results.png to --output_dir; flags are checked
before anything is written; one run at a time per --output_dir.
"""

import argparse
import sys

from adm_common.cli import cli_main
from guided_diffusion.analysis.side_by_side import compare_from_flags
from guided_diffusion.run.configs import parse_args_with_config
from guided_diffusion.script_util import add_dict_to_argparser, model_and_diffusion_defaults


def argparser():
    defaults = dict(
        config="digits_uncond", model_path="", steps="10,20", seeds="0,1,2", window=2, cutoff=200,
        time_shift_rule="paper", pilot_windows="", use_ddim=False, clip_denoised=True, num_samples=400,
        batch_size=400, num_chains=256, output_dir="results/fixes", threads=1,
        metric="fid", ref_batch="", data_dir="", backend="tf", inception_path="", device="",
    )
    defaults.update({k: v for k, v in model_and_diffusion_defaults().items() if k not in defaults})
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    parser.add_argument("--eps_scale", default=None,
                        help="the ES lambda (1.017, linear:k=...,b=...); default for the digits models: the digits "
                        "demo's searched lambda (results/digits/results.json)")
    return parser


def main():
    args, _, _ = parse_args_with_config(argparser())
    compare_from_flags(args, progress=sys.stderr.isatty())


if __name__ == "__main__":
    cli_main(main)
