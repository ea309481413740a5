"""Print the shell commands for one cell of the ES paper's ADM table (used by paper_cell.sh).

usage: python scripts/paper_commands.py CONFIG STEPS {base,es,es-linear} [--num_gpus N] [--work_dir DIR]
"""

import argparse

from guided_diffusion.paper_cells import VARIANTS, cell_commands
from guided_diffusion.script_util import cli_main


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("steps", type=int)
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--num_gpus", type=int, default=1)
    parser.add_argument("--work_dir", default="runs")
    parser.add_argument("--num_samples", type=int, default=50000)
    parser.add_argument("--batch_size", type=int, default=None)
    args = parser.parse_args()
    for command in cell_commands(args.config, args.steps, args.variant, args.num_gpus, args.work_dir,
                                 args.num_samples, args.batch_size):
        print(command)


if __name__ == "__main__":
    cli_main(main)
