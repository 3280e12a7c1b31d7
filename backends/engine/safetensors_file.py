"""Reading .safetensors files from untrusted sources: the header is checked here first,
so a broken or hostile file is a MalformedFile naming the file and the problem (not a
SafetensorError, a JSON RecursionError or a 100 MB header read for a 1 KB file). Only
safetensors is read; nothing is ever unpickled.

The checks are safetensors' own rules: an 8-byte little-endian header length that fits
the file, a JSON object of UTF-8 text with no duplicate keys, `__metadata__` (if not null) mapping
strings to strings, and per tensor a known dtype, a shape of non-negative integers and
`data_offsets` [begin, end] whose length matches the shape, the tensors together covering
the data section exactly, without gaps or overlap.
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Callable, Dict, List

import torch

from .errors import MalformedFile

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
# safetensors dtype names -> bytes per element (those torch reads)
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_REDO = "Download or convert the file again; it must be a .safetensors file."


def _bad(path: str, problem: str) -> MalformedFile:
    return MalformedFile(f"{path} is not a valid .safetensors file: {problem}. {_REDO}")


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key '{key}' appears twice in the header")
        out[key] = value
    return out


def _header(path: str, f, size: int) -> tuple:
    if size < 8:
        raise _bad(path, f"it is {size} bytes, too short for the 8-byte header length")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > size - 8 or n > MAX_HEADER_BYTES:
        raise _bad(path, f"its header length {n} is more than the file's {size - 8} bytes after "
                         f"it (or safetensors' limit of {MAX_HEADER_BYTES})")
    raw = f.read(n)
    if not raw.startswith(b"{"):
        raise _bad(path, f"its header starts with {raw[:8]!r}, not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise _bad(path, "its header is not UTF-8 text") from None
    except RecursionError:
        raise _bad(path, "its header nests JSON too deeply") from None
    except ValueError as exc:  # JSONDecodeError, duplicate keys, a 5000-digit number
        raise _bad(path, f"its header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _bad(path, f"its header is a JSON {type(header).__name__}, not an object")
    return header, size - 8 - n


def _is_int(v) -> bool:
    """A JSON integer safetensors can hold (an unsigned 64-bit one)."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64


def _extents(path: str, header: dict, data_bytes: int) -> None:
    meta = header.pop("__metadata__", None)
    meta = {} if meta is None else meta
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _bad(path, "its __metadata__ is not a mapping of strings to strings")
    try:
        for text in (*header, *meta, *meta.values()):
            text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape ("\ud800"), which safetensors refuses
        raise _bad(path, "its header holds a string that is not valid Unicode") from None
    spans = []
    for name, info in header.items():
        what = f"tensor '{name}'"
        if not isinstance(info, dict) or {"dtype", "shape", "data_offsets"} - set(info):
            raise _bad(path, f"{what} is not described by dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise _bad(path, f"{what} has dtype {dtype!r:.40}; readable dtypes are "
                             f"{', '.join(DTYPE_SIZES)}")
        if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
            raise _bad(path, f"{what} has shape {shape!r:.80}, not a list of integers from 0 to "
                             f"2**64 - 1")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise _bad(path, f"{what} has data_offsets {offsets!r:.80}, not [begin, end] with "
                             f"0 <= begin <= end")
        if offsets[1] > data_bytes:
            raise _bad(path, f"the data of {what} ends at byte {offsets[1]} of the data section, "
                             f"past its end ({data_bytes} bytes): the file is truncated")
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise _bad(path, f"{what} holds {offsets[1] - offsets[0]} bytes but its shape "
                             f"{shape} of {dtype} needs {math.prod(shape) * DTYPE_SIZES[dtype]}")
        spans.append((offsets[0], offsets[1], name))
    covered = 0
    for begin, end, name in sorted(spans):
        if begin != covered:
            problem = "overlaps the tensor before it" if begin < covered else "leaves a gap before it"
            raise _bad(path, f"the data of tensor '{name}' (from byte {begin}) {problem}")
        covered = end
    if covered != data_bytes:
        raise _bad(path, f"its tensors cover {covered} of the {data_bytes} data bytes")


def check_safetensors(path: str) -> None:
    """Raises MalformedFile naming the problem unless safetensors can read the file."""
    try:
        with open(path, "rb") as f:
            header, data_bytes = _header(path, f, os.fstat(f.fileno()).st_size)
    except OSError as exc:
        raise MalformedFile(f"Cannot open {path}: {exc.strerror or exc}. Check the path and "
                            f"the file's permissions.") from None
    _extents(path, header, data_bytes)


def read_safetensors(path, select: Callable[[List[str]], List[str]] = list) -> Dict[str, torch.Tensor]:
    """The tensors of a checked .safetensors file; `select` picks names from all of them."""
    from safetensors import safe_open
    path = os.fspath(path)
    check_safetensors(path)
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in select(list(f.keys()))}
