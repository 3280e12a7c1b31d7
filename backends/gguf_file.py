"""Reading and writing .gguf files with gguf-py, safely.

Reading memory-maps the file. Before gguf-py parses it, the header is walked once with
bounds checks, so a truncated or corrupt file (or one with a tensor type we cannot
decode) fails with a message naming the file and the tensor instead of a KeyError,
an IndexError or a parser stuck on a bogus array length.

GGUF lists dimensions innermost first; everything here uses torch order. A quantized
tensor whose last dimension is not a whole number of blocks (a conv weight) is stored
as [rows, row_bytes] with its real shape under `comfy.gguf.orig_shape.<name>`, the
convention of ComfyUI-GGUF.
"""
from __future__ import annotations

import logging
import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from .errors import BackendUnavailable, FormatUnsupported, MalformedFile
from .gguf_dequant import BLOCK_SIZES, FLOAT_TYPES

log = logging.getLogger(__name__)

GGUF_REQUIREMENT = "gguf>=0.10.0"
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."
SUPPORTED_TYPES = (*FLOAT_TYPES, *BLOCK_SIZES)
_FLOAT_LAYOUT = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2)}  # (block_len, type_size)
_REDO = "Download or export the file again."


@dataclass
class GGUFTensor:
    name: str
    qtype: str  # "Q4_K", "F16", ...
    shape: Tuple[int, ...]  # logical shape, torch order
    # quantized: uint8 [rows, row_bytes], rows = shape[0] when a row is whole blocks;
    # F32/F16/BF16: a float tensor of `shape`. Memory-mapped (copy-on-write) either way.
    data: torch.Tensor


@dataclass
class GGUFContents:
    path: str
    metadata: Dict[str, Any]  # plain python values; orig_shape keys are folded into shapes
    architecture: Optional[str]
    tensors: Dict[str, GGUFTensor]


def _gguf():
    try:
        import gguf
    except Exception as exc:  # missing or broken install
        raise BackendUnavailable(f"Reading or writing .gguf files needs the Python package "
                                 f"'{GGUF_REQUIREMENT}' ({type(exc).__name__}: {exc}). In "
                                 f"ComfyUI's Python run: python -m pip install "
                                 f"\"{GGUF_REQUIREMENT}\"") from None
    return gguf


# -- header check -------------------------------------------------------------------------
# GGUF value type ids -> byte size of one scalar (8 = string, 9 = array)
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MAX_DIMS = 8  # ggml uses 4; allow some room, reject nonsense


class _Cursor:
    def __init__(self, buf, path: str):
        self.buf, self.path, self.pos = buf, path, 0

    def past_end(self, what: str) -> MalformedFile:
        return MalformedFile(f"{self.path}: {what} at byte {self.pos} runs past the end of the "
                             f"file ({len(self.buf)} bytes): the file is truncated or corrupt. "
                             f"{_REDO}")

    def take(self, n: int, what: str) -> int:
        if self.pos + n > len(self.buf):
            raise self.past_end(what)
        start, self.pos = self.pos, self.pos + n
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8, what))[0]

    def text(self, what: str) -> str:
        n = self.u64(what)
        start = self.take(n, what)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedFile(f"{self.path}: {what} at byte {start} is not valid UTF-8: the "
                                f"file is corrupt. {_REDO}") from None

    def skip_value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype in _SCALAR_SIZES:
            self.take(_SCALAR_SIZES[vtype], what)
        elif vtype == _STRING:
            self.take(self.u64(what), what)
        elif vtype == _ARRAY and depth < 4:
            item_type, count = self.u32(what), self.u64(what)
            if item_type in _SCALAR_SIZES:
                self.take(count * _SCALAR_SIZES[item_type], what)
                return
            # each string or nested array takes >= 8 bytes: a bogus count fails here, not
            # after looping over it
            if count * 8 > len(self.buf) - self.pos:
                raise self.past_end(what)
            for _ in range(count):
                self.skip_value(item_type, what, depth + 1)
        else:
            raise MalformedFile(f"{self.path}: {what} has value type {vtype}, which GGUF does not "
                                f"define: the file is corrupt or from an unknown GGUF variant.")


def _type_name(type_id: int) -> Optional[str]:
    try:
        return _gguf().GGMLQuantizationType(type_id).name
    except ValueError:
        return None


