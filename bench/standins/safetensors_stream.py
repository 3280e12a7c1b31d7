"""Write a safetensors file one tensor at a time.

The header needs only names, shapes and dtypes, so it is written first and each tensor's
bytes follow as they are generated: peak memory is one chunk, not the file. The file is
written under a temporary name in the same folder and renamed when complete, so an
interrupted run never leaves a file that looks finished.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch

from . import fill

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str                      # fill.NORMAL / ONES / ZEROS / CONST, or "data"
    seed_name: str                 # name the generator is seeded from
    data: Optional[torch.Tensor] = None  # literal values (kind == "data"), e.g. position ids

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def _chunks(spec: TensorSpec, seed: int) -> Iterator[torch.Tensor]:
    if spec.kind == "data":
        yield spec.data.to(spec.dtype).contiguous().reshape(-1)
    else:
        yield from fill.generate(spec.kind, spec.key, spec.numel, spec.dtype, seed, spec.seed_name)


def _ordered(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    # Like safetensors itself: larger elements first, so every tensor starts aligned.
    return sorted(specs, key=lambda s: (-torch.empty((), dtype=s.dtype).element_size(), s.key))


def header_bytes(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for s in specs:
        if s.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{s.key}: dtype {s.dtype} cannot be stored in safetensors")
        header[s.key] = {"dtype": _DTYPE_NAMES[s.dtype], "shape": list(s.shape),
                         "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write(path: str, specs: Iterable[TensorSpec], seed: int, metadata: dict[str, str],
          progress: Optional[Callable[[int, int], None]] = None) -> int:
    """Write `specs` to `path` atomically; return the file size in bytes."""
    ordered = _ordered(specs)
    keys = [s.key for s in ordered]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{path}: duplicate tensor names")
    head = header_bytes(ordered, metadata)
    total = len(head) + sum(s.nbytes for s in ordered)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            written = len(head)
            for s in ordered:
                start = written
                for chunk in _chunks(s, seed):
                    raw = chunk.reshape(-1).view(torch.uint8).numpy()
                    f.write(memoryview(raw))
                    written += raw.nbytes
                if written - start != s.nbytes:
                    raise RuntimeError(f"{s.key}: wrote {written - start} bytes, expected {s.nbytes}")
                if progress is not None:
                    progress(written, total)
            f.flush()
            os.fsync(f.fileno())
        if written != total:
            raise RuntimeError(f"{path}: wrote {written} bytes, expected {total}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return total
