"""Make a reference batch (arr_0 images + mu, sigma, mu_s, sigma_s) for evaluations/evaluator.py.

    python scripts/make_reference_batch.py SOURCE OUT.npz --image_size 32 [--num_images 50000]

SOURCE is a folder of images, a .zip of images or an .npz batch. Images are resized as ADM's
training data are (evaluations/reference_batch.py, which holds this command line). OUT.npz
appears only when complete; a failure (a damaged image, a full disk) leaves nothing of it and ends
in one line, exit status 2.
"""

from adm_common.cli import cli_main
from evaluations.reference_batch import main

if __name__ == "__main__":
    cli_main(main)
