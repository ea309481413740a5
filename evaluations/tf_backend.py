"""ADM's Inception graph run by TensorFlow 2.x through tf.compat.v1, as ADM's evaluator runs it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evaluations.inception_graph import (
    INPUT_TENSOR,
    POOL_TENSOR,
    SOFTMAX_MATMUL,
    SPATIAL_TENSOR,
    check_images,
    check_inception_graph,
    flatten_features,
    import_tensorflow,
)


class TensorFlowInception:
    def __init__(self, graph_path):
        tf = import_tensorflow()
        graph_path = Path(graph_path)
        if not graph_path.is_file():
            raise FileNotFoundError(f"graph file {graph_path} does not exist")
        data = graph_path.read_bytes()
        if not data:
            raise ValueError(f"{graph_path} is empty (0 bytes)")
        graph_def = tf.compat.v1.GraphDef()
        try:
            graph_def.ParseFromString(data)
        except Exception as exc:  # protobuf's DecodeError; its module path varies by version
            raise ValueError(f"{graph_path} is not a TensorFlow GraphDef (.pb) file ({exc})") from None
        check_inception_graph({node.name for node in graph_def.node}, graph_path)
        self._graph = tf.Graph()
        with self._graph.as_default():
            self._images = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3])
            pool, spatial, matmul = tf.compat.v1.import_graph_def(
                graph_def,
                input_map={INPUT_TENSOR: self._images},
                return_elements=[POOL_TENSOR, SPATIAL_TENSOR, SOFTMAX_MATMUL],
                name="inception",
            )
        config = tf.compat.v1.ConfigProto(allow_soft_placement=True)
        config.gpu_options.allow_growth = True  # leave the rest of the GPU to others
        self._session = tf.compat.v1.Session(graph=self._graph, config=config)
        self._outputs = [pool, spatial]
        self.softmax_weights = self._session.run(matmul.inputs[1])

    def features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        check_images(images)
        pool, spatial = self._session.run(self._outputs, {self._images: images.astype(np.float32)})
        return flatten_features(pool, spatial)

    def close(self) -> None:
        self._session.close()
