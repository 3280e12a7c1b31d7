"""GGUF bytes spelled out field by field, from the format's specification (not gguf-py, not
QuantKit's reader), so tests can write files no well-behaved writer would: duplicate keys,
misaligned or overlapping data, wrongly typed alignment, invalid UTF-8, any version.

A file is a `Spec`; `encode(spec)` gives its bytes. Tensor offsets are relative to the
aligned start of the data section, as in GGUF.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import List, Tuple

# GGUF value type ids
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_FMT = {UINT8: "B", INT8: "b", UINT16: "H", INT16: "h", UINT32: "I", INT32: "i", FLOAT32: "f",
        BOOL: "?", UINT64: "Q", INT64: "q", FLOAT64: "d"}
# GGML type ids and (block_len, type_size) of the ones the tests use
GGML = {"F32": (0, 1, 4), "F16": (1, 1, 2), "Q8_0": (8, 32, 34), "Q4_0": (2, 32, 18),
        "BF16": (30, 1, 2)}


@dataclass
class KV:
    key: bytes  # bytes, so a test can store invalid UTF-8
    vtype: int
    value: object  # scalar, bytes (a string), or (item_type, [items] or uint8 bytes) for an array


@dataclass
class Tensor:
    name: bytes
    dims: Tuple[int, ...]  # GGUF order: innermost first
    type_id: int
    offset: int


@dataclass
class Spec:
    kvs: List[KV] = field(default_factory=list)
    tensors: List[Tensor] = field(default_factory=list)
    data: bytes = b""
    alignment: int = 32  # where the data section starts (general.alignment is a KV of its own)
    version: int = 3
    magic: bytes = b"GGUF"


def _string(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, value) -> bytes:
    if vtype == STRING:
        return _string(value)
    if vtype == ARRAY:
        item_type, items = value
        head = struct.pack("<IQ", item_type, len(items))
        if isinstance(items, bytes) and item_type == UINT8:  # a long array, fast
            return head + items
        if item_type in _FMT:
            return head + struct.pack(f"<{len(items)}{_FMT[item_type]}", *items)
        return head + b"".join(_value(item_type, v) for v in items)
    return struct.pack("<" + _FMT[vtype], value)


def encode(spec: Spec) -> bytes:
    out = bytearray(spec.magic + struct.pack("<IQQ", spec.version, len(spec.tensors), len(spec.kvs)))
    for kv in spec.kvs:
        out += _string(kv.key) + struct.pack("<I", kv.vtype) + _value(kv.vtype, kv.value)
    for t in spec.tensors:
        out += _string(t.name) + struct.pack("<I", len(t.dims))
        out += struct.pack(f"<{len(t.dims)}Q", *t.dims) + struct.pack("<IQ", t.type_id, t.offset)
    out += bytes(-len(out) % spec.alignment)
    return bytes(out) + spec.data


def nbytes(type_name: str, dims) -> int:
    _, block_len, type_size = GGML[type_name]
    n = 1
    for d in dims:
        n *= d
    return n // block_len * type_size


def valid_spec(tensors, kvs=(), alignment: int = 32) -> Spec:
    """A well-formed file: `tensors` is [(name, type name, GGUF dims)], laid out in order,
    each aligned; their data is a byte ramp."""
    spec = Spec(kvs=list(kvs), alignment=alignment)
    if alignment != 32:
        spec.kvs.append(KV(b"general.alignment", UINT32, alignment))
    offset = 0
    for name, type_name, dims in tensors:
        spec.tensors.append(Tensor(name.encode(), tuple(dims), GGML[type_name][0], offset))
        offset += -(-nbytes(type_name, dims) // alignment) * alignment
    spec.data = bytes(i % 251 for i in range(offset))
    return spec