def _gguf_py_layout(qtype: str) -> Optional[tuple]:
    """(block_len, type_size) of a type only gguf-py decodes, or None."""
    gguf = _gguf()
    kind = getattr(gguf.GGMLQuantizationType, qtype, None)
    return gguf.GGML_QUANT_SIZES.get(kind) if kind is not None and qtype not in FLOAT_TYPES else None


_DECODED_BY_GGUF_PY: set = set()  # types already announced in the log


def _decoded_by_gguf_py(path: str, rt, shape: Tuple[int, ...]) -> GGUFTensor:
    """A tensor of a type QuantKit has no decoder for, decoded once at load by gguf-py (in
    numpy, on the CPU: slow) and kept as F16."""
    qtype = rt.tensor_type.name
    try:
        values = _gguf().quants.dequantize(rt.data, rt.tensor_type)
    except NotImplementedError:
        raise FormatUnsupported(f"{path}: tensor '{rt.name}' is stored as {qtype}, which the "
                                f"installed gguf package cannot decode. Update it (pip install -U "
                                f"gguf) or use a file quantized to {', '.join(SUPPORTED_TYPES)}.") from None
    if qtype not in _DECODED_BY_GGUF_PY:
        _DECODED_BY_GGUF_PY.add(qtype)
        log.warning("QuantKit: GGUF type %s has no QuantKit decoder; its tensors are decoded by "
                    "gguf-py once at load (slow) and kept in fp16 (more memory than the file).", qtype)
    return GGUFTensor(rt.name, "F16", shape, torch.from_numpy(values).to(torch.float16).reshape(shape))


