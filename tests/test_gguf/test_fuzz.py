"""Fuzzing the GGUF reader (what Load GGUF Model and Load GGUF CLIP call): any bytes give
either a consistent GGUFContents or QuantKit's own error naming the file, never another
exception, a hang (5 s per case) or Python memory beyond a small multiple of the file.

Three generators: corruptions of valid files written by gguf-py, by QuantKit and by the
byte-level encoder; random header structures; and valid files with one known defect
each, where the error must name that defect (and the valid file must read back exactly).
CI-sized by default; QUANTKIT_FUZZ_FULL=1 runs 10,000 cases per test (harness/fuzz.py).
"""
from __future__ import annotations

import math
import os
import struct

import numpy as np
import pytest
import torch
from hypothesis import assume, given, strategies as st

import gguf
from conftest import pack_module
from harness import gguf_bytes as gb
from harness.fuzz import FULL, NATIVE_SLACK, fuzz_settings, interesting_ints, mutations, peaks, scratch_file

gf = pack_module("backends.gguf.file")
gq = pack_module("backends.gguf.quantize")
errors = pack_module("backends.engine.errors")

pytestmark = pytest.mark.timeout(3600 if FULL else 120)
_PATH = scratch_file("case.gguf")
MEMORY_FACTOR, MEMORY_SLACK = 16, 256 << 10  # Python memory <= 16x the file + 256 KiB


def read_or_error(data: bytes):
    with open(_PATH, "wb") as f:
        f.write(data)
    try:
        return gf.read_gguf(_PATH)
    except errors.QuantKitError as exc:
        assert _PATH in str(exc), f"the error does not name the file: {exc}"
        assert "could not be parsed" not in str(exc)
        return exc


def check(data: bytes):
    """The property every case must hold; returns what the read gave. Memory is bounded
    twice: Python objects (tracemalloc) and the resident memory (torch's and other native
    allocations, which tracemalloc does not see). Shown able to fail: a 48 MiB torch
    allocation added to gguf.file.read_gguf failed every test here ("RSS grew 50307072
    bytes for a 512-byte file"); tracemalloc alone had let it through."""
    got, peak, native = peaks(read_or_error, data)
    assert peak <= MEMORY_FACTOR * len(data) + MEMORY_SLACK, f"{peak} bytes for a {len(data)}-byte file"
    assert native <= MEMORY_FACTOR * len(data) + NATIVE_SLACK, f"RSS grew {native} bytes for a {len(data)}-byte file"
    if isinstance(got, Exception):
        return got
    total = 0
    for t in got.tensors.values():
        assert all(d > 0 for d in t.shape), t.name
        nbytes = t.data.numel() * t.data.element_size()
        if t.qtype in gf.FLOAT_TYPES:
            assert t.data.shape == t.shape, t.name
        elif t.qtype in gf.BLOCK_SIZES:
            block_len, type_size = gf.BLOCK_SIZES[t.qtype]
            assert nbytes == math.prod(t.shape) // block_len * type_size, t.name
        total += nbytes if t.qtype in gf.SUPPORTED_TYPES else 0
    assert total <= len(data), "tensors claim more bytes than the file has"
    return got


