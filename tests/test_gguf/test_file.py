"""GGUF files: write then read keeps types, torch-order shapes, bytes and metadata;
broken files fail with our errors, naming the file and the tensor."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from conftest import pack_module
from harness.tiny_models import heavy_tailed

import gguf  # a test dependency (.ci/requirements-dev.txt): missing means failing, not skipping
from gguf.quants import dequantize as np_dequantize  # noqa: E402
gf = pack_module("backends.gguf.file")
gq = pack_module("backends.gguf.quantize")
dq = pack_module("backends.gguf.dequant")
errors = pack_module("backends.engine.errors")

QUANT = list(gq.QUANTIZERS)
METADATA = {"general.name": "tiny", "answer": 42, "negative": -3, "big": 2**40, "ratio": 0.5,
            "flag": True, "ints": [1, 2, 3], "words": ["a", "b"], "floats": [0.25, 1.5]}


def sample_tensors():
    out = {}
    for i, name in enumerate(QUANT):
        w = heavy_tailed((4 + i, 512), i)
        out[f"blocks.{i}.{name}.weight"] = (name, gq.quantize(w, name), tuple(w.shape))
    conv = heavy_tailed((8, 64, 2, 2), 11)  # last dim 2: stored flattened, shape in metadata
    out["conv.weight"] = ("Q4_K", gq.quantize(conv.reshape(8, -1), "Q4_K"), tuple(conv.shape))
    out["norm.f32"] = ("F32", torch.randn(7), (7,))
    out["emb.f16"] = ("F16", torch.randn(3, 5, 2).half(), (3, 5, 2))
    out["proj.bf16"] = ("BF16", torch.randn(6, 4).bfloat16(), (6, 4))
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    tensors = sample_tensors()
    gf.write_gguf(path, tensors, METADATA, arch="flux")
    return path, tensors


def test_round_trip_keeps_types_shapes_bytes(written):
    """Shown able to fail: read_gguf ignoring the recorded original shapes (`if info.name in
    orig_shapes` -> `if False`) -> conv.weight reads as (8, 256), not (8, 64, 2, 2)."""
    path, tensors = written
    got = gf.read_gguf(path)
    assert got.architecture == "flux"
    assert list(got.tensors) == list(tensors)
    for name, (qtype, data, shape) in tensors.items():
        t = got.tensors[name]
        assert (t.qtype, t.shape) == (qtype, shape), name
        if qtype in dq.FLOAT_TYPES:
            assert t.data.dtype == data.dtype and torch.equal(t.data, data.reshape(shape)), name
        else:
            assert t.data.dtype == torch.uint8 and torch.equal(t.data, data), name
            assert t.data.shape[0] == shape[0]  # one row per output channel, like quantize()


def test_round_trip_keeps_metadata(written):
    """Shown able to fail: write_gguf without add_quantization_version -> KeyError
    'general.quantization_version'."""
    got = gf.read_gguf(written[0]).metadata
    for key, value in METADATA.items():
        assert got[key] == value, key  # the float values are exact in float32
    assert got["general.architecture"] == "flux"
    assert got["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    assert not any(k.startswith(gf.ORIG_SHAPE_PREFIX) for k in got)


def test_file_stores_ggml_dimension_order(written):
    """GGUF lists dims innermost first: torch [rows, cols] is [cols, rows] in the file
    (read by gguf-py's GGUFReader).
    Shown able to fail: write_gguf recording list(reversed(shape)) as the original shape ->
    [2, 2, 64, 8] != [8, 64, 2, 2]."""
    reader = gguf.GGUFReader(written[0])
    dims = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    assert dims["blocks.0.Q8_0.weight"] == [512, 4]
    assert dims["emb.f16"] == [2, 5, 3]
    assert dims["conv.weight"] == [256, 8]  # flattened: [out, in*kh*kw] reversed
    assert reader.get_field(gf.ORIG_SHAPE_PREFIX + "conv.weight").contents() == [8, 64, 2, 2]


def test_read_data_dequantizes_like_gguf_py(written):
    """Every tensor as our reader and decoder give it equals what gguf-py's own GGUFReader
    and dequantize make of the file.
    Shown able to fail: read_gguf slicing each tensor's bytes from info.start + 32 -> the
    first tensor, blocks.0.Q8_0.weight, differs."""
    got = gf.read_gguf(written[0]).tensors
    reader = gguf.GGUFReader(written[0])
    assert [t.name for t in reader.tensors] == list(got)
    for rt in reader.tensors:
        t = got[rt.name]
        theirs = np_dequantize(np.asarray(rt.data), rt.tensor_type).astype(np.float32)
        ours = dq.dequantize(t.data, t.qtype, t.shape).numpy()
        np.testing.assert_array_equal(ours, theirs.reshape(t.shape), err_msg=rt.name)


# -- broken files -------------------------------------------------------------------------
def read_error(path):
    with pytest.raises(errors.QuantKitError) as info:
        gf.read_gguf(path)
    assert str(path) in str(info.value)
    return info.value


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.6, 0.999],  # metadata: bytes 24-450 of 28736
                         ids=["in-header", "in-metadata", "in-data", "last-bytes"])
def test_truncated_file(written, tmp_path, fraction):
    """Shown able to fail: parse_header without its _check_extents call -> the in-data cut
    raises RuntimeError from _tensor_data's reshape, not MalformedFile."""
    data = written[0].read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:max(1, int(len(data) * fraction))])
    err = read_error(bad)
    assert isinstance(err, errors.MalformedFile)
    assert "truncated" in str(err) or "too short" in str(err)