def _check_layout(buf, path: str) -> None:
    """Walks magic, version, metadata and tensor table with bounds checks; checks every
    tensor's type and that its data lies inside the file."""
    if bytes(buf[:4]) != b"GGUF":
        raise MalformedFile(f"{path} is not a GGUF file: it starts with {bytes(buf[:4])!r}, not "
                            f"b'GGUF'. Choose a .gguf model file; {_REDO}")
    cur = _Cursor(buf, path)
    cur.take(4, "magic")
    version = cur.u32("the version")
    if version & 0xFFFF == 0:
        raise FormatUnsupported(f"{path} is a big-endian GGUF file, which is not supported. "
                                f"Convert it to little-endian (gguf-py's gguf_convert_endian).")
    if version not in (2, 3):
        raise FormatUnsupported(f"{path} is GGUF version {version}; versions 2 and 3 are "
                                f"supported. Update the 'gguf' package or re-export the file.")
    n_tensors, n_kv = cur.u64("the tensor count"), cur.u64("the metadata count")
    if n_tensors > len(buf) or n_kv > len(buf):
        raise MalformedFile(f"{path} declares {n_tensors} tensors and {n_kv} metadata entries, "
                            f"more than its {len(buf)} bytes can hold: the file is corrupt. "
                            f"{_REDO}")
    alignment = 32
    for i in range(n_kv):
        key = cur.text(f"metadata entry {i}")
        vtype = cur.u32(f"metadata '{key}'")
        if key == "general.alignment" and vtype == _UINT32:
            alignment = struct.unpack_from("<I", buf, cur.pos)[0] if cur.pos + 4 <= len(buf) else 0
        cur.skip_value(vtype, f"metadata '{key}'")
    if alignment <= 0 or alignment & (alignment - 1):
        raise MalformedFile(f"{path}: general.alignment is {alignment}, not a power of two: the "
                            f"file is corrupt. {_REDO}")
    extents = []
    for i in range(n_tensors):
        name = cur.text(f"tensor {i}'s name")
        what = f"tensor '{name}'"
        n_dims = cur.u32(what)
        if not 1 <= n_dims <= _MAX_DIMS:
            raise MalformedFile(f"{path}: {what} has {n_dims} dimensions: the file is corrupt. "
                                f"{_REDO}")
        dims = [cur.u64(what) for _ in range(n_dims)]
        type_id = cur.u32(what)
        offset = cur.u64(what)
        qtype = _type_name(type_id)
        if qtype is None:
            raise FormatUnsupported(f"{path}: {what} has GGML type id {type_id}, unknown to the "
                                    f"installed gguf package. Update it (pip install -U gguf) or "
                                    f"re-export the model with a supported type.")
        layout = BLOCK_SIZES.get(qtype) or _FLOAT_LAYOUT.get(qtype) or _gguf_py_layout(qtype)
        if layout is None:
            raise FormatUnsupported(f"{path}: {what} is stored as {qtype}, which neither QuantKit "
                                    f"nor the installed gguf package can decode (QuantKit reads "
                                    f"{', '.join(SUPPORTED_TYPES)}). Use a file quantized to one "
                                    f"of these types.")
        block_len, type_size = layout
        if dims[0] % block_len:
            raise MalformedFile(f"{path}: {what} is {qtype} but its row length {dims[0]} is not a "
                                f"multiple of the block size {block_len}: the file is corrupt. "
                                f"{_REDO}")
        extents.append((what, offset, math.prod(dims) // block_len * type_size))
    data_start = -(-cur.pos // alignment) * alignment
    for what, offset, nbytes in extents:
        end = data_start + offset + nbytes
        if end > len(buf):
            raise MalformedFile(f"{path}: the data of {what} ends at byte {end}, past the end of "
                                f"the file ({len(buf)} bytes): the file is truncated. {_REDO}")


def _check_file(path: str) -> None:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:  # magic, version and the two counts
                head = f.read(4)
                if head != b"GGUF":
                    raise MalformedFile(f"{path} is not a GGUF file ({size} bytes, starts with "
                                        f"{head!r}). Choose a .gguf model file; {_REDO}")
                raise MalformedFile(f"{path} is only {size} bytes, too short for a GGUF header: "
                                    f"the file is truncated. {_REDO}")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                _check_layout(buf, path)
    except OSError as exc:
        raise MalformedFile(f"Cannot open {path}: {exc.strerror or exc}. Check the path and "
                            f"the file's permissions.") from None


# -- reading ----------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") else value


def _orig_shape(path: str, name: str, value: Any, n_elements: int) -> Tuple[int, ...]:
    ok = isinstance(value, list) and all(isinstance(d, int) and d > 0 for d in value)
    if not ok or math.prod(value) != n_elements:
        raise MalformedFile(f"{path}: {ORIG_SHAPE_PREFIX}{name} is {value!r}, which is not a shape "
                            f"holding the tensor's {n_elements} values: the file is corrupt. "
                            f"{_REDO}")
    return tuple(value)


def _tensor_data(rt, qtype: str, shape: Tuple[int, ...]) -> torch.Tensor:
    flat = torch.from_numpy(rt.data)  # copy-on-write map: writable, so no copy and no warning
    if qtype in FLOAT_TYPES:
        if qtype == "BF16":  # numpy has no bfloat16: gguf-py hands over the bytes
            flat = flat.contiguous().view(torch.bfloat16)
        return flat.reshape(shape)
    block_len, type_size = BLOCK_SIZES[qtype]
    width = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    if width % block_len == 0:
        return flat.reshape(-1, width // block_len * type_size)
    return flat.reshape(-1, flat.shape[-1])


def read_gguf(path) -> GGUFContents:
    """Memory-maps a .gguf file; see GGUFTensor for what each tensor holds."""
    path = os.fspath(path)
    gguf = _gguf()
    _check_file(path)
    try:
        reader = gguf.GGUFReader(path, mode="c")
        metadata = {name: _plain(field.contents()) for name, field in reader.fields.items()
                    if not name.startswith("GGUF.")}
        orig_shapes = {k[len(ORIG_SHAPE_PREFIX):]: metadata.pop(k) for k in list(metadata)
                       if k.startswith(ORIG_SHAPE_PREFIX)}
        tensors = {}
        for rt in reader.tensors:
            qtype = rt.tensor_type.name
            shape = tuple(int(d) for d in reversed(rt.shape.tolist()))
            if rt.name in orig_shapes:
                shape = _orig_shape(path, rt.name, orig_shapes[rt.name], int(rt.n_elements))
            if qtype in SUPPORTED_TYPES:
                tensors[rt.name] = GGUFTensor(rt.name, qtype, shape, _tensor_data(rt, qtype, shape))
            else:
                tensors[rt.name] = _decoded_by_gguf_py(path, rt, shape)
    except (MalformedFile, FormatUnsupported):
        raise
    except Exception as exc:  # anything gguf-py trips over that the header walk let through
        raise MalformedFile(f"{path} could not be parsed as GGUF ({type(exc).__name__}: {exc}). "
                            f"The file is corrupt or uses an unsupported GGUF variant. "
                            f"{_REDO}") from None
    arch = metadata.get("general.architecture")
    log.info("read %s: %d tensors, architecture %s", path, len(tensors), arch)
    return GGUFContents(path, metadata, arch if isinstance(arch, str) else None, tensors)


# -- writing ----------------------------------------------------------------------------
def _int_type(gguf, values) -> Any:
    t = gguf.GGUFValueType
    if all(-2**31 <= v < 2**31 for v in values):
        return t.INT32
    if all(-2**63 <= v < 2**63 for v in values):
        return t.INT64
    return t.UINT64


def _value_type(gguf, key: str, value: Any):
    """(value type, array item type or None) for a plain python value."""
    t = gguf.GGUFValueType
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if all(isinstance(v, bool) for v in items):
        item = t.BOOL
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        item = _int_type(gguf, items)
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
        item = t.FLOAT32
    elif all(isinstance(v, str) for v in items):
        item = t.STRING
    else:
        raise FormatUnsupported(f"GGUF metadata '{key}' = {value!r:.80} cannot be stored: GGUF "
                                f"holds bool, int, float, str and flat lists of one of them.")
    return (t.ARRAY, item) if isinstance(value, (list, tuple)) else (item, None)


def _tensor_array(name: str, qtype: str, data: torch.Tensor, shape: Tuple[int, ...]):
    """-> (numpy array to write, its raw GGML type or None, stored shape differs from shape)."""
    gguf = _gguf()
    n = math.prod(shape)
    if qtype in FLOAT_TYPES:
        data = data.detach().to("cpu", FLOAT_TYPES[qtype]).contiguous()
        if data.numel() != n:
            raise MalformedFile(f"Cannot write tensor '{name}': it has {data.numel()} values but "
                                f"its shape {list(shape)} needs {n}.")
        data = data.reshape(shape)
        if qtype == "BF16":
            return data.view(torch.uint8).numpy(), gguf.GGMLQuantizationType.BF16, False
        return data.numpy(), None, False
    if qtype not in BLOCK_SIZES:
        raise FormatUnsupported(f"Cannot write tensor '{name}' as '{qtype}'; supported types: "
                                f"{', '.join(SUPPORTED_TYPES)}.")
    block_len, type_size = BLOCK_SIZES[qtype]
    data = data.detach().to("cpu").contiguous()
    if data.dtype != torch.uint8 or n % block_len or data.numel() != n // block_len * type_size:
        raise MalformedFile(f"Cannot write tensor '{name}': {qtype} data for shape {list(shape)} "
                            f"must be {n // block_len * type_size} packed bytes (uint8), got "
                            f"{data.numel()} of {data.dtype}. Quantize it with gguf_quantize.")
    raw_type = gguf.GGMLQuantizationType[qtype]
    if shape[-1] % block_len == 0:
        byte_shape = (*shape[:-1], shape[-1] // block_len * type_size)
        return data.reshape(byte_shape).numpy(), raw_type, False
    # a row that is not whole blocks (a conv weight): keep the given [rows, row_bytes]
    row_bytes = data.shape[-1] if data.dim() == 2 and data.shape[-1] % type_size == 0 else type_size
    return data.reshape(-1, row_bytes).numpy(), raw_type, True


def write_gguf(path, tensors: Mapping[str, tuple], metadata: Optional[Mapping[str, Any]] = None,
               arch: str = "unknown") -> None:
    """tensors: name -> (qtype, data, torch shape); data as in GGUFTensor. Metadata values
    are plain python (floats are stored as float32). Writes atomically (temp file + rename)."""
    gguf = _gguf()
    path = os.fspath(path)
    tmp = path + ".partial"
    writer = gguf.GGUFWriter(tmp, arch)
    quantized = False
    try:
        for key, value in (metadata or {}).items():
            if key == "general.architecture":
                continue  # the writer stores `arch` there
            if isinstance(value, (list, tuple)) and not value:
                log.warning("GGUF metadata '%s' is an empty list, which GGUF cannot store; "
                            "skipped", key)
                continue
            vtype, item = _value_type(gguf, key, value)
            writer.add_key_value(key, list(value) if item else value, vtype, sub_type=item)
        for name, (qtype, data, shape) in tensors.items():
            shape = tuple(int(s) for s in shape)
            array, raw_type, reshaped = _tensor_array(name, qtype, data, shape)
            if reshaped:
                writer.add_key_value(ORIG_SHAPE_PREFIX + name, list(shape),
                                     gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
            quantized |= qtype in BLOCK_SIZES
            writer.add_tensor(name, array, raw_dtype=raw_type)
        if quantized and "general.quantization_version" not in (metadata or {}):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    log.info("wrote %s: %d tensors", path, len(tensors))
