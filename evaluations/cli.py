"""Command-line pieces shared by the evaluator and scripts/make_reference_batch.py.

Everything a user can get wrong in these flags is refused here, before any file is read or the
Inception graph is located (which may mean a download): a batch size below 1, a device this
machine does not have, a graph file that is missing, damaged or not ADM's Inception graph.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from evaluations.inception import BACKENDS, InceptionFeatures, create_inception
from evaluations.inception_file import GRAPH_URL, locate_inception_graph
from evaluations.inception_graph import import_tensorflow
from adm_common.devices import check_device


def add_inception_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend", choices=BACKENDS, default="tf",
        help="run the Inception graph with TensorFlow (ADM's evaluator) or PyTorch (no TensorFlow needed)",
    )
    parser.add_argument(
        "--inception_path", default="",
        help="classify_image_graph_def.pb; default: the cache folder, downloaded there on first use",
    )
    parser.add_argument("--batch_size", type=int, default=64, help="images per Inception batch")
    parser.add_argument(
        "--device", default="",
        help="torch device for the torch backend and precision/recall (default: cuda when available)",
    )


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {batch_size}")


def open_inception(args) -> tuple[InceptionFeatures, dict]:
    """The Inception model the flags ask for, and a record of it for reports; fills in args.device.

    The flags are checked first; then the graph is located (downloaded if need be), loaded and run
    once on a blank image, so that a damaged or foreign graph file is refused here, in one line.
    """
    check_batch_size(args.batch_size)
    check_device(args.device)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.backend == "tf":
        import_tensorflow()  # "TensorFlow is not installed" before any graph is looked for
    path, digest = locate_inception_graph(args.inception_path or None)
    model = load_checked_inception(args.backend, path, args.device)
    record = {"path": str(path), "sha256": digest, "backend": args.backend}
    if args.backend == "torch":
        record["device"] = args.device
    return model, record


def load_checked_inception(backend: str, path, device) -> InceptionFeatures:
    """``create_inception``, then one blank image through it; any failure is one line naming the file."""
    model = None
    try:
        model = create_inception(backend, path, device=device)
        pool, spatial = model.features(np.zeros((1, 8, 8, 3), np.uint8))
        width = np.shape(model.softmax_weights)[0]
        if pool.shape != (1, width) or spatial.ndim != 2 or len(spatial) != 1:
            raise ValueError(f"its pool_3 rows have shape {pool.shape[1:]}, its softmax weights {width} rows")
        if not (np.isfinite(pool).all() and np.isfinite(spatial).all()):
            raise ValueError("it gives NaN or infinite features for a blank image")
    except FileNotFoundError:
        raise
    except Exception as exc:  # a damaged graph can fail anywhere in building or running it
        if model is not None:
            model.close()
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not isinstance(exc, (ValueError, OSError)):
            detail = f"{type(exc).__name__}: {detail}"
        where = "" if str(path) in detail else f"{path} cannot be used as ADM's Inception graph ("
        raise ValueError(
            f"{where}{detail}{')' if where else ''}; download {GRAPH_URL} again, "
            "or pass the right file with --inception_path"
        ) from None
    return model
