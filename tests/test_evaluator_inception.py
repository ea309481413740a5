"""The Inception graph path of the evaluator: GraphDef reading, the torch and TF backends, the CLIs.

No real Inception weights can be downloaded here, so a small frozen graph with the real graph's
tensor names and op types (ExpandDims:0 input, ResizeBilinear, Conv2D + BatchNormWithGlobal-
Normalization + Relu blocks, MaxPool/AvgPool with TF 'SAME' padding, old-style Concat,
mixed_6/conv, pool_3, softmax/logits/MatMul) is written byte by byte with the protobuf encoder
below, so the torch path is tested without TensorFlow. With TensorFlow installed, TensorFlow
imports the same bytes, and both backends must agree.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from scipy.spatial.distance import cdist

from evaluations import evaluator
from evaluations.feature_statistics import FIDStatistics
from evaluations.graph_def import Node, TensorValue, read_graph_def
from evaluations.inception import create_inception
from evaluations.inception_graph import INPUT_TENSOR, POOL_TENSOR, SPATIAL_TENSOR
from evaluations.inception_file import locate_inception_graph
from evaluations import reference_batch
from evaluations.reference_batch import plan_reference_batch, write_reference_batch
from evaluations.torch_backend import TorchInception
from evaluations.torch_graph import OPS, TorchGraph
from adm_common.cli import cli_main

REPO = Path(__file__).resolve().parents[1]
HAVE_TF = importlib.util.find_spec("tensorflow") is not None
needs_tf = pytest.mark.skipif(not HAVE_TF, reason="TensorFlow is not installed (pip install tensorflow-cpu)")

# --- a protobuf encoder for GraphDef (field numbers from tensorflow/core/framework/*.proto) --------


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32/int64 are 10-byte two's complement varints
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload) -> bytes:
    """A varint field for ints, a length-delimited one for bytes."""
    if isinstance(payload, (bytes, bytearray)):
        return _varint(number << 3 | 2) + _varint(len(payload)) + bytes(payload)
    return _varint(number << 3 | 0) + _varint(int(payload))


def _fixed32(number: int, value: float) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<f", value)


class DType(int):
    """An attribute value that is a TensorFlow DataType."""


class Unpacked(list):
    """A list attribute written as one field per value instead of a packed run."""


DT = {np.dtype("float32"): 1, np.dtype("float64"): 2, np.dtype("int32"): 3, np.dtype("int64"): 9,
      np.dtype("bool"): 10, np.dtype("float16"): 19, np.dtype(object): 7}
FLOAT, INT32 = DType(1), DType(3)


def _shape(dims) -> bytes:
    return b"".join(_field(2, _field(1, d)) for d in dims)


def _tensor(array, style: str = "content") -> bytes:
    """TensorProto of ``array``: raw tensor_content, or the typed repeated value field."""
    array = np.asarray(array)
    if array.dtype == object:  # strings
        strings = b"".join(_field(8, s) for s in array.ravel())
        return _field(1, DT[array.dtype]) + _field(2, _shape(array.shape)) + strings
    out = _field(1, DT[array.dtype]) + _field(2, _shape(array.shape))
    if style == "content":
        return out + _field(4, array.astype(array.dtype.newbyteorder("<")).tobytes())
    values = array.ravel() if style == "values" else array.ravel()[:1]  # "fill": one value, TF repeats it
    if array.dtype == np.float32:
        return out + _field(5, values.astype("<f4").tobytes())
    if array.dtype == np.float64:
        return out + _field(6, values.astype("<f8").tobytes())
    if array.dtype == np.float16:
        return out + _field(13, b"".join(_varint(int(v)) for v in values.view(np.uint16)))
    number = {np.dtype("int32"): 7, np.dtype("int64"): 10, np.dtype("bool"): 11}[array.dtype]
    return out + _field(number, b"".join(_varint(int(v)) for v in values))


def _attr(value) -> bytes:
    """AttrValue: list=1, s=2, i=3, f=4, b=5, type=6, shape=7, tensor=8."""
    if isinstance(value, DType):
        return _field(6, int(value))
    if isinstance(value, bool):
        return _field(5, int(value))
    if isinstance(value, int):
        return _field(3, value)
    if isinstance(value, float):
        return _fixed32(4, value)
    if isinstance(value, bytes):
        return _field(2, value)
    if isinstance(value, Unpacked):
        return _field(1, b"".join(_field(3, v) for v in value))
    if isinstance(value, list):
        return _field(1, _field(3, b"".join(_varint(v) for v in value)))
    if isinstance(value, Const):
        return _field(8, _tensor(*value))
    return _field(7, _shape(value))


class Const(tuple):
    """(array, style) for a Const node's value."""


