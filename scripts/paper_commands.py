"""Print the shell commands for one cell of the ES paper's ADM table (used by paper_cell.sh).

usage: python scripts/paper_commands.py CONFIG STEPS {base,es,es-linear} [--num_gpus N] [--work_dir DIR]
           [--num_samples N] [--batch_size N] [--seed_sets N]
Each command is one line of shell, every path quoted; guided_diffusion/run/paper_cells.py writes them.
"""

from guided_diffusion.run.paper_cells import main
from adm_common.cli import cli_main

if __name__ == "__main__":
    cli_main(main)
