"""Running a frozen TensorFlow graph with PyTorch: the ops of ADM's Inception graph.

Tensors keep TensorFlow's NHWC layout between ops; convolutions and pools view them as NCHW
(a channels-last view, no copy) and view the result back. Padding, pooling and resizing follow
TensorFlow's rules, which differ from PyTorch's defaults: 'SAME' padding may put the extra row
after the image, average pools over padding divide by the number of real pixels, and
ResizeBilinear by default samples at ``i * in / out`` (no half-pixel offset).
"""

from __future__ import annotations

import contextlib
import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from evaluations.graph_def import Node, tensor_name


class TorchGraph:
    """Evaluates tensors of a graph given values for some of its tensors (``feeds``)."""

    def __init__(self, nodes: Mapping[str, Node], device="cpu"):
        self.nodes = nodes
        self.device = torch.device(device)
        self._constants: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def run(self, fetches: Sequence[str], feeds: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        values = {_canonical(name): tensor.to(self.device) for name, tensor in feeds.items()}
        wanted = [_canonical(name) for name in fetches]
        order = self._schedule(wanted, values)
        uses: dict[str, int] = {}
        for name in order:
            for source in self.nodes[name].inputs:
                uses[_canonical(source)] = uses.get(_canonical(source), 0) + 1
        with _exact_float32(self.device):
            for name in order:
                node = self.nodes[name]
                args = [values[_canonical(source)] for source in node.inputs]
                values[f"{name}:0"] = self._evaluate(node, args)
                for source in map(_canonical, node.inputs):
                    uses[source] -= 1
                    if uses[source] == 0 and source not in wanted:
                        del values[source]  # free activations as soon as nothing needs them
        return [values[name] for name in wanted]

    def _schedule(self, wanted: list[str], fed: Mapping[str, torch.Tensor]) -> list[str]:
        """The nodes that the fetches depend on, each after its inputs (iterative depth-first)."""
        order, seen = [], set()
        stack = [(tensor_name(name)[0], False) for name in reversed(wanted) if name not in fed]
        while stack:
            name, inputs_done = stack.pop()
            if inputs_done:
                order.append(name)
                continue
            if name in seen:
                continue
            if name not in self.nodes:
                raise ValueError(f"the graph has no node named {name!r}")
            seen.add(name)
            stack.append((name, True))
            for source in reversed(self.nodes[name].inputs):
                if _canonical(source) not in fed:
                    node_name, index = tensor_name(source)
                    if index != 0:
                        raise ValueError(f"node {name!r} reads output {index} of {node_name!r}; "
                                         "only single-output ops are supported")
                    stack.append((node_name, False))
        return order

    def _evaluate(self, node: Node, args: list[torch.Tensor]) -> torch.Tensor:
        if node.op == "Const":
            return self._constant(node)
        if node.op == "Placeholder":
            raise ValueError(f"graph input {node.name!r} needs a value but none was fed")
        if node.op not in OPS:
            raise ValueError(f"op {node.op} (node {node.name!r}) is not supported by the torch backend")
        return OPS[node.op](node, *args)

    def _constant(self, node: Node) -> torch.Tensor:
        if node.name not in self._constants:
            array = node.attrs["value"].numpy()
            if array.dtype == object:
                raise ValueError(f"string constant {node.name!r} cannot be evaluated by the torch backend")
            self._constants[node.name] = torch.from_numpy(array.copy()).to(self.device)
        return self._constants[node.name]


@contextlib.contextmanager
def _exact_float32(device: torch.device):
    """TensorFlow's reference numbers are plain float32: turn off TF32 convolutions on CUDA."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _canonical(name: str) -> str:
    node, index = tensor_name(name)
    return f"{node}:{index}"


def _attr(node: Node, key: str, default=None):
    value = node.attrs.get(key, default)
    if value is None:
        raise ValueError(f"node {node.name!r} ({node.op}) has no attribute {key!r}")
    return value


def _require_nhwc(node: Node) -> None:
    if node.attrs.get("data_format", b"NHWC") not in (b"NHWC", "NHWC"):
        raise ValueError(f"node {node.name!r}: only data_format NHWC is supported")


def _spatial(node: Node, key: str, default=(1, 1, 1, 1)) -> tuple[int, int]:
    """(height, width) of an NHWC-ordered 4-list attribute (strides, ksize, dilations)."""
    _require_nhwc(node)
    values = list(_attr(node, key, default))
    if len(values) != 4 or values[0] != 1 or values[3] != 1:
        raise ValueError(f"node {node.name!r}: {key} {values} acts on batch or channels; unsupported")
    return values[1], values[2]


def _padding(node: Node, size, kernel, stride, dilation=(1, 1)) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding of TensorFlow's 'SAME' / 'VALID'."""
    mode = _attr(node, "padding")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "VALID":
        return 0, 0, 0, 0
    if mode != "SAME":
        raise ValueError(f"node {node.name!r}: padding {mode} is not supported")
    pads = []
    for n, k, s, d in zip(size, kernel, stride, dilation):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


def _as_nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _as_nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def _pad(x: torch.Tensor, pads, value=0.0) -> torch.Tensor:
    top, bottom, left, right = pads
    return F.pad(x, (left, right, top, bottom), value=value) if any(pads) else x


def _conv2d(node, x, weights):
    stride = _spatial(node, "strides")
    dilation = _spatial(node, "dilations")
    kernel = tuple(weights.shape[:2])
    pads = _padding(node, x.shape[1:3], kernel, stride, dilation)
    x = _as_nchw(x)
    filters = weights.permute(3, 2, 0, 1)  # TensorFlow's HWIO -> PyTorch's OIHW
    if pads[0] == pads[1] and pads[2] == pads[3]:
        out = F.conv2d(x, filters, stride=stride, dilation=dilation, padding=(pads[0], pads[2]))
    else:
        out = F.conv2d(_pad(x, pads), filters, stride=stride, dilation=dilation)
    return _as_nhwc(out)


def _max_pool(node, x):
    kernel, stride = _spatial(node, "ksize"), _spatial(node, "strides")
    pads = _padding(node, x.shape[1:3], kernel, stride)
    return _as_nhwc(F.max_pool2d(_pad(_as_nchw(x), pads, float("-inf")), kernel, stride))


def _avg_pool(node, x):
    kernel, stride = _spatial(node, "ksize"), _spatial(node, "strides")
    pads = _padding(node, x.shape[1:3], kernel, stride)
    x = _as_nchw(x)
    out = F.avg_pool2d(_pad(x, pads), kernel, stride)
    if any(pads):  # divide by the number of image pixels under the window, not the window size
        ones = torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
        out = out / F.avg_pool2d(_pad(ones, pads), kernel, stride)
    return _as_nhwc(out)


def _resize_bilinear(node, images, size):
    height, width = (int(v) for v in size.tolist())
    align_corners = bool(node.attrs.get("align_corners", False))
    half_pixel = bool(node.attrs.get("half_pixel_centers", False))
    images = images.float()
    top, bottom, y_lerp = _resize_weights(images.shape[1], height, align_corners, half_pixel, images.device)
    left, right, x_lerp = _resize_weights(images.shape[2], width, align_corners, half_pixel, images.device)
    y_lerp, x_lerp = y_lerp.view(1, -1, 1, 1), x_lerp.view(1, 1, -1, 1)
    upper_rows, lower_rows = images[:, top], images[:, bottom]
    upper = upper_rows[:, :, left] + (upper_rows[:, :, right] - upper_rows[:, :, left]) * x_lerp
    lower = lower_rows[:, :, left] + (lower_rows[:, :, right] - lower_rows[:, :, left]) * x_lerp
    return upper + (lower - upper) * y_lerp


def _resize_weights(in_size, out_size, align_corners, half_pixel, device):
    """Source indices below/above each output position and the weight of the one above."""
    if align_corners and out_size > 1:
        scale = (in_size - 1) / (out_size - 1)
    else:
        scale = in_size / out_size
    scale = torch.tensor(scale, dtype=torch.float32)
    positions = torch.arange(out_size, dtype=torch.float32)
    source = (positions + 0.5) * scale - 0.5 if half_pixel else positions * scale
    below = torch.floor(source)
    lerp = source - below
    lower = below.clamp(min=0).long()
    upper = torch.ceil(source).clamp(max=in_size - 1).long()
    return lower.to(device), upper.to(device), lerp.to(device)


def _batch_norm_global(node, x, mean, variance, beta, gamma):
    scale = torch.rsqrt(variance + float(_attr(node, "variance_epsilon")))
    if node.attrs.get("scale_after_normalization", False):
        scale = scale * gamma
    return torch.addcmul(beta, x - mean, scale)  # TF's (x - mean) * scale + beta, in two passes


def _bias_add(node, x, bias):
    _require_nhwc(node)
    return x + bias


def _matmul(node, a, b):
    if node.attrs.get("transpose_a", False):
        a = a.transpose(-2, -1)
    if node.attrs.get("transpose_b", False):
        b = b.transpose(-2, -1)
    return a @ b


OPS = {
    "CheckNumerics": lambda node, x: x,
    "ExpandDims": lambda node, x, dim: x.unsqueeze(int(dim)),
    "Reshape": lambda node, x, shape: x.reshape([int(v) for v in shape.tolist()]),
    "Concat": lambda node, axis, *values: torch.cat(values, dim=int(axis)),
    "Add": lambda node, x, y: x + y,
    "BiasAdd": _bias_add,
    "Sub": lambda node, x, y: x - y,
    "Mul": lambda node, x, y: x * y,
    "Relu": lambda node, x: torch.relu(x),
    "Softmax": lambda node, x: torch.softmax(x, dim=-1),
    "MatMul": _matmul,
    "Conv2D": _conv2d,
    "MaxPool": _max_pool,
    "AvgPool": _avg_pool,
    "ResizeBilinear": _resize_bilinear,
    "BatchNormWithGlobalNormalization": _batch_norm_global,
}
