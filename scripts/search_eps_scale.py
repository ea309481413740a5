"""Search the Epsilon Scaling lambda (uniform b and linear k, b) that optimises a sample metric.

Coarse-to-fine grids over b (and k), each schedule scored on --num_samples samples for every seed
in --seeds; every value is kept in --cache, so an interrupted search resumes where it stopped.
With --calibrate True (and --data_dir) lambda is also calibrated without any metric network
(matching noise-prediction norms to forward-noised data) and scored against the search's optimum.
Metrics: fid, sfid, inception_score, precision, recall (ADM's evaluator, against --ref_batch);
digit_fd (a Frechet distance on the shipped digit-classifier features, against --data_dir digits);
pixel_fd (a Frechet distance on 8x8 grey pixels against --data_dir: for quick checks).
Example:
    python scripts/search_eps_scale.py --config cifar10_uncond_admes --model_path cifar10_uncond.pt \
        --timestep_respacing 20 --metric fid --ref_batch cifar10_train_ref.npz --num_samples 5000 \
        --seeds 0,1,2 --data_dir cifar_train --output_dir search_cifar20
Prints the best schedules as --eps_scale values; writes search.json and search.png to --output_dir.
"""

from adm_common.cli import cli_main
from guided_diffusion.analysis.commands import search_main

if __name__ == "__main__":
    cli_main(search_main)
