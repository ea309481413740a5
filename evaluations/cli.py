"""Command-line pieces shared by the evaluator and scripts/make_reference_batch.py."""

from __future__ import annotations

import argparse

import torch

from evaluations.inception import BACKENDS, InceptionFeatures, create_inception
from evaluations.inception_file import locate_inception_graph


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


def open_inception(args) -> tuple[InceptionFeatures, dict]:
    """The Inception model the flags ask for, and a record of it for reports; fills in args.device."""
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    path, digest = locate_inception_graph(args.inception_path or None)
    model = create_inception(args.backend, path, device=args.device)
    record = {"path": str(path), "sha256": digest, "backend": args.backend}
    if args.backend == "torch":
        record["device"] = args.device
    return model, record
