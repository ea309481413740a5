"""Decoding of the protobuf wire format: just enough to read a TensorFlow GraphDef without TensorFlow.

A message is a sequence of (field number, wire type, payload). Payloads are returned raw: an int
for varints, a memoryview for length-delimited and fixed-width fields; the schema (graph_def.py)
says how to interpret them. Repeated numeric fields may be packed or not; both are accepted.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5


class WireFormatError(ValueError):
    pass


def read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """The unsigned varint at ``pos`` and the position after it."""
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise WireFormatError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise WireFormatError("varint longer than 10 bytes")


def as_signed64(value: int) -> int:
    """int32/int64 fields hold negative numbers as 64-bit two's complement varints."""
    return value - (1 << 64) if value >= 1 << 63 else value


def parse_message(buf) -> dict[int, list]:
    """{field number: [payload, ...]} for one message, in the order the fields appear."""
    buf = memoryview(buf)
    fields: dict[int, list] = defaultdict(list)
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == VARINT:
            value, pos = read_varint(buf, pos)
        elif wire_type == LENGTH_DELIMITED:
            length, pos = read_varint(buf, pos)
            value = buf[pos : pos + length]
            pos += length
        elif wire_type in (FIXED32, FIXED64):
            width = 4 if wire_type == FIXED32 else 8
            value = buf[pos : pos + width]
            pos += width
        else:
            raise WireFormatError(f"unsupported wire type {wire_type} in field {number}")
        if pos > len(buf):
            raise WireFormatError(f"field {number} runs past the end of its message")
        fields[number].append(value)
    return fields


def repeated_varints(payloads: list) -> list[int]:
    """A repeated integer field: unpacked entries are ints, packed ones are byte runs of varints."""
    values = []
    for payload in payloads:
        if isinstance(payload, int):
            values.append(payload)
            continue
        pos = 0
        while pos < len(payload):
            value, pos = read_varint(payload, pos)
            values.append(value)
    return values


def repeated_fixed(payloads: list, dtype: str) -> np.ndarray:
    """A repeated float ('<f4') or double ('<f8') field, packed or not."""
    return np.frombuffer(b"".join(bytes(p) for p in payloads), dtype=dtype)
