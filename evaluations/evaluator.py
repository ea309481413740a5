"""ADM's evaluator: Inception Score, FID, sFID, precision and recall of a sample batch.

    python evaluations/evaluator.py REF.npz SAMPLE.npz [--backend tf|torch] [--json OUT.json]
                                    [--distance_dtype float16|float32]

REF.npz is one of ADM's reference batches (arr_0 images; mu, sigma, mu_s, sigma_s statistics
which are used when present) or one made by scripts/make_reference_batch.py; SAMPLE.npz holds
arr_0 uint8 [N, H, W, 3]. Prints ADM's result lines, then a table; writes every number, the image
counts and the files' sha256 to a JSON file (default: SAMPLE.eval.json beside the samples).
Every number is ADM's, with either backend: precision and recall use ADM's float16 distances
unless --distance_dtype float32 asks for exact ones (see evaluations/manifold.py).

Everything a user can get wrong is found before Inception runs: the flags, the JSON's folder,
both batch files read whole (damaged, truncated, not uint8 NHWC, fewer than 4 images, images of
different sizes), the graph file. A failure is one ``error:`` line and exit status 2, and leaves
no JSON file, whole or partial (progress bars are shown on a terminal only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from evaluations.activations import BatchActivations, compute_activations
from adm_common.devices import check_device
from evaluations.cli import add_inception_arguments, check_batch_size, open_inception
from evaluations.feature_statistics import class_probabilities, inception_score
from evaluations.files import check_output_file
from evaluations.inception import InceptionFeatures
from evaluations.manifold import DISTANCE_DTYPES, NEIGHBOURHOOD_SIZE, precision_recall
from evaluations.npz_stream import NpzImages, read_stored_statistics, scan_batch_file
from evaluations.report import format_table, write_json
from adm_common.cli import cli_main


def read_batch(
    path, model: InceptionFeatures, batch_size: int, desc: str, sha256: str | None = None
) -> tuple[BatchActivations, dict]:
    """Activations of a batch file's images; its stored statistics replace computed ones (as ADM).

    ``sha256`` is the file's, when ``check_batch`` has already computed it (and checked the file).
    """
    if sha256 is None:
        sha256 = scan_batch_file(path)
    with NpzImages(path) as images:
        stored = read_stored_statistics(path)
        activations = compute_activations(
            images.batches(batch_size), model, len(images), with_statistics=stored is None, desc=desc
        )
        info = {
            "path": str(path),
            "sha256": sha256,
            "num_images": len(images),
            "image_size": list(images.shape[1:3]),
            "statistics": "file" if stored else "computed",
        }
    if stored:
        activations.pool_statistics, activations.spatial_statistics = stored
    return activations, info


def check_batch(path) -> dict:
    """Everything about a batch file that can be wrong, found before Inception runs on it.

    Reads the whole file once (its sha256, and every member's CRC-32); returns its image shape and
    sha256.
    """
    with NpzImages(path) as images:
        count, shape = len(images), images.shape
    if count <= NEIGHBOURHOOD_SIZE:
        raise ValueError(
            f"{path} holds {count} image{'s' if count != 1 else ''}; precision and recall compare each image "
            f"with its {NEIGHBOURHOOD_SIZE} nearest neighbours, so a batch needs at least {NEIGHBOURHOOD_SIZE + 1}"
        )
    sha256 = scan_batch_file(path)
    read_stored_statistics(path)
    return {"shape": tuple(shape), "sha256": sha256}


def evaluate(
    reference_path,
    sample_path,
    model: InceptionFeatures,
    batch_size: int = 64,
    device="cpu",
    distance_dtype: str = "float16",
    digests: dict | None = None,
) -> dict:
    """Every metric of the sample batch against the reference batch, printed as ADM prints them.

    ``distance_dtype`` is that of precision and recall's distances: "float16" is ADM's. ``digests``
    maps a path (as given) to its sha256 when ``check_batch`` has computed it.
    """
    digests = digests or {}
    print("computing reference batch activations...")
    reference, reference_info = read_batch(
        reference_path, model, batch_size, "reference", digests.get(str(reference_path))
    )
    print("computing sample batch activations...")
    sample, sample_info = read_batch(sample_path, model, batch_size, "samples", digests.get(str(sample_path)))
    metrics = compute_metrics(reference, sample, model.softmax_weights, device, distance_dtype)
    return {"metrics": metrics, "reference": reference_info, "sample": sample_info}


def compute_metrics(
    reference: BatchActivations,
    sample: BatchActivations,
    softmax_weights,
    device="cpu",
    distance_dtype: str = "float16",
) -> dict:
    """ADM's five numbers for the sample activations against the reference's, printed as ADM prints them."""
    print("Computing evaluations...")
    metrics = {"inception_score": inception_score(class_probabilities(sample.pool, softmax_weights))}
    print("Inception Score:", metrics["inception_score"])
    metrics["fid"] = sample.pool_statistics.frechet_distance(reference.pool_statistics)
    print("FID:", metrics["fid"])
    metrics["sfid"] = sample.spatial_statistics.frechet_distance(reference.spatial_statistics)
    print("sFID:", metrics["sfid"])
    metrics["precision"], metrics["recall"] = precision_recall(
        torch.from_numpy(reference.pool).to(device),
        torch.from_numpy(sample.pool).to(device),
        distance_dtype=distance_dtype,
    )
    print("Precision:", metrics["precision"])
    print("Recall:", metrics["recall"])
    return metrics


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ref_batch", help="reference batch .npz")
    parser.add_argument("sample_batch", help="sample batch .npz")
    parser.add_argument("--json", default="", help="where to write the results (default: SAMPLE.eval.json)")
    parser.add_argument(
        "--distance_dtype", choices=DISTANCE_DTYPES, default="float16",
        help="precision/recall distances. float16: as ADM's evaluator computes them (ADM's numbers; a block "
        "holding a value too large for float16 is computed in float32); float32: every distance in float32, "
        "exact but not ADM's (samples within float16 round-off of a ball's surface can change sides, which "
        "can move precision and recall by about 0.01)",
    )
    parser.add_argument(
        "--allow_different_sizes", action="store_true",
        help="evaluate samples against reference images of another size (refused by default: it is "
        "almost always the wrong reference batch)",
    )
    add_inception_arguments(parser)
    args = parser.parse_args(argv)
    check_batch_size(args.batch_size)
    check_device(args.device)
    json_path = check_output_file(
        args.json or Path(args.sample_batch).with_suffix(".eval.json"), "the JSON results", "--json"
    )
    for path in (args.ref_batch, args.sample_batch):
        if Path(path).exists() and json_path.exists() and json_path.samefile(path):
            raise ValueError(f"--json {json_path} is the batch file {path}; give the results another name")
    batches = {}  # every batch file checked whole before Inception is located or loaded
    for path in (args.ref_batch, args.sample_batch):
        batches[path] = check_batch(path)
    ref_size, sample_size = (batches[p]["shape"][1:3] for p in (args.ref_batch, args.sample_batch))
    if ref_size != sample_size and not args.allow_different_sizes:
        raise ValueError(
            f"the reference images are {ref_size[0]}x{ref_size[1]} but the samples {sample_size[0]}x{sample_size[1]}; "
            "use the reference batch of the samples' size (or pass --allow_different_sizes)"
        )
    model, graph_record = open_inception(args)
    try:
        result = evaluate(
            args.ref_batch, args.sample_batch, model, args.batch_size, args.device, args.distance_dtype,
            digests={path: info["sha256"] for path, info in batches.items()},
        )
    finally:
        model.close()
    result["inception"] = graph_record
    result["batch_size"] = args.batch_size
    result["distance_dtype"] = args.distance_dtype
    print()
    print(format_table(result))
    write_json(result, json_path)
    print(f"wrote {json_path}")
    return result


if __name__ == "__main__":
    cli_main(main)
