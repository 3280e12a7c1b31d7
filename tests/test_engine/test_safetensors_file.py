"""The .safetensors reads of the pack (Load GGUF CLIP's .safetensors files, the converter's
checkpoint): any bytes give QuantKit's MalformedFile naming the file, or a file that
safetensors itself then reads; never a SafetensorError, another exception, a hang (5 s
per case) or Python memory beyond a small multiple of the file. Nothing is unpickled.

The oracle is the safetensors library: whatever check_safetensors lets through must load
with safetensors.torch.load_file, and whatever it refuses load_file refuses too (except
duplicate keys, which safetensors reads as the last one and QuantKit calls ambiguous). CI-sized by default; QUANTKIT_FUZZ_FULL=1 runs 10,000
cases per fuzz test (harness/fuzz.py). How each test was shown able to fail is in its
docstring.
"""
from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from hypothesis import given, strategies as st
from safetensors.torch import load_file, save

from conftest import pack_module
from harness.fuzz import FULL, NATIVE_SLACK, fuzz_settings, interesting_ints, mutations, peaks, scratch_file

sf = pack_module("backends.engine.safetensors_file")
convert = pack_module("backends.gguf.convert")
errors = pack_module("backends.engine.errors")

pytestmark = pytest.mark.timeout(3600 if FULL else 120)
_PATH = scratch_file("case.safetensors")


def _seed_tensors():
    g = torch.Generator().manual_seed(0)
    return [
        {"a": torch.randn(3, 4, generator=g), "b": torch.arange(5, dtype=torch.int64),
         "c": torch.randn(2, generator=g).half(), "empty": torch.zeros(0, 3)},
        {"model.diffusion_model.x.weight": torch.randn(2, 2, generator=g).bfloat16(),
         "first_stage_model.y": torch.ones(1, dtype=torch.uint8),
         "model.diffusion_model.f8": torch.zeros(4).to(torch.float8_e4m3fn)},
    ]


SEEDS = [save(t, metadata={"format": "pt"} if i == 0 else None) for i, t in enumerate(_seed_tensors())]


def outcome(data: bytes):
    """check_safetensors' verdict, with its memory bound, and the properties that follow."""
    with open(_PATH, "wb") as f:
        f.write(data)
    verdict, peak, native = peaks(_checked_then_read, _PATH)
    assert peak <= 16 * len(data) + (256 << 10), f"{peak} bytes for a {len(data)}-byte file"
    assert native <= 16 * len(data) + NATIVE_SLACK, f"RSS grew {native} bytes for a {len(data)}-byte file"
    if verdict is None:
        load_file(_PATH)  # the oracle: safetensors reads whatever the check let through
        return None
    assert _PATH in str(verdict), verdict
    with pytest.raises(errors.MalformedFile):
        convert.read_checkpoint(_PATH)
    if "appears twice" not in str(verdict):  # the one rule stricter than safetensors' own
        with pytest.raises(Exception):
            load_file(_PATH)
    return verdict


def _checked_then_read(path):
    """_checked's verdict; a file it lets through is also read the way the pack reads it."""
    verdict = _checked(path)
    if verdict is None:
        convert.read_checkpoint(path)
    return verdict


def _checked(path):
    try:
        sf.check_safetensors(path)
    except errors.MalformedFile as exc:
        return exc
    return None


def test_the_seeds_are_valid():
    """Shown able to fail: with `covered != data_bytes` reversed, every seed was refused."""
    for seed in SEEDS:
        assert outcome(seed) is None


@fuzz_settings(ci_cases=800)
@given(st.sampled_from(range(len(SEEDS))).flatmap(lambda i: mutations(SEEDS[i])))
def test_corrupted_files(data):
    """Byte-level corruption of valid files. Shown able to fail: without the final
    `covered != data_bytes` check, bytes added to the data section got through and
    load_file raised SafetensorError."""
    outcome(data)


def _split(seed: bytes):
    (n,) = struct.unpack("<Q", seed[:8])
    return json.loads(seed[8:8 + n]), seed[8 + n:]


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**65), interesting_ints(256),
                    st.text(max_size=8), st.sampled_from(["F32", "F16", "BF16", "I64", "U8",
                                                          "F8_E4M3", "f32", "F4", "Q8_0", ""]),
                    st.lists(interesting_ints(256) | st.sampled_from([2**64, 2**65]), max_size=3))


