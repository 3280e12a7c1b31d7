"""Hostile or broken .gguf files that are well-formed enough to get past a bounds check:
each problem is its own clear error naming the file and the key or tensor, and a long
metadata array costs neither time nor memory that grow with it.

The files are spelled out byte by byte (harness/gguf_bytes.py), not written by the code
under test. How each test was shown able to fail is in its docstring.
"""
from __future__ import annotations

import struct

import pytest

import gguf  # noqa: F401 (imported here, so that its import is not counted as reading memory)
from conftest import pack_module
from harness import gguf_bytes as gb
from harness.fuzz import NATIVE_SLACK, peaks

gf = pack_module("backends.gguf.file")
header = pack_module("backends.gguf.header")
errors = pack_module("backends.engine.errors")

Q8 = [("blk.weight", "Q8_0", (64, 4)), ("norm", "F32", (8,))]


def write(tmp_path, spec, name="f.gguf"):
    path = tmp_path / name
    path.write_bytes(gb.encode(spec))
    return path


def error_of(path, *needles):
    with pytest.raises(errors.QuantKitError) as info:
        gf.read_gguf(path)
    text = str(info.value)
    assert isinstance(info.value, errors.MalformedFile), text
    assert str(path) in text and "could not be parsed" not in text, text
    for needle in needles:
        assert needle in text, f"{needle!r} not in: {text}"
    return text


def peak_bytes_reading(path):
    """(contents, Python peak); the resident memory may grow by the file's size at most."""
    contents, peak, native = peaks(gf.read_gguf, path)
    assert native < path.stat().st_size + NATIVE_SLACK, f"RSS grew {native / 2**20:.1f} MiB"
    return contents, peak


def test_the_valid_base_file_reads(tmp_path):
    """The base every test below breaks in one place. Shown able to fail: keeping the dims
    in GGUF order (tuple(dims) for tuple(reversed(dims)) in gguf_header._tensor_info) read
    blk.weight as (64, 4)."""
    got = gf.read_gguf(write(tmp_path, gb.valid_spec(Q8)))
    assert got.tensors["blk.weight"].shape == (4, 64) and got.tensors["norm"].shape == (8,)
    assert got.tensors["norm"].data.tolist() != [0.0] * 8


# -- (a) long metadata arrays ----------------------------------------------------------
@pytest.mark.parametrize("item_type,items", [
    (gb.UINT8, bytes(10 << 20)),  # 10 MiB of uint8: 13 s and 0.7 GiB per MiB before
    (gb.STRING, [b"x"] * (1 << 19)),  # 4.5 MiB of one-letter strings
], ids=["uint8", "strings"])
def test_a_long_metadata_array_is_not_materialised(tmp_path, item_type, items):
    """A 4.5-10 MiB file that is one metadata array is read with under 1 MiB of Python memory
    (tracemalloc peak) and kept as a LongArray of the right length. Shown able to fail:
    setting MAX_ARRAY_ITEMS to 10**9 (materialise everything) made the peak 160 MiB (uint8)
    and 4.5 MiB (strings: one-letter strings are shared objects, only the list grows)."""
    spec = gb.valid_spec(Q8, [gb.KV(b"tokenizer.ggml.tokens", gb.ARRAY, (item_type, items))])
    path = write(tmp_path, spec)
    del spec
    contents, peak = peak_bytes_reading(path)
    assert peak < 1 << 20, f"{peak / 2**20:.1f} MiB of Python memory for a long array"
    value = contents.metadata["tokenizer.ggml.tokens"]
    assert isinstance(value, header.LongArray) and value.length == len(items)