def _node(name: str, op: str, inputs=(), **attrs) -> bytes:
    out = _field(1, name.encode()) + _field(2, op.encode())
    out += b"".join(_field(3, i.encode()) for i in inputs)
    for key, value in attrs.items():
        out += _field(5, _field(1, key.encode()) + _field(2, _attr(value)))
    return out


# --- the synthetic Inception graph ----------------------------------------------------------------

POOL_SIZE, NUM_CLASSES, RESIZE = 16, 10, 15
SPATIAL_SIZE = 4 * 4 * 7  # mixed_6/conv is 4 x 4 x 8; the first 7 channels


class GraphBuilder:
    def __init__(self, seed: int = 0):
        self.nodes: list[bytes] = []
        self.rng = np.random.default_rng(seed)

    def add(self, name, op, inputs=(), **attrs):
        self.nodes.append(_node(name, op, inputs, **attrs))
        return name

    def const(self, name, array, style="content"):
        array = np.asarray(array)
        return self.add(name, "Const", dtype=DType(DT[array.dtype]), value=Const((array, style)))

    def conv(self, name, source, kernel, channels, stride, padding, unpacked_strides=False):
        kh, kw, cin, cout = kernel + channels
        weights = (self.rng.standard_normal((kh, kw, cin, cout)) / np.sqrt(kh * kw * cin)).astype(np.float32)
        strides = [1, stride, stride, 1]
        conv = self.add(f"{name}/Conv2D", "Conv2D", [source, self.const(f"{name}/conv2d_params", weights)],
                        T=FLOAT, strides=Unpacked(strides) if unpacked_strides else strides,
                        padding=padding, data_format=b"NHWC", use_cudnn_on_gpu=True)
        stats = {
            "moving_mean": self.rng.normal(0, 0.1, cout),
            "moving_variance": self.rng.uniform(0.5, 1.5, cout),
            "beta": self.rng.normal(0.5, 0.1, cout),  # mostly positive: few dead ReLU units
            "gamma": self.rng.uniform(0.8, 1.2, cout),
        }
        inputs = [conv] + [self.const(f"{name}/batchnorm/{key}", stats[key].astype(np.float32))
                           for key in ("moving_mean", "moving_variance", "beta", "gamma")]
        norm = self.add(f"{name}/batchnorm", "BatchNormWithGlobalNormalization", inputs,
                        T=FLOAT, variance_epsilon=0.001, scale_after_normalization=True)
        checked = self.add(f"{name}/CheckNumerics", "CheckNumerics", [norm], T=FLOAT, message=b"bad")
        return self.add(name, "Relu", [checked], T=FLOAT)

    def pool(self, name, op, source, size, stride, padding):
        return self.add(name, op, [source], T=FLOAT, ksize=[1, size, size, 1], strides=[1, stride, stride, 1],
                        padding=padding, data_format=b"NHWC")

    def serialize(self) -> bytes:
        return b"".join(_field(1, node) for node in self.nodes)  # no versions: producer 0, as in 2015