def test_truncated_data_names_the_tensor(written, tmp_path):
    """Shown able to fail: parse_header without its _check_extents call -> RuntimeError
    (shape '[6, 4]' is invalid for input of size 22), no tensor named."""
    data = written[0].read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:-20])  # the last tensor's padding and 4 of its 48 bytes
    assert "'proj.bf16'" in str(read_error(bad))


@pytest.mark.parametrize("content", [b"", b"GGML" + bytes(100), bytes(range(256)) * 4,
                                     torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                                   generator=torch.Generator().manual_seed(0))
                                     .numpy().tobytes()],
                         ids=["empty", "bad-magic", "byte-ramp", "random"])
def test_not_a_gguf_file(tmp_path, content):
    """Shown able to fail: header._start without its magic check -> the byte ramp is taken
    for GGUF version 117835012 (FormatUnsupported, not MalformedFile)."""
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    assert isinstance(read_error(bad), errors.MalformedFile)


def test_missing_file(tmp_path):
    """Shown able to fail: _open not catching OSError -> FileNotFoundError escapes."""
    assert isinstance(read_error(tmp_path / "nope.gguf"), errors.MalformedFile)


def test_random_bytes_after_a_valid_magic(tmp_path):
    """Random tensor and metadata counts must fail as our error naming the file.
    Shown able to fail: _Cursor.error leaving out self.path -> "it declares 9640951156843539237
    tensors ..." does not name the file."""
    g = torch.Generator().manual_seed(1)
    for i in range(20):
        body = torch.randint(0, 256, (2048,), dtype=torch.uint8, generator=g).numpy().tobytes()
        bad = tmp_path / f"r{i}.gguf"
        bad.write_bytes(b"GGUF" + struct.pack("<I", 3) + body)
        read_error(bad)