def test_many_short_arrays_cost_memory_proportional_to_the_file(tmp_path):
    """The worst case under the length cap: arrays of MAX_ARRAY_ITEMS float32 (24-byte
    Python floats for 4 file bytes) stay within 10x the file's size (measured: 8.0x).
    Shown able to fail: one numpy object per item, as gguf-py builds them (np.array(v) for
    each value), took 94.7 MB for the 3.3 MB file."""
    n = header.MAX_ARRAY_ITEMS
    kvs = [gb.KV(f"a.{i}".encode(), gb.ARRAY, (gb.FLOAT32, [float(i)] * n)) for i in range(200)]
    path = write(tmp_path, gb.valid_spec(Q8, kvs))
    size = path.stat().st_size
    _, peak = peak_bytes_reading(path)
    assert peak < 10 * size, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB file"


def test_an_orig_shape_longer_than_any_shape_is_refused(tmp_path):
    """A key QuantKit needs (orig_shape) with a long array is an error naming the key.
    Shown able to fail: without the isinstance(value, list) test in _orig_shape it raised
    TypeError ('LongArray' object is not iterable)."""
    kv = gb.KV(b"comfy.gguf.orig_shape.blk.weight", gb.ARRAY, (gb.INT32, [1] * 5000))
    error_of(write(tmp_path, gb.valid_spec(Q8, [kv])), "comfy.gguf.orig_shape.blk.weight")


# -- (b) data layout -------------------------------------------------------------------
def test_overlapping_tensor_data_is_refused(tmp_path):
    """Shown able to fail: with the overlap loop in _check_extents removed, the file read
    without complaint (both tensors over the same bytes)."""
    spec = gb.valid_spec(Q8)
    spec.tensors[1].offset = 64  # inside blk.weight's 136 bytes
    error_of(write(tmp_path, spec), "overlap", "'blk.weight'", "'norm'")


def test_misaligned_tensor_data_is_refused(tmp_path):
    """Shown able to fail: with the `offset % alignment` check removed the file read."""
    spec = gb.valid_spec(Q8)
    spec.tensors[1].offset += 4
    spec.data += bytes(64)
    error_of(write(tmp_path, spec), "'norm'", "alignment (32 bytes)")


def test_a_zero_size_tensor_is_refused(tmp_path):
    """Shown able to fail: with the `0 in dims` check removed the file read (an empty
    tensor)."""
    spec = gb.valid_spec(Q8)
    spec.tensors[0].dims = (64, 0)
    error_of(write(tmp_path, spec), "'blk.weight'", "dimension of 0")


@pytest.mark.parametrize("dims,needle", [
    ((2**63, 2**63), "past the end"), ((2**64 - 1,), "past the end"),
    ((1,) * 9, "has 9 dimensions")], ids=["huge", "max-u64", "nine-dims"])
def test_absurd_dimensions_are_refused_without_allocating(tmp_path, dims, needle):
    """No bytes are allocated for what a shape claims. Shown able to fail: with the
    `end > size` check in _check_extents removed, the huge dims reached torch (a TypeError
    reshaping the short mapped slice)."""
    spec = gb.valid_spec(Q8)
    spec.tensors[1].dims = dims
    path = write(tmp_path, spec)
    got, peak = peak_bytes_reading_error(path)
    assert needle in got and "'norm'" in got, got
    assert peak < 1 << 20


def peak_bytes_reading_error(path):
    got, peak, native = peaks(error_of, path)
    assert native < NATIVE_SLACK, f"RSS grew {native / 2**20:.1f} MiB reading a refused file"
    return got, peak


def _with_orig_shape(shape, stored=(64, 8), type_name="Q8_0"):
    kv = gb.KV(b"comfy.gguf.orig_shape.w", gb.ARRAY, (gb.INT32, list(shape)))
    return gb.valid_spec([("w", type_name, stored)], [kv])