# -- seeds: small valid files from three writers -----------------------------------------
def _gguf_py_seed(path):
    w = gguf.GGUFWriter(str(path), "sd1")
    w.add_array("numbers", [1, 2, 3])
    w.add_string("general.name", "seed")
    w.add_array("comfy.gguf.orig_shape.conv", [2, 16, 2, 2])
    w.add_tensor("conv", np.zeros((2, 68), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("norm", np.arange(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _quantkit_seed(path):
    w = torch.randn(2, 256, generator=torch.Generator().manual_seed(0))
    gf.write_gguf(path, {"a.weight": ("Q4_K", gq.quantize(w, "Q4_K"), (2, 256)),
                         "b.bias": ("BF16", torch.ones(3).bfloat16(), (3,))},
                  {"words": ["x", "yz"], "ratio": 0.5}, arch="flux")


def _seeds():
    out = []
    for make in (_gguf_py_seed, _quantkit_seed):
        path = os.path.join(os.path.dirname(_PATH), make.__name__ + ".gguf")
        make(path)
        with open(path, "rb") as f:
            out.append(f.read())
    spec = gb.valid_spec([("t0", "F16", (4, 2)), ("t1", "Q8_0", (32, 1))],
                         [gb.KV(b"arr", gb.ARRAY, (gb.ARRAY, [(gb.UINT8, [1]), (gb.STRING, [b"s"])]))],
                         alignment=16)
    out.append(gb.encode(spec))
    return out


SEEDS = _seeds()


def test_the_seeds_are_valid():
    """Shown able to fail: with the dims kept in GGUF order in gguf_header._tensor_info the
    seeds' orig_shape and the float data no longer fit and this failed."""
    for seed in SEEDS:
        assert not isinstance(check(seed), Exception)


@fuzz_settings(ci_cases=1000)
@given(st.sampled_from(range(len(SEEDS))).flatmap(lambda i: mutations(SEEDS[i])))
def test_corrupted_valid_files(data):
    """Shown able to fail: with the call to _check_extents removed, a cut in the data
    section gave torch's RuntimeError (the mapped slice is shorter than the tensor's shape)."""
    check(data)


# -- random header structures ----------------------------------------------------------
_NAMES = st.sampled_from([b"t0", b"t1", b"general.alignment", b"comfy.gguf.orig_shape.t0",
                          b"general.architecture", b"\xff\xfe"]) | st.binary(max_size=12)


def _kv_value(vtype, valid=False):
    """Values of one GGUF type; valid: only UTF-8 strings and no NaN (so they compare)."""
    if vtype == gb.STRING:
        return st.text(max_size=8).map(str.encode) if valid else st.binary(max_size=16)
    if vtype == gb.ARRAY:
        return st.tuples(st.sampled_from([gb.UINT8, gb.INT32, gb.UINT32, gb.STRING]),
                         st.lists(st.integers(0, 200), max_size=6)).map(
            lambda t: (t[0], [bytes([v % 128]) for v in t[1]] if t[0] == gb.STRING else t[1]))
    if vtype == gb.FLOAT32 or vtype == gb.FLOAT64:
        return st.floats(width=32, allow_nan=not valid)
    if vtype == gb.BOOL:
        return st.booleans()
    bits = {gb.UINT8: 8, gb.INT8: 8, gb.UINT16: 16, gb.INT16: 16, gb.UINT32: 32, gb.INT32: 32}.get(vtype, 64)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if vtype in (gb.INT8, gb.INT16, gb.INT32, gb.INT64) else (0, 2 ** bits - 1)
    return st.integers(lo, hi)


_KV = st.sampled_from(range(13)).flatmap(
    lambda vtype: st.builds(gb.KV, _NAMES, st.just(vtype), _kv_value(vtype)))
_DIM = st.sampled_from([1, 2, 3, 4, 32, 64, 256]) | interesting_ints(4096)
_TENSOR = st.builds(gb.Tensor, _NAMES, st.lists(_DIM, min_size=1, max_size=5).map(tuple),
                    st.sampled_from([0, 1, 2, 8, 10, 12, 14, 20, 30, 31, 39, 250]) | st.integers(0, 2**32 - 1),
                    st.sampled_from([0, 16, 32, 64, 96, 128, 2**63]) | st.integers(0, 4096))
_SPEC = st.builds(gb.Spec, st.lists(_KV, max_size=5), st.lists(_TENSOR, max_size=4),
                  st.binary(max_size=2048), st.sampled_from([1, 8, 32]),
                  st.sampled_from([3, 3, 3, 2, 0, 1, 4, 3 << 24]),
                  st.sampled_from([b"GGUF"] * 6 + [b"GGML", b"FUGG"]))


@fuzz_settings(ci_cases=1000)
@given(_SPEC)
def test_random_header_structures(spec):
    """Random keys, value types (undefined ones too), dims (0, huge), type ids, offsets,
    alignments, versions and magics. Shown able to fail: with the call to _check_extents
    removed, an offset past the end gave torch's RuntimeError."""
    check(gb.encode(spec))


# -- valid files, then one known defect ------------------------------------------------
_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0"]


@st.composite
def valid_specs(draw):
    names = draw(st.lists(st.text("abc.", min_size=1, max_size=6), min_size=1, max_size=4, unique=True))
    tensors = []
    for name in names:
        type_name = draw(st.sampled_from(_TYPES))
        block = gb.GGML[type_name][1]
        inner = block * draw(st.integers(1, 3))
        outer = draw(st.lists(st.integers(1, 4), max_size=2))
        tensors.append((name, type_name, (inner, *outer)))
    keys = draw(st.lists(st.text(min_size=1, max_size=8).filter(lambda k: not k.startswith(("general.alignment", "comfy."))),
                         max_size=4, unique=True))
    kvs = [gb.KV(k.encode(), vtype, draw(_kv_value(vtype, valid=True)))
           for k in keys for vtype in [draw(st.sampled_from([0, 4, 5, 6, 7, 8, 9, 10, 11]))]]
    return gb.valid_spec(tensors, kvs, alignment=draw(st.sampled_from([1, 2, 8, 32, 64])))


def _expected_value(kv):
    if kv.vtype == gb.STRING:
        return kv.value.decode()
    if kv.vtype == gb.ARRAY:
        item_type, items = kv.value
        return [v.decode() if item_type == gb.STRING else v for v in items]
    if kv.vtype == gb.FLOAT32:
        return struct.unpack("<f", struct.pack("<f", kv.value))[0]
    return kv.value


def _defect(spec, kind):
    """Breaks spec in one way; returns what the error must say."""
    t0 = spec.tensors[0]
    name = t0.name.decode()
    if kind == "overlap":
        spec.tensors.append(gb.Tensor(b"extra", t0.dims, t0.type_id, t0.offset))
        return "overlap"
    if kind == "misaligned":
        assume(spec.alignment > 1)
        t0.offset += 1
        return "not a multiple of the file's alignment"
    if kind == "zero-dim":
        t0.dims = (*t0.dims, 0)
        return "dimension of 0"
    if kind == "duplicate-key":
        spec.kvs += [gb.KV(b"defect.duplicate", gb.UINT8, 1), gb.KV(b"defect.duplicate", gb.UINT8, 2)]
        return "'defect.duplicate' appears twice"
    if kind == "duplicate-name":
        spec.tensors.append(gb.Tensor(t0.name, (1,), 0, len(spec.data)))
        spec.data += bytes(64)
        return f"'{name}' appears twice"
    if kind == "alignment-type":
        spec.kvs = [kv for kv in spec.kvs if kv.key != b"general.alignment"]
        spec.kvs.append(gb.KV(b"general.alignment", gb.UINT64, 32))
        return "not uint32"
    if kind == "utf8":
        spec.kvs.append(gb.KV(b"defect.utf8", gb.STRING, b"\xc3("))
        return "not valid UTF-8"
    if kind == "version-0":
        spec.version = 0
        return "version is 0"
    if kind == "past-end":
        t0.offset = len(spec.data) - len(spec.data) % spec.alignment + spec.alignment * 4
        return "past the end"
    if kind == "row-length":
        assume(gb.GGML[next(k for k, v in gb.GGML.items() if v[0] == t0.type_id)][1] > 1)
        t0.dims = (t0.dims[0] + 1, *t0.dims[1:])
        return "not a multiple of the block size"
    if kind == "unknown-type":
        t0.type_id = 250
        return "unknown to the installed gguf package"
    if kind == "orig-shape":
        n = math.prod(t0.dims)
        assume(n > 1 and len(t0.dims) == 1)
        spec.kvs.append(gb.KV(b"comfy.gguf.orig_shape." + t0.name, gb.ARRAY, (gb.INT32, [1, n])))
        return "regrouping"
    raise AssertionError(kind)


DEFECTS = ["overlap", "misaligned", "zero-dim", "duplicate-key", "duplicate-name", "alignment-type",
           "utf8", "version-0", "past-end", "row-length", "unknown-type", "orig-shape"]


@fuzz_settings(ci_cases=1000)
@given(valid_specs(), st.sampled_from([None] + DEFECTS))
def test_valid_files_read_exactly_and_each_defect_is_named(spec, defect):
    """Without a defect the file reads back: shapes, bytes and metadata as encoded. With
    one, the error names it. Shown able to fail: with the overlap check removed the
    'overlap' cases read without complaint."""
    needle = _defect(spec, defect) if defect else None
    got = check(gb.encode(spec))
    if needle is None:
        assert not isinstance(got, Exception), got
        for kv in spec.kvs:
            if kv.key != b"general.alignment":
                assert got.metadata[kv.key.decode()] == _expected_value(kv), kv
        data_start = len(gb.encode(spec)) - len(spec.data)
        for t in spec.tensors:
            read = got.tensors[t.name.decode()]
            assert read.shape == tuple(reversed(t.dims))
            raw = read.data.contiguous().view(torch.uint8).reshape(-1)
            start = data_start + t.offset
            want = gb.encode(spec)[start:start + raw.numel()]
            assert raw.numpy().tobytes() == want, t.name
    else:
        assert isinstance(got, Exception), f"the {defect} file was accepted"
        assert needle in str(got), f"{defect}: {got}"