def synthetic_inception_graph(seed: int = 0) -> bytes:
    g = GraphBuilder(seed)
    g.add("Cast", "Placeholder", dtype=FLOAT, shape=(-1, -1, 3))  # stands in for the JPEG decoder
    g.add("ExpandDims", "ExpandDims", ["Cast", g.const("ExpandDims/dim", np.array(0, np.int32), "values")],
          T=FLOAT, Tdim=INT32)
    size = g.const("ResizeBilinear/size", np.array([RESIZE, RESIZE], np.int32), "values")
    x = g.add("ResizeBilinear", "ResizeBilinear", ["ExpandDims", size], T=FLOAT, align_corners=False)
    x = g.add("Sub", "Sub", [x, g.const("Sub/y", np.array(128.0, np.float32), "values")], T=FLOAT)
    x = g.add("Mul", "Mul", [x, g.const("Mul/y", np.array(1 / 128, np.float32), "values")], T=FLOAT)
    x = g.conv("conv", x, (3, 3), (3, 6), 2, b"VALID", unpacked_strides=True)  # 15 -> 7
    x = g.pool("pool", "MaxPool", x, 3, 2, b"SAME")  # 7 -> 4, one row of padding each side
    branches = [
        g.conv("mixed_6/conv", x, (1, 1), (6, 8), 1, b"VALID"),
        g.conv("mixed_6/tower/conv", x, (1, 3), (6, 4), 1, b"SAME"),
        g.pool("mixed_6/pool", "AvgPool", x, 3, 1, b"SAME"),  # divides by the real pixels at the border
    ]
    axis = g.const("mixed_6/join/concat_dim", np.array(3, np.int32), "values")
    x = g.add("mixed_6/join", "Concat", [axis] + branches, T=FLOAT, N=3)
    x = g.conv("mixed_7/conv", x, (3, 3), (18, POOL_SIZE), 2, b"SAME")  # 4 -> 2, padding only after
    bias = g.const("mixed_7/bias", g.rng.normal(0, 0.1, POOL_SIZE).astype(np.float32))
    x = g.add("mixed_7/bias_add", "BiasAdd", [x, bias, "^mixed_6/join"], T=FLOAT, data_format=b"NHWC")
    x = g.pool("pool_3", "AvgPool", x, 2, 1, b"VALID")  # [N, 1, 1, POOL_SIZE]
    shape = g.const("pool_3/_reshape/shape", np.array([-1, POOL_SIZE], np.int32), "values")
    x = g.add("pool_3/_reshape", "Reshape", [x, shape], T=FLOAT, Tshape=INT32)
    weights = g.const("softmax/weights", g.rng.standard_normal((POOL_SIZE, NUM_CLASSES)).astype(np.float32))
    x = g.add("softmax/logits/MatMul", "MatMul", [x, weights], T=FLOAT, transpose_a=False, transpose_b=False)
    biases = g.const("softmax/biases", np.full(NUM_CLASSES, 0.5, np.float32), "fill")
    x = g.add("softmax/logits", "Add", [x, biases], T=FLOAT)
    g.add("softmax", "Softmax", [x], T=FLOAT)
    # Constants of other types, never evaluated: the readers must still decode them alike.
    g.const("extra/string", np.array([b"jpeg bytes"], dtype=object))
    g.const("extra/half", np.array([1.5, -2.25, 65504.0], np.float16), "values")
    g.const("extra/int64", np.array([-3, 2**40], np.int64), "values")
    g.const("extra/bool", np.array([True, False, True]), "values")
    g.const("extra/double", np.array([[0.1, -1e300]], np.float64), "values")
    return g.serialize()


@pytest.fixture(scope="module")
def graph_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inception") / "classify_image_graph_def.pb"
    path.write_bytes(synthetic_inception_graph())
    return path


@pytest.fixture(scope="module")
def torch_model(graph_path):
    return TorchInception(graph_path, device="cpu", parser="wire")


@pytest.fixture(scope="module")
def tf_model(graph_path):
    if not HAVE_TF:
        pytest.skip("TensorFlow is not installed (pip install tensorflow-cpu)")
    model = create_inception("tf", graph_path)
    yield model
    model.close()