@pytest.mark.parametrize("shape,stored,type_name", [
    ((8, 16, 2, 2), (64, 8), "Q8_0"),  # a conv weight flattened to [rows, in*kh*kw]
    ((2, 4, 8, 2, 2), (128, 2), "F16"),  # a 5-D weight flattened (GGUF has at most 4 dims)
    ((8, 64), (64, 8), "Q8_0"),  # the stored shape itself
], ids=["conv", "5d", "same"])
def test_orig_shapes_comfyui_gguf_writes_are_accepted(tmp_path, shape, stored, type_name):
    """Shown able to fail: accepting only orig == stored refused the conv and 5-D files."""
    got = gf.read_gguf(write(tmp_path, _with_orig_shape(shape, stored, type_name)))
    assert got.tensors["w"].shape == shape


@pytest.mark.parametrize("shape", [(16, 32), (4, 2, 64), (512,)])
def test_an_orig_shape_regrouping_the_values_is_refused(tmp_path, shape):
    """Same element count (512), different grouping: not what a writer flattens. Shown able
    to fail: with the `stored != flattened` check removed, all three read as the new shape."""
    error_of(write(tmp_path, _with_orig_shape(shape)), "comfy.gguf.orig_shape.w", "regrouping",
             "'w'")


# -- (c) named problems instead of "could not be parsed" -------------------------------
def test_duplicate_metadata_keys_are_refused(tmp_path):
    """Shown able to fail: with the `key in metadata` check removed the file read (the
    second value silently won)."""
    kvs = [gb.KV(b"general.name", gb.STRING, b"a"), gb.KV(b"general.name", gb.STRING, b"b")]
    error_of(write(tmp_path, gb.valid_spec(Q8, kvs)), "'general.name' appears twice")


def test_duplicate_tensor_names_are_refused(tmp_path):
    """Shown able to fail: with the `in names` check removed, the overlap check caught it
    instead, with a message not naming the duplication."""
    spec = gb.valid_spec(Q8)
    spec.tensors[1].name = b"blk.weight"
    error_of(write(tmp_path, spec), "'blk.weight' appears twice")


@pytest.mark.parametrize("vtype,value,type_name", [
    (gb.UINT64, 32, "uint64"), (gb.INT32, 32, "int32"), (gb.STRING, b"32", "string")])
def test_a_non_uint32_alignment_is_refused(tmp_path, vtype, value, type_name):
    """Shown able to fail: without the `vtype != _UINT32` check the uint64 and int32 files
    read (32 is the default anyway) and the string one raised TypeError (str <= int)."""
    kvs = [gb.KV(b"general.alignment", vtype, value)]
    error_of(write(tmp_path, gb.valid_spec(Q8, kvs)), "general.alignment", type_name)


@pytest.mark.parametrize("where", ["value", "array item", "key", "tensor name"])
def test_invalid_utf8_is_named(tmp_path, where):
    """Shown able to fail: decoding with errors="replace" in _Cursor.text made all four
    read without complaint."""
    bad = b"caf\xc3("
    kvs = {"value": [gb.KV(b"general.name", gb.STRING, bad)],
           "array item": [gb.KV(b"words", gb.ARRAY, (gb.STRING, [b"ok", bad]))],
           "key": [gb.KV(bad, gb.UINT8, 1)]}.get(where, [])
    spec = gb.valid_spec(Q8, kvs)
    if where == "tensor name":
        spec.tensors[0].name = bad
    error_of(write(tmp_path, spec), "not valid UTF-8")


def test_version_0_is_not_called_big_endian(tmp_path):
    """Shown able to fail: without the `version == 0` check it was FormatUnsupported
    'big-endian' (the message before this fix)."""
    spec = gb.valid_spec(Q8)
    spec.version = 0
    text = error_of(write(tmp_path, spec), "version is 0")
    assert "big-endian" not in text


def test_a_big_endian_file_is_still_named(tmp_path):
    """Shown able to fail: with the big-endian test limited to versions 2 and 3 (so never
    true) the message said 'GGUF version 50331648'."""
    data = bytearray(gb.encode(gb.valid_spec(Q8)))
    struct.pack_into(">I", data, 4, 3)
    path = tmp_path / "be.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(errors.FormatUnsupported, match="big-endian"):
        gf.read_gguf(path)
