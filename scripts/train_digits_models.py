"""Retrain the shipped digits models (guided_diffusion/configs/digits_*.yaml) and the digit feature network.

    python scripts/train_digits_models.py                 # everything, about 30 CPU-minutes
    python scripts/train_digits_models.py --only digits_uncond --max_steps 200
Weights land in guided_diffusion/assets/ as float16 safetensors; logs and full checkpoints in --work_dir.
An interrupted retraining resumes when the same command is run again (each network from its newest
checkpoint set in --work_dir); a training script's error is one line naming the network.
"""

import argparse
from pathlib import Path

from guided_diffusion.digits.training import SHIPPED, shipped_sizes, train_features, train_network
from adm_common.cli import cli_main


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=[*SHIPPED, "features"], action="append")
    parser.add_argument("--work_dir", default="runs/digits_training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_steps", type=int, default=None, help="override the configs' step counts")
    args = parser.parse_args()
    chosen = args.only or [*SHIPPED, "features"]
    for name in chosen:
        if name == "features":
            print(f"digit feature network: held-out accuracy {train_features(args.seed):.3f}")
        else:
            print(f"{name}: wrote {train_network(name, Path(args.work_dir), args.seed, args.max_steps)}")
    for name, size in shipped_sizes().items():
        print(f"{name}: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    cli_main(main)