def _images(seed: int, count: int, height: int = 16, width: int = 16) -> np.ndarray:
    """Noisy images of one random colour each: their features vary far more than pure noise's."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (count, 1, 1, 3))
    return np.clip(colours + rng.integers(-40, 41, (count, height, width, 3)), 0, 255).astype(np.uint8)


# --- reading the GraphDef ---------------------------------------------------------------------------


def test_wire_reader_decodes_what_was_written(graph_path):
    nodes = read_graph_def(graph_path, parser="wire")
    conv = nodes["conv/Conv2D"]
    assert conv.op == "Conv2D" and conv.inputs == ["Mul", "conv/conv2d_params"]
    assert conv.attrs["strides"] == [1, 2, 2, 1]  # written unpacked
    assert nodes["mixed_7/conv/Conv2D"].attrs["strides"] == [1, 2, 2, 1]  # written packed
    assert conv.attrs["padding"] == b"VALID" and conv.attrs["T"] == 1 and conv.attrs["use_cudnn_on_gpu"] is True
    assert nodes["conv/batchnorm"].attrs["variance_epsilon"] == pytest.approx(0.001, rel=1e-7)
    assert nodes["Cast"].attrs["shape"] == (-1, -1, 3)
    assert nodes["mixed_7/bias_add"].inputs == ["mixed_7/conv", "mixed_7/bias"]  # control input dropped
    values = {name: nodes[name].attrs["value"].numpy() for name in nodes if nodes[name].op == "Const"}
    np.testing.assert_array_equal(values["pool_3/_reshape/shape"], [-1, POOL_SIZE])
    np.testing.assert_array_equal(values["softmax/biases"], np.full(NUM_CLASSES, 0.5, np.float32))
    np.testing.assert_array_equal(values["extra/half"], np.array([1.5, -2.25, 65504.0], np.float16))
    np.testing.assert_array_equal(values["extra/int64"], [-3, 2**40])
    np.testing.assert_array_equal(values["extra/bool"], [True, False, True])
    np.testing.assert_array_equal(values["extra/double"], [[0.1, -1e300]])
    assert values["extra/string"].tolist() == [b"jpeg bytes"]
    assert values["ExpandDims/dim"].shape == () and values["ExpandDims/dim"] == 0
    assert values["conv/conv2d_params"].shape == (3, 3, 3, 6) and values["conv/conv2d_params"].dtype == np.float32


@needs_tf
def test_wire_reader_agrees_with_tensorflow_protos(graph_path):
    wire, protos = read_graph_def(graph_path, parser="wire"), read_graph_def(graph_path, parser="tf")
    assert list(wire) == list(protos)
    for name, node in wire.items():
        other = protos[name]
        assert (node.op, node.inputs, sorted(node.attrs)) == (other.op, other.inputs, sorted(other.attrs)), name
        for key, value in node.attrs.items():
            if isinstance(value, TensorValue):
                a, b = value.numpy(), other.attrs[key].numpy()
                assert a.dtype == b.dtype and a.shape == b.shape, name
                np.testing.assert_array_equal(a, b)
            else:
                assert value == other.attrs[key], (name, key)


def test_bad_graph_files_give_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_graph_def(tmp_path / "missing.pb")
    garbage = tmp_path / "garbage.pb"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a TensorFlow GraphDef"):
        read_graph_def(garbage, parser="wire")
    with pytest.raises(ValueError, match="unknown GraphDef parser"):
        read_graph_def(garbage, parser="json")
    other = tmp_path / "other.pb"
    other.write_bytes(_field(1, _node("x", "Placeholder", dtype=FLOAT)))
    with pytest.raises(ValueError, match="not ADM's Inception graph: it has no node ExpandDims, pool_3"):
        TorchInception(other, device="cpu", parser="wire")


# --- TensorFlow's op semantics, checked against closed forms and independent computations -----------


def _nhwc(array) -> torch.Tensor:
    return torch.tensor(np.asarray(array, dtype=np.float32))


def test_resize_bilinear_uses_tensorflow_legacy_sampling():
    image = _nhwc([[[[0], [10]], [[20], [30]]]])  # 1 x 2 x 2 x 1
    size = torch.tensor([4, 4], dtype=torch.int32)
    legacy = OPS["ResizeBilinear"](Node("r", "ResizeBilinear", [], {"align_corners": False}), image, size)
    # Output i samples source i * 2/4; beyond the last pixel it repeats the edge.
    expected = [[0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30]]
    np.testing.assert_allclose(legacy[0, :, :, 0].numpy(), expected)
    source = torch.rand(2, 5, 7, 3, generator=torch.Generator().manual_seed(0))
    size = torch.tensor([9, 4], dtype=torch.int32)
    for attrs, align in (({"align_corners": True}, True), ({"half_pixel_centers": True}, False)):
        ours = OPS["ResizeBilinear"](Node("r", "ResizeBilinear", [], attrs), source, size)
        theirs = F.interpolate(source.permute(0, 3, 1, 2), size=(9, 4), mode="bilinear", align_corners=align)
        torch.testing.assert_close(ours, theirs.permute(0, 2, 3, 1), rtol=1e-5, atol=1e-6)


def test_pools_follow_tensorflow_same_padding():
    x = torch.arange(1, 10, dtype=torch.float32).view(1, 3, 3, 1)
    node = Node("p", "AvgPool", [], {"ksize": [1, 3, 3, 1], "strides": [1, 1, 1, 1], "padding": b"SAME"})
    out = OPS["AvgPool"](node, x)[0, :, :, 0]
    assert out[0, 0].item() == pytest.approx((1 + 2 + 4 + 5) / 4)  # 4 real pixels, not 9
    assert out[1, 1].item() == pytest.approx(5.0)
    node = Node("p", "MaxPool", [], {"ksize": [1, 3, 3, 1], "strides": [1, 2, 2, 1], "padding": b"SAME"})
    assert OPS["MaxPool"](node, -x).flatten().tolist() == [-1, -2, -4, -5]  # padding never wins a max


def test_conv2d_same_stride_two_pads_after_like_tensorflow():
    rng = np.random.default_rng(1)
    image = rng.standard_normal((1, 6, 6, 2)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 2, 4)).astype(np.float32)
    node = Node("c", "Conv2D", [], {"strides": [1, 2, 2, 1], "padding": b"SAME"})
    out = OPS["Conv2D"](node, torch.tensor(image), torch.tensor(kernel)).numpy()
    # TF: output 3 = ceil(6 / 2); total padding (3 - 1) * 2 + 3 - 6 = 1 goes after the image.
    padded = np.pad(image, ((0, 0), (0, 1), (0, 1), (0, 0)))
    expected = np.zeros((1, 3, 3, 4), np.float32)
    for i in range(3):
        for j in range(3):
            window = padded[0, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3, :]
            expected[0, i, j] = np.einsum("hwc,hwco->o", window, kernel)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_torch_graph_rejects_what_it_cannot_run(graph_path):
    nodes = read_graph_def(graph_path, parser="wire")
    graph = TorchGraph(nodes)
    with pytest.raises(ValueError, match="'Cast' needs a value but none was fed"):
        graph.run([POOL_TENSOR], {})
    with pytest.raises(ValueError, match="no node named 'nope'"):
        graph.run(["nope:0"], {})
    with pytest.raises(ValueError, match="string constant 'extra/string'"):
        graph.run(["extra/string:0"], {})
    odd = {"x": Node("x", "Placeholder", []), "y": Node("y", "Erf", ["x"])}
    with pytest.raises(ValueError, match="op Erf .* not supported"):
        TorchGraph(odd).run(["y:0"], {"x:0": torch.zeros(1)})
    nchw = Node("c", "Conv2D", [], {"strides": [1, 1, 1, 1], "padding": b"SAME", "data_format": b"NCHW"})
    with pytest.raises(ValueError, match="only data_format NHWC"):
        OPS["Conv2D"](nchw, torch.zeros(1, 4, 4, 1), torch.zeros(1, 1, 1, 1))


def test_torch_features_do_not_depend_on_batching(torch_model):
    images = _images(0, 5)
    pool, spatial = torch_model.features(images)
    assert pool.shape == (5, POOL_SIZE) and spatial.shape == (5, SPATIAL_SIZE)
    mixed_6 = torch_model.graph.run([SPATIAL_TENSOR], {INPUT_TENSOR: torch.tensor(images).float()})[0]
    np.testing.assert_array_equal(spatial, mixed_6[..., :7].reshape(5, -1).numpy())  # ADM: channels 0..6
    one_by_one = [torch_model.features(images[i : i + 1]) for i in range(5)]
    np.testing.assert_allclose(np.concatenate([p for p, _ in one_by_one]), pool, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.concatenate([s for _, s in one_by_one]), spatial, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        torch_model.features(images.astype(np.float32))
    with pytest.raises(ValueError, match="NHWC"):
        torch_model.features(images[..., :1])


# --- TensorFlow and PyTorch agree ----------------------------------------------------------------


@needs_tf
def test_torch_backend_matches_tensorflow(torch_model, tf_model):
    np.testing.assert_array_equal(torch_model.softmax_weights, tf_model.softmax_weights)
    for height, width in ((16, 16), (20, 12), (40, 40)):  # upsampled, non-square, downsampled to 23
        images = _images(height, 6, height, width)
        for ours, theirs in zip(torch_model.features(images), tf_model.features(images)):
            np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    first, second = _images(10, 40), _images(11, 40) // 2 + 64
    fids = []
    for model in (torch_model, tf_model):
        pools = [model.features(batch)[0].astype(np.float64) for batch in (first, second)]
        stats = [FIDStatistics(p.mean(0), np.cov(p, rowvar=False)) for p in pools]
        fids.append(stats[0].frechet_distance(stats[1]))
    assert fids[0] > 0.1
    assert abs(fids[0] - fids[1]) <= 1e-3 * fids[1]


@needs_tf
def test_torch_graph_runs_the_softmax_head_like_tensorflow(graph_path):
    import tensorflow as tf

    images = _images(3, 3).astype(np.float32)
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(graph_path.read_bytes())
    with tf.Graph().as_default() as graph:
        batch = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3])
        (softmax,) = tf.compat.v1.import_graph_def(graph_def, {INPUT_TENSOR: batch}, ["softmax:0"], name="")
        with tf.compat.v1.Session(graph=graph) as session:
            expected = session.run(softmax, {batch: images})
    graph = TorchGraph(read_graph_def(graph_path, parser="wire"))
    ours = graph.run(["softmax"], {INPUT_TENSOR: torch.tensor(images)})
    np.testing.assert_allclose(ours[0].numpy(), expected, rtol=1e-4, atol=1e-6)


# --- the command line, end to end ------------------------------------------------------------------


def _independent_metrics(ref_pool, sample_pool, ref_stats, sample_stats, weights):
    """The five metrics by other means: eigenvalues for the matrix square root, brute-force kNN."""

    def frechet(a, b):
        values, vectors = linalg.eigh(a.sigma)
        root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
        eig = np.clip(linalg.eigvalsh(root_a @ b.sigma @ root_a), 0, None)
        return float(np.sum((a.mu - b.mu) ** 2) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.sqrt(eig).sum())

    logits = sample_pool.astype(np.float64) @ weights.astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    inception = np.exp(np.mean(np.sum(probs * (np.log(probs) - np.log(probs.mean(0))), axis=1)))

    def radii(x):
        return np.sort(cdist(x, x, "sqeuclidean"), axis=1)[:, 3]

    cross = cdist(ref_pool, sample_pool, "sqeuclidean")
    precision = np.mean((cross <= radii(ref_pool)[:, None]).any(axis=0))
    recall = np.mean((cross <= radii(sample_pool)[None, :]).any(axis=1))
    fid, sfid = frechet(sample_stats[0], ref_stats[0]), frechet(sample_stats[1], ref_stats[1])
    return inception, fid, sfid, precision, recall


def _stats(rows):
    rows = rows.astype(np.float64)
    return FIDStatistics(rows.mean(0), np.cov(rows, rowvar=False))


@pytest.mark.parametrize("backend", ["torch", pytest.param("tf", marks=needs_tf)])
def test_evaluator_cli_reports_every_metric(backend, graph_path, torch_model, tmp_path, capsys):
    # The torch run asks for float32 distances, so that brute-force float64 kNN must agree exactly;
    # the tf run keeps the default, ADM's float16 distances (tested against ADM's own numbers in
    # test_evaluator_adm_numbers.py, and against TensorFlow's arithmetic in test_evaluator.py).
    dtype_flag = ["--distance_dtype", "float32"] if backend == "torch" else []
    ref_images, sample_images = _images(20, 130), _images(21, 120) // 2 + 60  # more images than features
    np.savez(tmp_path / "ref.npz", ref_images)
    np.savez(tmp_path / "sample.npz", sample_images, np.arange(120))  # arr_1 labels are ignored
    out = tmp_path / "result.json"
    evaluator.main([str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), "--backend", backend,
                    "--inception_path", str(graph_path), "--batch_size", "32", "--device", "cpu",
                    "--json", str(out)] + dtype_flag)
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    metrics = result["metrics"]
    for line, key in (("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"),
                      ("Precision", "precision"), ("Recall", "recall")):
        assert f"\n{line}: {metrics[key]}\n" in printed  # ADM's lines, ADM's float formatting
    ref_pool, ref_spatial = torch_model.features(ref_images)
    sample_pool, sample_spatial = torch_model.features(sample_images)
    expected = _independent_metrics(ref_pool, sample_pool, (_stats(ref_pool), _stats(ref_spatial)),
                                    (_stats(sample_pool), _stats(sample_spatial)), torch_model.softmax_weights)
    tolerance = {"torch": 1e-6, "tf": 1e-3}[backend]
    got = [metrics[k] for k in ("inception_score", "fid", "sfid", "precision", "recall")]
    np.testing.assert_allclose(got[:3], expected[:3], rtol=tolerance)
    if backend == "torch":
        assert got[3:] == list(expected[3:])
    assert 0 < got[3] < 1 and 0 < got[4] <= 1  # the sets overlap partly: a test that can fail
    assert result["reference"] == {
        "path": str(tmp_path / "ref.npz"), "sha256": hashlib.sha256((tmp_path / "ref.npz").read_bytes()).hexdigest(),
        "num_images": 130, "image_size": [16, 16], "statistics": "computed",
    }
    assert result["sample"]["num_images"] == 120
    assert result["inception"]["sha256"] == hashlib.sha256(graph_path.read_bytes()).hexdigest()
    assert result["inception"]["backend"] == backend
    if backend == "torch":
        assert result["distance_dtype"] == "float32" and "distances in float32 (not ADM's)" in printed
    else:
        assert result["distance_dtype"] == "float16" and "distances in float16 (ADM's)" in printed


def test_evaluator_uses_statistics_stored_in_the_reference(graph_path, torch_model, tmp_path, capsys):
    sample_images = _images(30, 130)
    pool, spatial = torch_model.features(sample_images)
    pool_stats, spatial_stats = _stats(pool), _stats(spatial)
    # Different images, but the samples' own statistics: FID and sFID must come out 0.
    np.savez(tmp_path / "ref.npz", _images(31, 130), mu=pool_stats.mu, sigma=pool_stats.sigma,
             mu_s=spatial_stats.mu, sigma_s=spatial_stats.sigma)
    np.savez(tmp_path / "sample.npz", sample_images)
    result = evaluator.main([str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), "--backend", "torch",
                             "--inception_path", str(graph_path), "--device", "cpu"])
    capsys.readouterr()
    assert (tmp_path / "sample.eval.json").is_file()
    assert result["reference"]["statistics"] == "file" and result["sample"]["statistics"] == "computed"
    assert abs(result["metrics"]["fid"]) < 1e-6 * np.trace(pool_stats.sigma)
    assert abs(result["metrics"]["sfid"]) < 1e-6 * np.trace(spatial_stats.sigma)


def _cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(lambda: evaluator.main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bars
    assert err.startswith("error: ")
    return err


def test_evaluator_cli_bad_input_is_one_line(graph_path, tmp_path, capsys):
    good = tmp_path / "good.npz"
    np.savez(good, _images(0, 5))
    common = ["--backend", "torch", "--inception_path", str(graph_path), "--device", "cpu"]
    assert "does not exist" in _cli_error([str(tmp_path / "none.npz"), str(good)] + common, capsys)
    np.savez(tmp_path / "labels.npz", arr_1=np.arange(5))
    assert "has no arr_0" in _cli_error([str(good), str(tmp_path / "labels.npz")] + common, capsys)
    np.savez(tmp_path / "float.npz", _images(0, 5).astype(np.float32))
    assert "uint8" in _cli_error([str(tmp_path / "float.npz"), str(good)] + common, capsys)
    np.savez(tmp_path / "gray.npz", _images(0, 5)[..., 0])
    assert "NHWC" in _cli_error([str(good), str(tmp_path / "gray.npz")] + common, capsys)
    np.savez(tmp_path / "empty.npz", np.zeros((0, 16, 16, 3), np.uint8))
    assert "empty" in _cli_error([str(good), str(tmp_path / "empty.npz")] + common, capsys)
    np.savez(tmp_path / "few.npz", _images(1, 3))
    message = _cli_error([str(good), str(tmp_path / "few.npz")] + common, capsys)
    assert "holds 3 images; precision and recall compare each image with its 3 nearest neighbours" in message
    np.savez(tmp_path / "half.npz", _images(0, 5), mu=np.zeros(POOL_SIZE))
    assert "but not sigma, mu_s, sigma_s" in _cli_error([str(tmp_path / "half.npz"), str(good)] + common, capsys)
    eight = {"mu": np.zeros(8), "sigma": np.eye(8), "mu_s": np.zeros(8), "sigma_s": np.eye(8)}
    np.savez(tmp_path / "wide.npz", _images(0, 5), **eight)
    assert "same Inception graph" in _cli_error([str(tmp_path / "wide.npz"), str(good)] + common, capsys)
    bad_json = ["--json", str(tmp_path / "no" / "r.json")]
    assert "does not exist" in _cli_error([str(good), str(good)] + common + bad_json, capsys)
    assert "batch_size" in _cli_error([str(good), str(good)] + common + ["--batch_size", "0"], capsys)
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("*tmp*"))


@pytest.mark.skipif(HAVE_TF, reason="checks the message shown when TensorFlow is absent")
def test_tf_backend_without_tensorflow_says_what_to_do(graph_path):
    with pytest.raises(ValueError, match="--backend torch"):
        create_inception("tf", graph_path)


# --- the Inception graph file -----------------------------------------------------------------------


def test_graph_file_is_downloaded_once_and_checked_after(graph_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path, digest = locate_inception_graph(url=graph_path.as_uri())
    assert path == tmp_path / "cache" / "guided_diffusion_es" / "classify_image_graph_def.pb"
    assert path.read_bytes() == graph_path.read_bytes()
    assert digest == hashlib.sha256(graph_path.read_bytes()).hexdigest()
    assert digest in capsys.readouterr().out
    assert (path.parent / "classify_image_graph_def.pb.sha256").read_text().split()[0] == digest
    assert locate_inception_graph(url="file:///nowhere") == (path, digest)  # cached: no download
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="was recorded when it was downloaded"):
        locate_inception_graph()


def test_graph_file_offline_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="download file:///nowhere/x.pb to that path, or pass --inception"):
        locate_inception_graph(url="file:///nowhere/x.pb")
    assert list((tmp_path / "guided_diffusion_es").iterdir()) == []  # nothing half-downloaded
    with pytest.raises(FileNotFoundError, match="does not exist"):
        locate_inception_graph(tmp_path / "missing.pb")


# --- reference batches of your own -------------------------------------------------------------------


def _blocky(seed: int, height: int, width: int) -> np.ndarray:
    """An image made of 2x2 blocks of one colour: box-halving recovers the block colours exactly."""
    blocks = np.random.default_rng(seed).integers(0, 256, (height // 2, width // 2, 3), dtype=np.uint8)
    return blocks.repeat(2, axis=0).repeat(2, axis=1)


def test_make_reference_batch_from_folder_zip_and_npz(graph_path, torch_model, tmp_path, capsys):
    sources = [_blocky(i, 32, 48) if i % 2 else _blocky(i, 48, 32) for i in range(9)]
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i, image in enumerate(sources):
        Image.fromarray(image).save(folder / ("sub" if i > 5 else "") / f"img_{i}.png")
    out = tmp_path / "ref.npz"
    reference_batch.main([str(folder), str(out), "--image_size", "16", "--backend", "torch",
                          "--inception_path", str(graph_path), "--device", "cpu", "--batch_size", "4"])
    assert "wrote" in capsys.readouterr().out
    with np.load(out) as data:
        assert sorted(data.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
        images = data["arr_0"]
        # ADM's preparation: 48x32 -> box-halved to 24x16 -> the central 16 columns (4..20).
        order = [0, 1, 2, 3, 4, 5, 6, 7, 8]  # sorted paths: img_0..img_5, then sub/img_6..img_8
        for row, i in enumerate(order):
            halved = sources[i][::2, ::2]
            expected = halved[:, 4:20] if halved.shape[1] == 24 else halved[4:20, :]
            np.testing.assert_array_equal(images[row], expected)
        pool, spatial = torch_model.features(images)
        np.testing.assert_allclose(data["mu"], pool.astype(np.float64).mean(0), rtol=1e-5, atol=1e-8)
        for key, rows in (("sigma", pool), ("sigma_s", spatial)):
            expected = np.cov(rows.astype(np.float64), rowvar=False)
            np.testing.assert_allclose(data[key], expected, rtol=1e-4, atol=1e-8)
    # The same images from a zip and from an .npz batch; a seeded subset.
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        for path in sorted(folder.rglob("*.png")):
            archive.write(path, path.relative_to(folder).as_posix())
    np.savez(tmp_path / "big.npz", np.stack([sources[i] for i in (1, 3, 5, 7)]))  # all 32 x 48
    write_reference_batch(plan_reference_batch(tmp_path / "images.zip", tmp_path / "zip.npz", 16), torch_model, 5)
    plan = plan_reference_batch(tmp_path / "images.zip", tmp_path / "subset.npz", 16, num_images=4, seed=3)
    subset = write_reference_batch(plan, torch_model)
    assert subset["num_images"] == 4
    with np.load(tmp_path / "zip.npz") as zipped, np.load(tmp_path / "subset.npz") as part:
        np.testing.assert_array_equal(zipped["arr_0"][np.sort(np.random.default_rng(3).choice(9, 4, replace=False))],
                                      part["arr_0"])
        np.testing.assert_array_equal(zipped["arr_0"], images)
    write_reference_batch(plan_reference_batch(tmp_path / "big.npz", tmp_path / "from_npz.npz", 16), torch_model)
    with np.load(tmp_path / "from_npz.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], images[[1, 3, 5, 7]])


def test_make_reference_batch_bad_input(torch_model, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .jpg, .jpeg, .png, .gif images found"):
        plan_reference_batch(tmp_path / "empty", tmp_path / "out.npz", 16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plan_reference_batch(tmp_path / "missing", tmp_path / "out.npz", 16)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="must be a folder of images"):
        plan_reference_batch(tmp_path / "notes.txt", tmp_path / "out.npz", 16)
    (tmp_path / "images").mkdir()
    for i in range(3):
        Image.fromarray(_blocky(i, 16, 16)).save(tmp_path / "images" / f"{i}.png")
    with pytest.raises(ValueError, match="must be an .npz file"):
        plan_reference_batch(tmp_path / "images", tmp_path / "out.zip", 16)
    with pytest.raises(FileNotFoundError, match="output folder .* does not exist"):
        plan_reference_batch(tmp_path / "images", tmp_path / "no" / "out.npz", 16)
    with pytest.raises(ValueError, match="image size must be positive"):
        plan_reference_batch(tmp_path / "images", tmp_path / "out.npz", 0)
    with pytest.raises(ValueError, match="cannot take 5 images from a source of 3"):
        plan_reference_batch(tmp_path / "images", tmp_path / "out.npz", 16, num_images=5)
    (tmp_path / "images" / "3.png").write_bytes(b"not a png")
    plan = plan_reference_batch(tmp_path / "images", tmp_path / "out.npz", 16)
    with pytest.raises(ValueError, match="cannot read image .*3.png"):
        write_reference_batch(plan, torch_model, batch_size=2)  # fails after writing a batch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "images", "notes.txt"]  # nothing half-written
