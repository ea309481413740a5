"""Convert one of EDM's released network pickles to safetensors plus a JSON config.

The pickle is read by a restricted unpickler that never runs the code EDM embeds in it.
Example:
    python scripts/convert_edm_pkl.py edm-cifar10-32x32-cond-vp.pkl
    (writes edm-cifar10-32x32-cond-vp.safetensors and edm-cifar10-32x32-cond-vp.json beside it)
"""

import argparse
from pathlib import Path

from guided_diffusion.edm.pickles import convert_edm_pickle
from adm_common.cli import cli_main


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pkl", help="EDM network pickle, e.g. edm-cifar10-32x32-cond-vp.pkl")
    parser.add_argument("--output", default="", help="output .safetensors (default: beside the pickle)")
    parser.add_argument("--key", default="ema", help="entry of the pickle that holds the network")
    return parser


def main():
    args = create_argparser().parse_args()
    output = Path(args.output) if args.output else Path(args.pkl).with_suffix(".safetensors")
    written = convert_edm_pickle(args.pkl, output, key=args.key)
    print(f"wrote {written} and {written.with_suffix('.json')}")


if __name__ == "__main__":
    cli_main(main)
