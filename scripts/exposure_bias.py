"""Measure exposure bias per sampling step (delta_t, noise-prediction norms) with and without Epsilon Scaling.

N data images are forward-noised to the first sampling step and sampled from there, once with
lambda = 1 and once with --eps_scale (default: the config's published lambda for this step count),
and with --calibrate True once more with lambda calibrated step by step from the norms.
Example:
    python scripts/exposure_bias.py --config cifar10_uncond_admes --model_path cifar10_uncond.pt \
        --data_dir cifar_train --num_images 500 --timestep_respacing 20 --eps_scale 1.017
Writes exposure_bias.csv (one row per run and step), exposure_bias.json (settings, summaries,
every step) and exposure_bias.png to --output_dir; see guided_diffusion/analysis/exposure_bias.py for the
columns.
"""

from adm_common.cli import cli_main
from guided_diffusion.analysis.commands import exposure_bias_main

if __name__ == "__main__":
    cli_main(exposure_bias_main)
