"""Why does my FID differ from the paper's? Compare the settings that made a sample file with the
protocol of the paper's cell, one row per setting that moves FID.

usage: python scripts/check_reproduction.py SAMPLES.npz [MORE.npz ...] [--config NAME] [--eval EVAL.json]
           [--cell KEY] [--json OUT.json]
Exit status 0 when every compared setting matches, 1 when one differs or is missing from the
sidecar, 2 for a user error. guided_diffusion/run/reproduction.py does the work.
"""

import sys

from adm_common.cli import cli_main
from guided_diffusion.run.reproduction import main

if __name__ == "__main__":
    cli_main(lambda: sys.exit(main()))
