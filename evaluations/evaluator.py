"""ADM's evaluator: Inception Score, FID, sFID, precision and recall of a sample batch.

    python evaluations/evaluator.py REF.npz SAMPLE.npz [MORE_SAMPLES.npz ...] [--backend tf|torch]
                                    [--json OUT.json] [--distance_dtype float16|float32]
                                    [--bootstrap N] [--bootstrap_seed S]

REF.npz is one of ADM's reference batches (arr_0 images; mu, sigma, mu_s, sigma_s statistics
which are used when present) or one made by scripts/make_reference_batch.py; SAMPLE.npz holds
arr_0 uint8 [N, H, W, 3]. Prints ADM's result lines, then a table; writes every number, the image
counts and the files' sha256 to a JSON file (default: SAMPLE.eval.json beside the samples).
Every number is ADM's, with either backend: precision and recall use ADM's float16 distances
unless --distance_dtype float32 asks for exact ones (see evaluations/manifold.py).

More sample files (seed sets of one model, as EDM scores three) are scored against the same
reference, whose activations are computed once; the table and the JSON then hold each file's
metrics and their mean, std, min and max (evaluations/seed_sets.py). --bootstrap N adds to each
file a 95% interval of its FID from N resamples of its activations. With one file and no
--bootstrap, the output is ADM's evaluator's.

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
from evaluations.inception import InceptionFeatures
from evaluations.manifold import DISTANCE_DTYPES, NEIGHBOURHOOD_SIZE, precision_recall
from evaluations.npz_stream import NpzImages, read_stored_statistics, scan_batch_file
from evaluations.report import format_table, write_json
from evaluations.seed_sets import bootstrap_fid, summarize
from adm_common.cli import cli_main
from adm_common.files import check_output_file


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
    sample_paths: list,
    model: InceptionFeatures,
    batch_size: int = 64,
    device="cpu",
    distance_dtype: str = "float16",
    digests: dict | None = None,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
) -> dict:
    """Every metric of each sample batch against the reference batch, printed as ADM prints them.

    One sample file gives ADM's record, {"metrics", "reference", "sample"}; several give
    {"reference", "samples": [each file's record with its "metrics"], "summary"}. ``bootstrap``
    resamples (0: none) add "fid_bootstrap" to each file's record. ``distance_dtype`` is that of
    precision and recall's distances: "float16" is ADM's. ``digests`` maps a path (as given) to its
    sha256 when ``check_batch`` has computed it.
    """
    digests = digests or {}
    print("computing reference batch activations...")
    reference, reference_info = read_batch(
        reference_path, model, batch_size, "reference", digests.get(str(reference_path))
    )
    records = []
    for number, path in enumerate(sample_paths, 1):
        where = f" ({number} of {len(sample_paths)}: {path})" if len(sample_paths) > 1 else ""
        print(f"computing sample batch activations{where}...")
        sample, record = read_batch(path, model, batch_size, "samples", digests.get(str(path)))
        record["metrics"] = compute_metrics(reference, sample, model.softmax_weights, device, distance_dtype)
        if bootstrap:
            record["fid_bootstrap"] = bootstrap_fid(sample.pool, reference.pool_statistics, bootstrap, bootstrap_seed)
            interval = record["fid_bootstrap"]
            print(f"FID interval ({bootstrap} bootstrap resamples): {interval['low']} to {interval['high']}")
        records.append(record)
    if len(records) == 1:
        record = records[0]
        result = {"metrics": record.pop("metrics"), "reference": reference_info, "sample": record}
        if "fid_bootstrap" in record:
            result["fid_bootstrap"] = record.pop("fid_bootstrap")
        return result
    summary = summarize([record["metrics"] for record in records])
    return {"reference": reference_info, "samples": records, "summary": summary}


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


def check_distinct_samples(samples: list, batches: dict) -> None:
    """Refuse a sample file given twice (or two copies of one): it would shrink the spread over seed sets."""
    seen = {}
    for path in samples:
        digest = batches[path]["sha256"]
        if digest in seen:
            raise ValueError(
                f"sample files {seen[digest]} and {path} hold the same bytes (sha256 {digest[:12]}...); "
                "give each seed set once"
            )
        seen[digest] = path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ref_batch", help="reference batch .npz")
    parser.add_argument(
        "sample_batch", nargs="+",
        help="sample batch .npz; more files (seed sets) are scored against the same reference, and the "
        "mean, std (n - 1), min and max of each metric over them are reported too",
    )
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
    parser.add_argument(
        "--bootstrap", type=int, default=0, metavar="N",
        help="a 95%% interval of each file's FID: the 2.5 and 97.5 percentiles of FID over N resamples of the "
        "sample activations with replacement, against the fixed reference statistics. Each resample costs "
        "about one FID (a covariance and a 2048 x 2048 matrix square root: seconds), so 100 take minutes per "
        "file. Default 0: no interval, ADM's output",
    )
    parser.add_argument("--bootstrap_seed", type=int, default=0, help="seed of the bootstrap resamples (each file's)")
    add_inception_arguments(parser)
    args = parser.parse_args(argv)
    check_batch_size(args.batch_size)
    check_device(args.device)
    if args.bootstrap < 0 or args.bootstrap == 1:
        raise ValueError(f"--bootstrap must be 0 (no interval) or at least 2 resamples, got {args.bootstrap}")
    samples = args.sample_batch
    default_json = Path(samples[0]).with_suffix(".eval.json" if len(samples) == 1 else ".seed_sets.eval.json")
    json_path = check_output_file(args.json or default_json, "the JSON results", "--json")
    for path in (args.ref_batch, *samples):
        if Path(path).exists() and json_path.exists() and json_path.samefile(path):
            raise ValueError(f"--json {json_path} is the batch file {path}; give the results another name")
    batches = {}  # every batch file checked whole before Inception is located or loaded
    for path in (args.ref_batch, *samples):
        batches[path] = check_batch(path)
    check_distinct_samples(samples, batches)
    for path in samples if args.bootstrap else ():
        if read_stored_statistics(path) is not None:  # FID would use them, a bootstrap the images
            raise ValueError(f"{path} stores its own FID statistics, which a bootstrap of its images would not "
                             "reproduce; drop --bootstrap or pass the samples without them")
    ref_size = batches[args.ref_batch]["shape"][1:3]
    for path in samples:
        sample_size = batches[path]["shape"][1:3]
        if ref_size != sample_size and not args.allow_different_sizes:
            raise ValueError(
                f"the reference images are {ref_size[0]}x{ref_size[1]} but the samples {sample_size[0]}x{sample_size[1]}"
                f"{f' in {path}' if len(samples) > 1 else ''}; "
                "use the reference batch of the samples' size (or pass --allow_different_sizes)"
            )
    model, graph_record = open_inception(args)
    try:
        result = evaluate(
            args.ref_batch, samples, model, args.batch_size, args.device, args.distance_dtype,
            digests={path: info["sha256"] for path, info in batches.items()},
            bootstrap=args.bootstrap, bootstrap_seed=args.bootstrap_seed,
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
