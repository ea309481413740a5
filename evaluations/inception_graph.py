"""What the evaluator reads from ADM's Inception graph, and what both backends check.

Both backends take uint8 NHWC images, feed them as float32 in 0..255 to ``ExpandDims:0`` (the
graph resizes them to 299x299 itself) and return per-image feature rows: ``pool_3`` (2048 values)
for FID, Inception Score and precision/recall, and the first 7 channels of ``mixed_6/conv``
(17 x 17 x 7 = 2023 values) for sFID. A leaf module: the backends, the GraphDef reader and the
batch reader import it, and it imports none of them.
"""

from __future__ import annotations

import os

import numpy as np

INPUT_TENSOR = "ExpandDims:0"
POOL_TENSOR = "pool_3:0"
SPATIAL_TENSOR = "mixed_6/conv:0"
SOFTMAX_MATMUL = "softmax/logits/MatMul"  # its second input holds the pool_3 -> logits weights
SPATIAL_CHANNELS = 7


def import_tensorflow():
    """The tensorflow module, or one line saying how to install it (or to use --backend torch)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter quiet
    try:
        import tensorflow as tf
    except ImportError:
        raise ValueError(
            "TensorFlow is not installed: `pip install -e .[eval]` (or tensorflow-cpu), "
            "or use --backend torch"
        ) from None
    return tf


def image_batch_problem(shape, dtype) -> str | None:
    """What is wrong with an image batch of this shape and dtype for the evaluator, or None."""
    if np.dtype(dtype) != np.uint8:
        return f"images must be uint8 (0..255), got {np.dtype(dtype)}"
    if len(shape) != 4 or shape[-1] != 3:
        return f"images must be [N, height, width, 3] (NHWC RGB), got shape {tuple(shape)}"
    if shape[0] == 0 or shape[1] == 0 or shape[2] == 0:
        return f"the image batch is empty (shape {tuple(shape)})"
    return None


def check_images(images: np.ndarray) -> None:
    images = np.asarray(images)
    problem = image_batch_problem(images.shape, images.dtype)
    if problem:
        raise ValueError(problem)


def check_inception_graph(node_names, path) -> None:
    wanted = [name.split(":")[0] for name in (INPUT_TENSOR, POOL_TENSOR, SPATIAL_TENSOR)]
    missing = [name for name in wanted + [SOFTMAX_MATMUL] if name not in node_names]
    if missing:
        raise ValueError(f"{path} is not ADM's Inception graph: it has no node {', '.join(missing)}")


def flatten_features(pool: np.ndarray, spatial: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pool [n, 2048], spatial [n, 17 * 17 * 7]) float32 rows from the graph's two outputs."""
    count = pool.shape[0]
    spatial = spatial[..., :SPATIAL_CHANNELS]
    return (
        np.ascontiguousarray(pool.reshape(count, -1), dtype=np.float32),
        np.ascontiguousarray(spatial.reshape(count, -1), dtype=np.float32),
    )
