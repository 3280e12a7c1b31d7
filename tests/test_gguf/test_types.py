"""The GGML type table (backends/gguf/types.py) against gguf-py, an independent source, and
against what the README states of it."""
from __future__ import annotations

import itertools
import re

import gguf  # a test dependency (.ci/requirements-dev.txt): missing means failing, not skipping

from conftest import pack_module
from harness.locations import REPO_ROOT

gt = pack_module("backends.gguf.types")

WRITABLE = {n for n, t in gt.QUANTIZED.items() if t.quantizer}
READ_ONLY = set(gt.QUANTIZED) - WRITABLE
TYPE_NAME = re.compile(r"\b[A-Z][A-Z0-9_]*\d[A-Z0-9_]*\b")  # Q8_0, IQ4_XS, BF16, MXFP4


def _readme_table(heading: str) -> list:
    """The rows (lists of cells, header row left out) of the first table under `heading`."""
    lines = (REPO_ROOT / "README.md").read_text().split(f"\n{heading}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    return [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]


def test_every_row_matches_gguf_py():
    """Block length and bytes per block of every type, float ones too, equal gguf-py's
    GGML_QUANT_SIZES; bits per weight are 8 x bytes / weights.
    Shown able to fail: Q4_K's bytes per block 144 -> 146 in types.py -> (256, 144) != (256, 146)."""
    for name, t in gt.GGML_TYPES.items():
        sizes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
        assert sizes == (t.block_len, t.type_size), name
        assert t.bits_per_weight == 8 * sizes[1] / sizes[0], name
        if t.dtype is not None:
            assert t.dtype.itemsize == t.type_size, name


def test_readme_gguf_types_table():
    """"GGUF types read and written": the written, read-only and float rows name exactly the
    table's writable, read-only and float types, the Triton kernel decodes exactly the
    written ones, and the types left to gguf-py are ones QuantKit has no decoder for.
    Shown able to fail: Q2_K removed from the first row of that README table -> the
    written row lacks 'Q2_K'."""
    rows = _readme_table("### GGUF types read and written")
    by_kind = {}
    for types, written, read, kernel in rows:
        kind = ("written" if written == "yes" else "read only" if written.startswith("no (") else
                "float" if written.startswith("kept") else "gguf-py")
        by_kind[kind] = (set(TYPE_NAME.findall(types)), kernel)
    assert by_kind["written"][0] == WRITABLE, "the written row"
    assert by_kind["read only"][0] == READ_ONLY, "the read-only row"
    assert by_kind["float"][0] == set(gt.FLOAT_TYPES), "the float row"
    assert not by_kind["gguf-py"][0] & set(gt.GGML_TYPES), "QuantKit decodes these itself"
    assert by_kind["written"][1] == "one Triton kernel"
    assert {n for n, t in gt.QUANTIZED.items() if t.kernel_id is not None} == WRITABLE
    assert by_kind["read only"][1] == "torch ops"


def test_readme_formats_table_gguf_rows():
    """"Formats and hardware": one gguf row entry per writable type, each with the table's
    bits per weight (as rounded there, to 2 decimals at most), and the K-quants' fallbacks.
    Shown able to fail: Q3_K's README bits 3.44 -> 3.45 -> 'gguf:Q3_K' states 3.45, the table
    3.4375; README's fallback 'Q4_K→Q4_1' -> 'Q4_K→Q4_0' -> the fallbacks differ."""
    stated, notes = {}, ""
    for cells in _readme_table("## Formats and hardware"):
        names = re.findall(r"`gguf:(\w+)`", cells[0])
        if names:
            bits = re.split(r", | / ", cells[1])
            assert len(bits) == len(names), cells[:2]
            stated.update(zip(names, map(float, bits)))
            notes += cells[4]
    assert set(stated) == WRITABLE
    for name, bits in stated.items():
        assert abs(bits - gt.QUANTIZED[name].bits_per_weight) <= 0.005 + 1e-9, (
            f"gguf:{name} states {bits}, the table {gt.QUANTIZED[name].bits_per_weight}")
    fallbacks = {}
    for sources, target in re.findall(r"([\w/]+)→(\w+)", notes):
        fallbacks.update(dict.fromkeys(sources.split("/"), target))
    assert fallbacks == {n: t.fallback for n, t in gt.QUANTIZED.items() if t.fallback}
