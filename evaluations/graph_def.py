"""Reading a frozen TensorFlow GraphDef (.pb) into plain Python: nodes, their inputs and attributes.

Two parsers give the same result (tests/test_evaluator_inception.py compares them): a small
reader of the wire format (protobuf_wire.py), the default, so that the PyTorch backend runs the
Inception graph without TensorFlow (and without the seconds importing it takes), and TensorFlow's
own protobuf classes (parser="tf"). Constant tensors are decoded lazily, on first
use, because a graph holds many that are never evaluated (e.g. the JPEG decoder's input).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from evaluations.inception_graph import import_tensorflow
from evaluations.protobuf_wire import (
    WireFormatError,
    as_signed64,
    parse_message,
    repeated_fixed,
    repeated_varints,
)

# TensorFlow DataType enum values and the NumPy types they hold.
DT_STRING = 7
DT_HALF = 19
NUMPY_DTYPES = {
    1: np.dtype("<f4"),
    2: np.dtype("<f8"),
    3: np.dtype("<i4"),
    4: np.dtype("u1"),
    5: np.dtype("<i2"),
    6: np.dtype("i1"),
    9: np.dtype("<i8"),
    10: np.dtype("?"),
    17: np.dtype("<u2"),
    DT_HALF: np.dtype("<f2"),
    22: np.dtype("<u4"),
    23: np.dtype("<u8"),
}


class TensorValue:
    """A constant tensor of the graph, decoded to a NumPy array on first access."""

    def __init__(self, decode: Callable[[], np.ndarray]):
        self._decode = decode
        self._array = None

    def numpy(self) -> np.ndarray:
        if self._array is None:
            self._array = self._decode()
        return self._array


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str]  # data inputs as "node" or "node:k"; control inputs ("^node") are dropped
    attrs: dict[str, Any] = field(default_factory=dict)


def read_graph_def(path, parser: str = "auto") -> dict[str, Node]:
    """The nodes of the GraphDef file at ``path`` by name; parser is 'auto' (= 'wire'), 'tf' or 'wire'."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"graph file {path} does not exist")
    if parser == "auto":
        parser = "wire"
    if parser not in ("tf", "wire"):
        raise ValueError(f"unknown GraphDef parser {parser!r}; use 'auto', 'tf' or 'wire'")
    data = path.read_bytes()
    if not data:
        raise ValueError(f"{path} is empty (0 bytes)")
    try:
        nodes = _nodes_from_tf_protos(data) if parser == "tf" else _nodes_from_wire(data)
    except (WireFormatError, UnicodeDecodeError, _protobuf_decode_error()) as exc:
        raise ValueError(f"{path} is not a TensorFlow GraphDef (.pb) file ({exc})") from None
    if not nodes:
        raise ValueError(f"{path} holds no graph nodes, so it is not a TensorFlow GraphDef (.pb) file")
    return nodes


def tensor_name(name: str) -> tuple[str, int]:
    """'node:k' -> ('node', k); a bare node name means output 0."""
    node, sep, index = name.rpartition(":")
    if sep and index.isdigit():
        return node, int(index)
    return name, 0


def _protobuf_decode_error():
    try:
        from google.protobuf.message import DecodeError
    except ImportError:
        return WireFormatError
    return DecodeError


def _data_inputs(inputs) -> list[str]:
    return [str(name) for name in inputs if not str(name).startswith("^")]


# --- the wire-format parser -----------------------------------------------------------------


def _nodes_from_wire(data: bytes) -> dict[str, Node]:
    nodes = {}
    for payload in parse_message(data).get(1, []):  # GraphDef.node
        fields = parse_message(payload)
        attrs = {}
        for entry in fields.get(5, []):  # NodeDef.attr: map<string, AttrValue>
            entry_fields = parse_message(entry)
            key = _text(entry_fields.get(1, [b""])[-1])
            attrs[key] = _wire_attr(parse_message(entry_fields[2][-1]) if 2 in entry_fields else {})
        node = Node(
            name=_text(fields.get(1, [b""])[-1]),
            op=_text(fields.get(2, [b""])[-1]),
            inputs=_data_inputs(_text(p) for p in fields.get(3, [])),
            attrs=attrs,
        )
        nodes[node.name] = node
    return nodes


def _text(payload) -> str:
    return bytes(payload).decode("utf-8")


def _wire_attr(fields: dict):
    """An AttrValue message: list=1, s=2, i=3, f=4, b=5, type=6, shape=7, tensor=8."""
    if 1 in fields:
        return _wire_attr_list(parse_message(fields[1][-1]))
    if 2 in fields:
        return bytes(fields[2][-1])
    if 3 in fields:
        return as_signed64(fields[3][-1])
    if 4 in fields:
        return float(repeated_fixed(fields[4][-1:], "<f4")[0])
    if 5 in fields:
        return bool(fields[5][-1])
    if 6 in fields:
        return fields[6][-1]
    if 7 in fields:
        return _wire_shape(parse_message(fields[7][-1]))
    if 8 in fields:
        tensor_fields = parse_message(fields[8][-1])
        return TensorValue(lambda: _wire_tensor(tensor_fields))
    return None  # func and placeholder attributes: not used by the ops we run