@st.composite
def mutated_headers(draw):
    """A seed whose JSON header was edited: a field of a tensor replaced, a tensor removed
    or duplicated, the metadata changed; optionally a different declared length or data."""
    header, data = _split(SEEDS[draw(st.integers(0, len(SEEDS) - 1))])
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        kind = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "copy", "meta", "field"]))
        info = header.get(name)
        if not isinstance(info, dict):
            continue
        if kind in ("dtype", "shape", "data_offsets"):
            info[kind] = draw(_VALUES)
        elif kind == "drop":
            header.pop(name)
        elif kind == "copy":
            header[name + "_copy"] = dict(info)
        elif kind == "meta":
            header["__metadata__"] = draw(_VALUES | st.dictionaries(st.text(max_size=3), _VALUES, max_size=2))
        else:
            info[draw(st.text(max_size=4))] = draw(_VALUES)
    text = json.dumps(header).encode()
    text += b" " * draw(st.integers(0, 9))
    declared = draw(st.one_of(st.just(len(text)), interesting_ints(len(text))))
    data = draw(st.one_of(st.just(data), st.binary(max_size=64)))
    return struct.pack("<Q", declared % 2**64) + text + data


@fuzz_settings(ci_cases=800)
@given(mutated_headers())
def test_mutated_headers(data):
    """Shown able to fail: without the dtype-name check, dtype '' raised KeyError in the
    size check; with only overlaps refused (`begin < covered`, gaps let through), load_file
    raised SafetensorError ('invalid offset')."""
    outcome(data)


# -- each problem by name --------------------------------------------------------------
def _file(header_text: bytes, data: bytes = b"", declared=None):
    n = len(header_text) if declared is None else declared
    return struct.pack("<Q", n) + header_text + data


@pytest.mark.parametrize("data,needle", [
    (_file(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'), "not valid JSON"),
    (_file(b"[" * 50_000 + b"]" * 50_000), "not a JSON object"),
    (_file(b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}"), "nests JSON too deeply"),
    (_file(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', bytes(2)), "past its end"),
    (_file(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
           b'"b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}', bytes(8)), "overlaps"),
    (_file(b'{"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}', bytes(4)), "dtype 'F33'"),
    (_file(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}', bytes(4)), "needs 8"),
    (_file(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
           b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', bytes(4)), "appears twice"),
    (_file(b'{"a": {"dtype": "F32", "shape": [0, 36893488147419103232], "data_offsets": [0, 0]}}'),
     "not a list of integers"),
    (_file(b"{}", declared=2**63), "header length"),
    (_file(b"{}", declared=200_000_000) + bytes(200), "header length"),
    (b"\x80\x04", "too short"),
    (pickle.dumps({"a": 1}) + bytes(16), "header length"),
], ids=["bad-json", "not-object", "deep-json", "past-end", "overlap", "dtype", "size", "duplicate",
        "huge-dim", "absurd-length", "length-past-file", "short", "pickle"])
def test_each_problem_is_named(tmp_path, data, needle):
    """Shown able to fail: without the RecursionError clause the deep header raised
    RecursionError; without object_pairs_hook the duplicate was accepted; with the header
    read before the length check, the absurd length raised OverflowError; with _is_int
    accepting any int, the 2**65 dimension got through and safetensors raised
    SafetensorError."""
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(errors.MalformedFile, match=needle) as info:
        sf.read_safetensors(path)
    assert str(path) in str(info.value)


def test_reading_never_unpickles(tmp_path, monkeypatch):
    """A torch.save file (a zipped pickle) named .safetensors is refused, and neither
    torch.load nor pickle's loaders are called. Shown able to fail: reading files with
    torch.load(weights_only=True) when the header check failed tripped the patched
    torch.load."""
    path = tmp_path / "model.safetensors"
    torch.save({"a": torch.ones(1)}, path)

    def unpickle(*args, **kwargs):
        raise AssertionError("something was unpickled")
    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, unpickle)
    with pytest.raises(errors.MalformedFile, match="header length"):
        sf.read_safetensors(path)
