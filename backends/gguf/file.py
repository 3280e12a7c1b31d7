"""Reading and writing .gguf files with gguf-py, safely.

Reading memory-maps the file; gguf_header parses and checks the header first (not gguf-py's
reader: see there why), so a truncated, corrupt or hostile file (or one with a tensor type
we cannot decode) fails with a message naming the file and the tensor.

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
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from ..engine.errors import FormatUnsupported, MalformedFile
from .header import MAX_DIMS, REDO as _REDO, TensorInfo as GGUFTensorInfo, parse_header
from .library import GGUF_REQUIREMENT, gguf_py as _gguf
from .types import BLOCK_SIZES, FLOAT_TYPES, GGML_TYPES

log = logging.getLogger(__name__)

ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."
SUPPORTED_TYPES = tuple(GGML_TYPES)


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
    # plain python values (an array longer than gguf_header.MAX_ARRAY_ITEMS: a LongArray);
    # orig_shape keys are folded into shapes
    metadata: Dict[str, Any]
    architecture: Optional[str]
    tensors: Dict[str, GGUFTensor]


# -- reading ----------------------------------------------------------------------------
_DECODED_BY_GGUF_PY: set = set()  # types already announced in the log


def _decoded_by_gguf_py(path: str, info: GGUFTensorInfo, raw: np.ndarray, shape) -> GGUFTensor:
    """A tensor of a type QuantKit has no decoder for, decoded once at load by gguf-py (in
    numpy, on the CPU: slow) and kept as F16."""
    gguf = _gguf()
    try:
        values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[info.qtype])
    except NotImplementedError:
        raise FormatUnsupported(f"{path}: tensor '{info.name}' is stored as {info.qtype}, which "
                                f"the installed gguf package cannot decode. Update it (python -m pip "
                                f"install -U \"{GGUF_REQUIREMENT}\") or use a file quantized to "
                                f"{', '.join(SUPPORTED_TYPES)}.") from None
    if info.qtype not in _DECODED_BY_GGUF_PY:
        _DECODED_BY_GGUF_PY.add(info.qtype)
        log.warning("QuantKit: GGUF type %s has no QuantKit decoder; its tensors are decoded by "
                    "gguf-py once at load (slow) and kept in fp16 (more memory than the file).", info.qtype)
    return GGUFTensor(info.name, "F16", shape, torch.from_numpy(values).to(torch.float16).reshape(shape))


def _open(path: str):
    """(copy-on-write numpy map of the file, its parsed and checked header)."""
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
                header = parse_header(buf, path)
        # copy-on-write: writable, so torch.from_numpy neither copies nor warns
        return np.memmap(path, dtype=np.uint8, mode="c"), header
    except OSError as exc:
        raise MalformedFile(f"Cannot open {path}: {exc.strerror or exc}. Check the path and "
                            f"the file's permissions.") from None


def _orig_shape(path: str, info: GGUFTensorInfo, value: Any) -> Tuple[int, ...]:
    """The logical shape ComfyUI-GGUF's writers record for a tensor they stored flattened to
    [rows, rest] (a convolution, a 5-D weight): only that regrouping, or none, is accepted."""
    stored, n = info.stored_shape, math.prod(info.stored_shape)
    key = ORIG_SHAPE_PREFIX + info.name
    ok = (isinstance(value, list) and 1 <= len(value) <= MAX_DIMS
          and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value))
    if not ok or math.prod(value) != n:
        raise MalformedFile(f"{path}: {key} is {value!r:.200}, which is not a shape holding tensor "
                            f"'{info.name}'s {n} values: the file is corrupt. {_REDO}")
    shape = tuple(value)
    flattened = (shape[0], math.prod(shape[1:])) if len(shape) > 1 else shape
    if stored != shape and stored != flattened:
        raise MalformedFile(f"{path}: {key} says tensor '{info.name}' (stored {list(stored)}) is "
                            f"{list(shape)}, a regrouping other than the [rows, rest] flattening "
                            f"GGUF writers use ({list(flattened)}): the file is corrupt. {_REDO}")
    return shape


def _tensor_data(raw: np.ndarray, info: GGUFTensorInfo, shape: Tuple[int, ...]) -> torch.Tensor:
    flat = torch.from_numpy(raw)
    qtype = info.qtype
    if qtype in FLOAT_TYPES:  # numpy has no bfloat16: all float types come as bytes
        return flat.view(FLOAT_TYPES[qtype]).reshape(shape)
    block_len, type_size = BLOCK_SIZES[qtype]
    width = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    if width % block_len == 0:
        return flat.reshape(-1, width // block_len * type_size)
    return flat.reshape(-1, info.stored_shape[-1] // block_len * type_size)


def read_gguf(path) -> GGUFContents:
    """Memory-maps a .gguf file; see GGUFTensor for what each tensor holds. Every problem
    is a MalformedFile or FormatUnsupported naming the file (gguf_header checks the rest)."""
    path = os.fspath(path)
    data, header = _open(path)
    metadata = dict(header.metadata)
    orig_shapes = {k[len(ORIG_SHAPE_PREFIX):]: metadata.pop(k) for k in list(metadata)
                   if k.startswith(ORIG_SHAPE_PREFIX)}
    tensors = {}
    for info in header.tensors:
        shape = info.stored_shape
        if info.name in orig_shapes:
            shape = _orig_shape(path, info, orig_shapes[info.name])
        raw = data[info.start:info.start + info.nbytes]
        if info.qtype in SUPPORTED_TYPES:
            tensors[info.name] = GGUFTensor(info.name, info.qtype, shape, _tensor_data(raw, info, shape))
        else:
            rows = raw.reshape(*info.stored_shape[:-1], -1)
            tensors[info.name] = _decoded_by_gguf_py(path, info, rows, shape)
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