def _wire_attr_list(fields: dict) -> list:
    """ListValue: s=2, i=3, f=4, b=5, type=6, shape=7, tensor=8 (one of them is filled)."""
    if 2 in fields:
        return [bytes(p) for p in fields[2]]
    if 3 in fields:
        return [as_signed64(v) for v in repeated_varints(fields[3])]
    if 4 in fields:
        return [float(v) for v in repeated_fixed(fields[4], "<f4")]
    if 5 in fields:
        return [bool(v) for v in repeated_varints(fields[5])]
    if 6 in fields:
        return repeated_varints(fields[6])
    if 7 in fields:
        return [_wire_shape(parse_message(p)) for p in fields[7]]
    if 8 in fields:
        return [TensorValue(lambda f=parse_message(p): _wire_tensor(f)) for p in fields[8]]
    return []


def _wire_shape(fields: dict):
    """TensorShapeProto: dim=2 (each with size=1), unknown_rank=3; None when the rank is unknown."""
    if fields.get(3, [0])[-1]:
        return None
    return tuple(as_signed64(parse_message(dim).get(1, [0])[-1]) for dim in fields.get(2, []))


def _wire_tensor(fields: dict) -> np.ndarray:
    """TensorProto: dtype=1, tensor_shape=2, tensor_content=4, or one typed repeated value field."""
    dtype_enum = fields.get(1, [0])[-1]
    shape = _wire_shape(parse_message(fields[2][-1])) if 2 in fields else ()
    if dtype_enum == DT_STRING:
        values = np.array([bytes(p) for p in fields.get(8, [])], dtype=object)
        return _fill(values, shape)
    if dtype_enum not in NUMPY_DTYPES:
        raise ValueError(f"constant tensors of TensorFlow dtype {dtype_enum} are not supported")
    dtype = NUMPY_DTYPES[dtype_enum]
    if 4 in fields:
        return np.frombuffer(bytearray(fields[4][-1]), dtype=dtype).reshape(shape)
    if dtype == np.float32:
        values = repeated_fixed(fields.get(5, []), "<f4")
    elif dtype == np.float64:
        values = repeated_fixed(fields.get(6, []), "<f8")
    elif dtype_enum == DT_HALF:
        values = np.array(repeated_varints(fields.get(13, [])), dtype=np.uint16).view(np.float16)
    else:
        number = {np.dtype("<i8"): 10, np.dtype("?"): 11, np.dtype("<u4"): 16, np.dtype("<u8"): 17}
        raw = repeated_varints(fields.get(number.get(dtype, 7), []))
        signed = dtype.kind == "i"
        values = np.array([as_signed64(v) if signed else v for v in raw], dtype=dtype)
    return _fill(values.astype(dtype), shape)


def _fill(values: np.ndarray, shape) -> np.ndarray:
    """TensorFlow's rule for short value lists: the last value repeats to fill the shape."""
    count = int(np.prod(shape, dtype=np.int64))
    if values.size > count:
        raise ValueError(f"constant tensor holds {values.size} values for shape {shape}")
    if values.size == 0:
        values = np.zeros(count, dtype=values.dtype)
    elif values.size < count:
        values = np.concatenate([values, np.repeat(values[-1:], count - values.size)])
    return values.reshape(shape)


# --- TensorFlow's own protobuf classes ------------------------------------------------------


def _nodes_from_tf_protos(data: bytes) -> dict[str, Node]:
    tf = import_tensorflow()
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(data)
    nodes = {}
    for proto in graph_def.node:
        attrs = {key: _proto_attr(tf, value) for key, value in proto.attr.items()}
        nodes[proto.name] = Node(proto.name, proto.op, _data_inputs(proto.input), attrs)
    return nodes


def _proto_attr(tf, value):
    kind = value.WhichOneof("value")
    if kind == "list":
        items = value.list
        for name in ("s", "i", "f", "b", "type"):
            if len(getattr(items, name)):
                return list(getattr(items, name))
        if len(items.shape):
            return [_proto_shape(s) for s in items.shape]
        if len(items.tensor):
            return [TensorValue(lambda t=t: tf.make_ndarray(t)) for t in items.tensor]
        return []
    if kind == "shape":
        return _proto_shape(value.shape)
    if kind == "tensor":
        return TensorValue(lambda t=value.tensor: tf.make_ndarray(t))
    if kind in ("s", "i", "f", "b", "type"):
        return getattr(value, kind)
    return None


def _proto_shape(shape):
    if shape.unknown_rank:
        return None
    return tuple(int(dim.size) for dim in shape.dim)
