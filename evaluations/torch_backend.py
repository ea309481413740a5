"""ADM's Inception graph run by PyTorch: the same .pb weights, no TensorFlow needed.

It shares a GPU with sampling code and gives the TensorFlow backend's features to float32
round-off (TF32 convolutions are turned off while it runs).
"""

from __future__ import annotations

import numpy as np
import torch

from evaluations.graph_def import read_graph_def
from evaluations.inception_graph import (
    INPUT_TENSOR,
    POOL_TENSOR,
    SOFTMAX_MATMUL,
    SPATIAL_TENSOR,
    check_images,
    check_inception_graph,
    flatten_features,
)
from evaluations.torch_graph import TorchGraph


class TorchInception:
    def __init__(self, graph_path, device=None, parser: str = "auto"):
        nodes = read_graph_def(graph_path, parser)
        check_inception_graph(nodes, graph_path)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.graph = TorchGraph(nodes, self.device)
        weights_name = nodes[SOFTMAX_MATMUL].inputs[1]
        self.softmax_weights = self.graph.run([weights_name], {})[0].cpu().numpy()

    def features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        check_images(images)
        batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).float()
        pool, spatial = self.graph.run([POOL_TENSOR, SPATIAL_TENSOR], {INPUT_TENSOR: batch})
        return flatten_features(pool.cpu().numpy(), spatial.cpu().numpy())

    def close(self) -> None:
        self.graph = None
