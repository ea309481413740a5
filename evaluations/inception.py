"""The Inception backends: what a backend gives the evaluator, and the one that the flags choose.

The graph's tensors and the checks both backends share are in evaluations/inception_graph.py.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

BACKENDS = ("tf", "torch")


class InceptionFeatures(Protocol):
    softmax_weights: np.ndarray  # [features, classes]; IS uses softmax(pool_3 @ weights), no bias

    def features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pool [n, 2048], spatial [n, 2023]) float32 rows for uint8 images [n, H, W, 3]."""

    def close(self) -> None: ...


def create_inception(backend: str, graph_path, device=None) -> InceptionFeatures:
    """The Inception graph at ``graph_path`` run by TensorFlow ('tf') or PyTorch ('torch')."""
    if backend == "tf":
        from evaluations.tf_backend import TensorFlowInception

        return TensorFlowInception(graph_path)
    if backend == "torch":
        from evaluations.torch_backend import TorchInception

        return TorchInception(graph_path, device=device)
    raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
