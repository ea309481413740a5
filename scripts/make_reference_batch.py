"""Make a reference batch (arr_0 images + mu, sigma, mu_s, sigma_s) for evaluations/evaluator.py.

    python scripts/make_reference_batch.py SOURCE OUT.npz --image_size 32 [--num_images 50000]

SOURCE is a folder of images, a .zip of images or an .npz batch. Images are resized as ADM's
training data are (evaluations/reference_batch.py). OUT.npz appears only when complete; a failure
(a damaged image, a full disk) leaves nothing of it and ends in one line, exit status 2.
"""

import argparse

from adm_common.devices import check_device
from evaluations.cli import add_inception_arguments, check_batch_size, open_inception
from evaluations.reference_batch import plan_reference_batch, write_reference_batch
from adm_common.cli import cli_main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="folder of images, .zip of images, or .npz batch")
    parser.add_argument("output", help="reference batch to write (.npz)")
    parser.add_argument("--image_size", type=int, required=True, help="side of the square images")
    parser.add_argument("--num_images", type=int, default=0, help="a random subset of this size (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random subset")
    add_inception_arguments(parser)
    args = parser.parse_args(argv)
    check_batch_size(args.batch_size)
    check_device(args.device)  # every flag, the source and the output are checked before Inception loads
    plan = plan_reference_batch(args.source, args.output, args.image_size, args.num_images, args.seed)
    model, graph_record = open_inception(args)
    try:
        summary = write_reference_batch(plan, model, args.batch_size)
    finally:
        model.close()
    print(
        f"wrote {summary['path']}: {summary['num_images']} images at {args.image_size}x{args.image_size}, "
        f"statistics from the {graph_record['backend']} backend (graph sha256 {graph_record['sha256']})"
    )


if __name__ == "__main__":
    cli_main(main)