def write_one(path, qtype_name, nbytes, shape):
    """A file with one tensor of any GGML type, written by gguf-py directly."""
    writer = gguf.GGUFWriter(str(path), "test")
    writer.add_array("numbers", [1, 2, 3])
    raw = torch.zeros(nbytes, dtype=torch.uint8).numpy().reshape(shape[0], -1)
    writer.add_tensor("odd.weight", raw, raw_dtype=gguf.GGMLQuantizationType[qtype_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_undecodable_type_names_the_tensor(tmp_path):
    """Shown able to fail: _decoded_by_gguf_py not turning gguf-py's NotImplementedError into
    FormatUnsupported -> NotImplementedError (Q8_K) escapes."""
    path = tmp_path / "q8k.gguf"  # Q8_K: llama.cpp's internal type, no decoder anywhere
    block_len, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K]
    write_one(path, "Q8_K", 2 * 256 // block_len * type_size, (2, 256))
    err = read_error(path)
    assert isinstance(err, errors.FormatUnsupported)
    assert "odd.weight" in str(err) and "Q8_K" in str(err)


def _random_blocks(qtype_name, rows, cols, seed=8):
    """Random block bytes with finite fp16 scales (the first two bytes of every block)."""
    block_len, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype_name]]
    raw = torch.randint(0, 256, (rows * cols // block_len, type_size), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(seed))
    raw[:, 0:2] = torch.tensor([0.01], dtype=torch.float16).view(torch.uint8)
    return raw.reshape(rows, -1)


def _write_blocks(path, qtype_name, raw):
    writer = gguf.GGUFWriter(str(path), "test")
    writer.add_tensor("odd.weight", raw.numpy(), raw_dtype=gguf.GGMLQuantizationType[qtype_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("qtype", ["IQ4_NL", "IQ4_XS"])
def test_iq4_types_are_read_as_they_are(tmp_path, qtype):
    """Blocks written by gguf-py's GGUFWriter; expected values from gguf-py's dequantize.
    Shown able to fail: IQ4_LEVELS starting at -126 instead of -127 -> IQ4_NL values differ."""
    raw = _random_blocks(qtype, 3, 512)
    _write_blocks(tmp_path / "iq4.gguf", qtype, raw)
    t = gf.read_gguf(tmp_path / "iq4.gguf").tensors["odd.weight"]
    assert t.qtype == qtype and t.shape == (3, 512)
    want = np_dequantize(raw.numpy(), gguf.GGMLQuantizationType[qtype])
    assert np.array_equal(dq.dequantize(t.data, qtype, t.shape).numpy(), want)


def test_types_only_gguf_py_decodes_are_read_as_f16_and_logged_once(tmp_path, caplog):
    """Shown able to fail: _decoded_by_gguf_py not adding the type to _DECODED_BY_GGUF_PY
    -> the warning is logged twice (2 == 1)."""
    raw = _random_blocks("IQ2_XXS", 2, 512)
    want = np_dequantize(raw.numpy(), gguf.GGMLQuantizationType.IQ2_XXS).astype(np.float16)
    for i in range(2):
        _write_blocks(tmp_path / f"iq2_{i}.gguf", "IQ2_XXS", raw)
    with caplog.at_level("WARNING"):
        tensors = [gf.read_gguf(tmp_path / f"iq2_{i}.gguf").tensors["odd.weight"] for i in range(2)]
    assert all(t.qtype == "F16" and np.array_equal(t.data.numpy(), want) for t in tensors)
    assert sum("IQ2_XXS" in r.getMessage() for r in caplog.records) == 1


def patched(path, tmp_path, marker: bytes, skip: int, fmt: str, value: int):
    data = bytearray(path.read_bytes())
    at = data.index(marker) + len(marker) + skip
    struct.pack_into(fmt, data, at, value)
    out = tmp_path / "patched.gguf"
    out.write_bytes(bytes(data))
    return out


def test_unknown_type_id(tmp_path):
    """Shown able to fail: _tensor_info without its `if qtype is None` check -> TypeError
    (attribute name must be string) escapes."""
    path = tmp_path / "ok.gguf"
    write_one(path, "Q8_0", 2 * 34, (2, 32))
    # after the name: n_dims (4 bytes), two dims (8 each), then the type id
    bad = patched(path, tmp_path, b"odd.weight", 4 + 16, "<I", 250)
    err = read_error(bad)
    assert isinstance(err, errors.FormatUnsupported) and "odd.weight" in str(err)


def test_bogus_array_length_fails_fast(tmp_path):
    """Shown able to fail: _Cursor.take without its end-of-file check -> OverflowError
    escapes from unpacking 2**62 items."""
    path = tmp_path / "ok.gguf"
    write_one(path, "Q8_0", 2 * 34, (2, 32))
    # after the key: value type (4), item type (4), then the item count
    bad = patched(path, tmp_path, b"numbers", 8, "<Q", 2**62)
    assert isinstance(read_error(bad), errors.MalformedFile)


def test_write_rejects_bad_input(tmp_path):
    """Shown able to fail: _tensor_array without its `data.numel() != ...` size check ->
    RuntimeError (shape '[1, 144]' is invalid for input of size 10), not MalformedFile."""
    path = tmp_path / "w.gguf"
    with pytest.raises(errors.MalformedFile, match="bad.weight"):
        gf.write_gguf(path, {"bad.weight": ("Q4_K", torch.zeros(10, dtype=torch.uint8), (1, 256))})
    with pytest.raises(errors.FormatUnsupported, match="meta"):
        gf.write_gguf(path, {}, {"meta": {"nested": 1}})
    assert not path.exists() and not list(tmp_path.iterdir()), "no partial file is left behind"
