"""The header of a .gguf file, parsed and checked before any tensor is touched.

Untrusted files are the norm (models come from the internet), so this parser, not
gguf-py's reader, walks the bytes: every read is bounds-checked against the file, every
problem is a MalformedFile or FormatUnsupported naming the file and the key or tensor,
and nothing grows faster than the file. gguf-py builds one numpy object per array item,
which made a 1 MiB metadata array take 13 s and 0.7 GiB; here an array longer than
MAX_ARRAY_ITEMS is checked and skipped, and kept as a LongArray placeholder.

Tensor checks: a known type, whole blocks per row, no dimension of 0, data aligned to
general.alignment, inside the file, and not overlapping another tensor's.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ..engine.errors import FormatUnsupported, MalformedFile
from .library import gguf_py
from .types import GGML_TYPES

REDO = "Download or export the file again."
MAX_ARRAY_ITEMS = 4096  # longer metadata arrays (tokenizer vocabularies) are not materialised
MAX_DIMS = 8  # ggml uses 4; allow some room, reject nonsense
_MAX_NESTING = 4

# GGUF value type id -> (name, struct format); 8 = string, 9 = array
_SCALARS = {0: ("uint8", "B"), 1: ("int8", "b"), 2: ("uint16", "H"), 3: ("int16", "h"),
            4: ("uint32", "I"), 5: ("int32", "i"), 6: ("float32", "f"), 7: ("bool", "?"),
            10: ("uint64", "Q"), 11: ("int64", "q"), 12: ("float64", "d")}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


@dataclass(frozen=True)
class LongArray:
    """A metadata array too long to be worth reading (QuantKit uses none this long)."""
    item_type: str
    length: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: str
    stored_shape: Tuple[int, ...]  # torch order, as the file stores it
    start: int  # absolute byte offset of the data in the file
    nbytes: int


@dataclass(frozen=True)
class Header:
    version: int
    alignment: int
    metadata: Dict[str, Any]
    tensors: List[TensorInfo]


class _Cursor:
    def __init__(self, buf, path: str):
        self.buf, self.path, self.pos = buf, path, 0

    def error(self, problem: str) -> MalformedFile:
        return MalformedFile(f"{self.path}: {problem}: the file is corrupt. {REDO}")

    def take(self, n: int, what: str) -> int:
        if self.pos + n > len(self.buf):
            raise MalformedFile(f"{self.path}: {what} at byte {self.pos} runs past the end of the "
                                f"file ({len(self.buf)} bytes): the file is truncated or corrupt. "
                                f"{REDO}")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, fmt: str, what: str):
        return struct.unpack_from("<" + fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def text(self, what: str) -> str:
        n = self.scalar("Q", what)
        start = self.take(n, what)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} (string at byte {start}) is not valid UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype][1], what)
        if vtype == _STRING:
            return self.text(what)
        if vtype == _ARRAY:
            return self.array(what, depth)
        raise MalformedFile(f"{self.path}: {what} has value type {vtype}, which GGUF does not "
                            f"define: the file is corrupt or from an unknown GGUF variant. {REDO}")

    def array(self, what: str, depth: int) -> Any:
        if depth >= _MAX_NESTING:
            raise self.error(f"{what} nests arrays more than {_MAX_NESTING} deep")
        item_type, count = self.scalar("I", what), self.scalar("Q", what)
        if item_type in _SCALARS:
            name, fmt = _SCALARS[item_type]
            start = self.take(count * struct.calcsize(fmt), what)
            if count > MAX_ARRAY_ITEMS:
                return LongArray(name, count)
            return list(struct.unpack_from(f"<{count}{fmt}", self.buf, start))
        if item_type not in (_STRING, _ARRAY):
            self.value(item_type, what)  # raises: an undefined type
        # each string or nested array takes >= 8 bytes: a bogus count fails here, not after
        # looping over it
        if count * 8 > len(self.buf) - self.pos:
            self.take(count * 8, what)
        if count > MAX_ARRAY_ITEMS:
            for _ in range(count):  # checked (bounds, UTF-8) but not kept
                self.value(item_type, what, depth + 1)
            return LongArray("string" if item_type == _STRING else "array", count)
        return [self.value(item_type, what, depth + 1) for _ in range(count)]


def type_name(type_id: int) -> Optional[str]:
    try:
        return gguf_py().GGMLQuantizationType(type_id).name
    except ValueError:
        return None


def layout(qtype: str) -> Optional[Tuple[int, int]]:
    """(block_len, type_size) of a type QuantKit or gguf-py decodes, or None."""
    known = GGML_TYPES.get(qtype)
    if known is not None:
        return known.block_len, known.type_size
    gguf = gguf_py()
    return gguf.GGML_QUANT_SIZES.get(getattr(gguf.GGMLQuantizationType, qtype))


def _start(buf, path: str) -> Tuple[_Cursor, int]:
    if bytes(buf[:4]) != b"GGUF":
        raise MalformedFile(f"{path} is not a GGUF file: it starts with {bytes(buf[:4])!r}, not "
                            f"b'GGUF'. Choose a .gguf model file; {REDO}")
    cur = _Cursor(buf, path)
    cur.take(4, "magic")
    version = cur.scalar("I", "the version")
    if version == 0:
        raise cur.error("the GGUF version is 0, which no GGUF writer produces")
    if version & 0xFFFF == 0:  # 2 or 3 written big-endian reads as 0x02000000, 0x03000000
        raise FormatUnsupported(f"{path} is a big-endian GGUF file, which is not supported. "
                                f"Convert it to little-endian (gguf-py's gguf_convert_endian).")
    if version not in (2, 3):
        raise FormatUnsupported(f"{path} is GGUF version {version}; versions 2 and 3 are "
                                f"supported. Update the 'gguf' package or re-export the file.")
    return cur, version


def _metadata(cur: _Cursor, n_kv: int) -> Tuple[Dict[str, Any], int]:
    metadata: Dict[str, Any] = {}
    alignment = 32
    for i in range(n_kv):
        key = cur.text(f"metadata entry {i}'s key")
        if key in metadata:
            raise cur.error(f"metadata key '{key}' appears twice")
        vtype = cur.scalar("I", f"metadata '{key}'")
        metadata[key] = cur.value(vtype, f"metadata '{key}'")
        if key == "general.alignment":
            if vtype != _UINT32:
                stored = {_STRING: "string", _ARRAY: "array"}.get(vtype) or _SCALARS[vtype][0]
                raise cur.error(f"general.alignment is stored as {stored}, not uint32")
            alignment = metadata[key]
    if alignment <= 0 or alignment & (alignment - 1):
        raise cur.error(f"general.alignment is {alignment}, not a power of two")
    return metadata, alignment


def _tensor_info(cur: _Cursor, path: str, i: int) -> Tuple[str, str, Tuple[int, ...], int, int]:
    name = cur.text(f"tensor {i}'s name")
    what = f"tensor '{name}'"
    n_dims = cur.scalar("I", what)
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.error(f"{what} has {n_dims} dimensions")
    dims = [cur.scalar("Q", what) for _ in range(n_dims)]  # innermost first
    type_id, offset = cur.scalar("I", what), cur.scalar("Q", what)
    qtype = type_name(type_id)
    if qtype is None:
        raise FormatUnsupported(f"{path}: {what} has GGML type id {type_id}, unknown to the "
                                f"installed gguf package. Update it (pip install -U gguf) or "
                                f"re-export the model with a supported type.")
    lay = layout(qtype)
    if lay is None:
        raise FormatUnsupported(f"{path}: {what} is stored as {qtype}, which neither QuantKit "
                                f"nor the installed gguf package can decode (QuantKit reads "
                                f"{', '.join(GGML_TYPES)}). Use a file "
                                f"quantized to one of these types.")
    if 0 in dims:
        raise cur.error(f"{what} has a dimension of 0 (shape {list(reversed(dims))}), so it "
                        f"holds no data")
    block_len, type_size = lay
    if dims[0] % block_len:
        raise cur.error(f"{what} is {qtype} but its row length {dims[0]} is not a multiple of "
                        f"the block size {block_len}")
    return name, qtype, tuple(reversed(dims)), offset, math.prod(dims) // block_len * type_size


def _check_extents(path: str, size: int, tensors: List[TensorInfo]) -> None:
    end_of = {}
    for t in tensors:
        end = t.start + t.nbytes
        if end > size:
            raise MalformedFile(f"{path}: the data of tensor '{t.name}' ends at byte {end}, past "
                                f"the end of the file ({size} bytes): the file is truncated. "
                                f"{REDO}")
        end_of[t.name] = end
    previous = None
    for t in sorted(tensors, key=lambda t: t.start):
        if previous is not None and t.start < end_of[previous.name]:
            raise MalformedFile(f"{path}: the data of tensors '{previous.name}' (bytes "
                                f"{previous.start}-{end_of[previous.name]}) and '{t.name}' (from "
                                f"byte {t.start}) overlap: the file is corrupt. {REDO}")
        previous = t


def parse_header(buf, path: str) -> Header:
    """Parses and checks everything but the tensor bytes themselves (see the module doc)."""
    cur, version = _start(buf, path)
    n_tensors, n_kv = cur.scalar("Q", "the tensor count"), cur.scalar("Q", "the metadata count")
    if n_tensors > len(buf) or n_kv > len(buf):
        raise cur.error(f"it declares {n_tensors} tensors and {n_kv} metadata entries, more "
                        f"than its {len(buf)} bytes can hold")
    metadata, alignment = _metadata(cur, n_kv)
    infos, names = [], set()
    for i in range(n_tensors):
        info = _tensor_info(cur, path, i)
        if info[0] in names:
            raise cur.error(f"tensor name '{info[0]}' appears twice")
        names.add(info[0])
        infos.append(info)
    data_start = -(-cur.pos // alignment) * alignment
    tensors = []
    for name, qtype, shape, offset, nbytes in infos:
        if offset % alignment:
            raise cur.error(f"the data of tensor '{name}' starts at offset {offset}, not a "
                            f"multiple of the file's alignment ({alignment} bytes)")
        tensors.append(TensorInfo(name, qtype, shape, data_start + offset, nbytes))
    _check_extents(path, len(buf), tensors)
    return Header(version, alignment, metadata, tensors)
