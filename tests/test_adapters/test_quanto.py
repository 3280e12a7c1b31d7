"""optimum-quanto adapter: accuracy, honest sizes, the plain-tensor contract, and agreement
with quanto's own quantized tensors and modules on the same weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import pack_module
from harness.backend_checks import (check_missing_package_message, check_plain_parts_with_honest_size,
                                    format_helpers)
from harness.draws import gaussian, heavy_tailed, rel_err
from harness.tolerances import rounding_bound, tie_flip_error

registry = pack_module("backends.engine.registry")
hardware_problem = pack_module("backends.engine.base").hardware_problem
parts_nbytes = pack_module("backends.engine.base").parts_nbytes
BackendUnavailable = pack_module("backends.engine.errors").BackendUnavailable
quanto_adapter = pack_module("backends.adapters.quanto")
unpack_int4 = quanto_adapter.unpack_int4
ADAPTER = quanto_adapter.QuantoAdapter()
ALL = ["int8", "fp8", "int4"]

spec, round_trip, assert_in_band = format_helpers(ADAPTER)


def quanto_weight(parts, name, shape):
    """Our parts put back into quanto's own weight tensors (on the CPU) and dequantized by
    quanto. int4: the codes unpacked as quanto's pack_weights lays them out (row i in the
    low nibble of packed row i, row i + len(packed) in the high one), since quanto's own
    unpack op compiles a C++ extension first."""
    from optimum.quanto import WeightQBitsTensor, WeightQBytesTensor, qtypes

    qtype = qtypes[spec(name).qtype]
    p = {k: v.cpu() for k, v in parts.items()}
    size = torch.Size(shape)
    stride = torch.empty(size, device="meta").stride()
    if qtype.bits == 8:
        return WeightQBytesTensor(qtype, 0, size, stride, p["weight"], p["scale"], None).dequantize()
    packed, groups = p["weight"], p["scale"].shape[0]
    codes = torch.cat([packed & 0x0F, (packed >> 4) & 0x0F])[:groups]
    theirs = WeightQBitsTensor(qtype, 0, 128, size, stride, codes, p["scale"], p["shift"])
    theirs._data = codes
    return theirs.dequantize()


def test_format_ids_are_the_api():
    """Shown able to fail: 2 * 16 / GROUP_SIZE -> 2 * 32 / GROUP_SIZE in quanto.py's int4
    entry (fp32 scale and shift counted) -> bits_per_weight 4.5 != 4.25."""
    assert list(ADAPTER.formats) == ALL
    assert [s.id for s in ADAPTER.formats.values()] == ["quanto:int8", "quanto:fp8", "quanto:int4"]
    int4 = spec("int4")
    assert int4.keep_final_projection and int4.block_size == 128 and int4.fallback == "int8"
    assert int4.bits_per_weight == 4.25


@pytest.mark.parametrize("dist", ["gaussian", "heavy_tailed"])
@pytest.mark.parametrize("name", ALL)
def test_round_trip_error(name, dist):
    """The round trip lands in the format's rate-distortion band.
    Shown able to fail: w = scale * data -> (scale * 1.03) * data in quanto.py's dequantize
    (8-bit scales 3 % off) -> int8 Gaussian 0.031 > 0.0125, fp8 Gaussian 0.040 > 0.036;
    the fp8 entry's qtype "qfloat8_e4m3fn" -> "qint8" -> fp8 Gaussian 0.0075 < 0.018 (below
    the band); - shift -> + shift in the int4 branch -> int4 5.3 > 0.17."""
    w = gaussian((256, 512)) if dist == "gaussian" else heavy_tailed((256, 512))
    _, back = round_trip(w, name)
    assert back.shape == w.shape and back.dtype == torch.float32
    assert_in_band(rel_err(back, w), name, dist == "heavy_tailed", dist)


@pytest.mark.parametrize("name", ALL)
def test_parts_are_plain_tensors_with_honest_size(name):
    """Shown able to fail: INT4_SCALE_DTYPE = torch.float32 in quanto.py -> int4 stores 4.5
    bits a weight, not 4.25 (approx fails)."""
    check_plain_parts_with_honest_size(ADAPTER, name, parts_nbytes)


@pytest.mark.parametrize("name", ALL)
def test_conv_weight_round_trip(name):
    """A conv weight (width 384 = 3 groups of 128) inside the band.
    Shown able to fail: reshape(weight.shape[0], -1) -> .permute(0, *range(weight.dim() - 1,
    0, -1)).reshape(...) in quanto.py's _as_matrix (columns of a 4-D weight reordered, 2-D
    unchanged) -> 1.41 for all three formats, while test_round_trip_error passes."""
    for dist, w in (("gaussian", gaussian((64, 32, 3, 4))), ("heavy", heavy_tailed((64, 32, 3, 4)))):
        _, back = round_trip(w, name)
        assert back.shape == w.shape
        assert_in_band(rel_err(back, w), name, dist == "heavy", f"conv {tuple(w.shape)} {dist}")


def test_int4_needs_whole_groups():
    """Shown able to fail: block_size=GROUP_SIZE dropped from quanto.py's int4 entry ->
    supports_shape accepts width 200 (None is not None fails)."""
    assert ADAPTER.supports_shape(spec("int4"), torch.Size((64, 200))) is not None
    assert ADAPTER.supports_shape(spec("int8"), torch.Size((64, 200))) is None


def test_all_zero_rows_stay_zero():
    """Shown able to fail: _nonzero in quanto.py returning the scale unchanged -> 0 / 0 gives
    NaN in the zero row (fails at fp8)."""
    w = gaussian((8, 256))
    w[3] = 0
    for name in ALL:
        _, back = round_trip(w, name)
        assert torch.isfinite(back).all() and back[3].abs().max() == 0, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ALL)
def test_linear_matches_quanto_dequantization(name, dtype):
    """linear() on our parts against the float product with the weight quanto's own tensors
    dequantize from them (quanto_weight), not our dequantize.
    Shown able to fail: scale.to(x.dtype) -> (scale * 1.03).to(x.dtype) in quanto.py's
    linear (the qbytes_mm call) -> int8 and fp8 0.030 (all six fail); - shift -> + shift in
    dequantize (int4 computes through it) -> int4 6.0 (all three fail; the old reference,
    our dequantize, moved with it)."""
    w = gaussian((192, 256))
    parts = ADAPTER.quantize(w, spec(name))
    x = gaussian((3, 5, 256), seed=7).to(dtype) * 50
    bias = gaussian((192,), seed=8).to(dtype)
    y = ADAPTER.linear(x, parts, spec(name), w.shape, bias)
    ref = F.linear(x.double(), quanto_weight(parts, name, w.shape).double(), bias.double())
    assert y.shape == (3, 5, 192) and y.dtype == dtype
    # float32: the 256-term sums round; half precision: the sums run in float32 and the
    # weight, its scale and the output are each rounded to the dtype once
    assert rel_err(y, ref) < rounding_bound(dtype, 256 if dtype == torch.float32 else 3)


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_eight_bit_matches_quanto_tensor_and_module(name):
    """Same bytes as quanto's own frozen QLinear, same dequantized weight and output.
    Shown able to fail: w = scale * data -> (scale * 1.03) * data in quanto.py's dequantize
    -> our dequantization differs from quanto's (torch.equal fails, int8 and fp8)."""
    from optimum.quanto import freeze, qtypes, quantize

    w, b = heavy_tailed((96, 256)), gaussian((96,), seed=2)
    lin = torch.nn.Linear(256, 96)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    model = torch.nn.Sequential(lin)
    quantize(model, weights=qtypes[spec(name).qtype])
    freeze(model)
    qweight = model[0].weight
    parts = ADAPTER.quantize(w, spec(name))
    assert torch.equal(parts["weight"].view(torch.uint8), qweight._data.view(torch.uint8))
    assert torch.equal(parts["scale"], qweight._scale)
    assert torch.equal(ADAPTER.dequantize(parts, spec(name), w.shape, torch.float32),
                       qweight.dequantize())
    x = gaussian((4, 256), seed=5) * 50
    with torch.no_grad():
        expected = model(x)
    bound = rounding_bound(torch.float32, 256)
    assert torch.allclose(ADAPTER.linear(x, parts, spec(name), w.shape, b), expected,
                          rtol=bound, atol=bound)


def test_int4_matches_quanto_packing_and_dequantization():
    """quanto's own ops on the same weight: MaxOptimizer scales, quantize_affine codes,
    pack_weights bytes, and the QBitsTensor dequantization.
    Shown able to fail: torch.cat([packed & 0x0F, packed >> 4]) -> the nibbles swapped in
    quanto.py's unpack_int4 -> the unpacked codes differ (torch.equal fails)."""
    from optimum.quanto import MaxOptimizer, WeightQBitsTensor, qint4

    w = heavy_tailed((96, 384))
    parts = ADAPTER.quantize(w, spec("int4"))
    scale, shift = MaxOptimizer()(w, qtype=qint4, axis=0, group_size=128)
    assert torch.equal(parts["scale"], scale.to(torch.float16))
    assert torch.equal(parts["shift"], shift.to(torch.float16))
    codes = torch.ops.quanto.quantize_affine(w, bits=4, axis=0, group_size=128,
                                             scale=parts["scale"], shift=parts["shift"])
    theirs = WeightQBitsTensor(qint4, 0, 128, w.size(), w.stride(), codes, parts["scale"],
                               parts["shift"])
    assert torch.equal(parts["weight"], theirs._data._data)
    assert torch.equal(unpack_int4(parts["weight"], codes.shape[0]), codes)
    # quanto dequantizes unpacked codes as is (its unpack op would compile a C++ extension)
    theirs._data = codes
    assert torch.equal(ADAPTER.dequantize(parts, spec("int4"), w.shape, torch.float16),
                       theirs.dequantize())


def test_int4_odd_number_of_groups():
    """Shown able to fail: the nibbles swapped in quanto.py's unpack_int4 -> 1.84, out of the
    band; - shift -> + shift in dequantize -> 4.8."""
    w = gaussian((3, 128))  # 3 groups: the packed tensor holds 2 rows, one nibble unused
    parts, back = round_trip(w, "int4")
    assert parts["weight"].shape == (2, 128)
    assert_in_band(rel_err(back, w), "int4", False, "3 groups")
    assert torch.equal(back, quanto_weight(parts, "int4", w.shape).float())


@pytest.mark.parametrize("name", ALL)
def test_runs_on_cpu_as_claimed(name):
    """Shown able to fail: needs_cuda=True added to quanto.py's int8 entry -> hardware_problem
    says it needs an NVIDIA GPU (int8 fails)."""
    assert hardware_problem(spec(name), torch.device("cpu")) is None


def test_missing_package_gives_clear_message():
    """Shown able to fail: pip_requirement = "optimum-quanto" (no version) in quanto.py ->
    the message lacks optimum-quanto>=0.2.6 (assert fails)."""
    check_missing_package_message(ADAPTER, "int8", "optimum-quanto>=0.2.6", registry, BackendUnavailable)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ALL)
def test_cuda_path(name):
    """On CUDA: round trips in the band, dequantize equal to quanto's own tensors, and
    linear() against their product.
    Shown able to fail (run on an H200): scale.to(x.dtype) -> (scale * 1.03).to(x.dtype) in
    quanto.py's linear -> int8 and fp8 0.030 > 0.016; - shift -> + shift in dequantize ->
    int4's round trip 5.27, out of the band."""
    if not torch.cuda.is_available():
        pytest.fail("needs a CUDA GPU: run on the GPU machine (bash .ci/gpu_tests)")
    s = spec(name)
    for dist, draw in (("gaussian", gaussian((512, 1024))), ("heavy", heavy_tailed((512, 1024)))):
        _, back = round_trip(draw.cuda(), name)
        assert_in_band(rel_err(back, draw.cuda()), name, dist == "heavy", f"CUDA {dist}")
    w = heavy_tailed((512, 1024))
    parts = ADAPTER.quantize(w.cuda(), s)
    assert all(type(t) is torch.Tensor and t.is_cuda for t in parts.values())
    back = ADAPTER.dequantize(parts, s, w.shape, torch.float32)
    reference = quanto_weight(parts, name, w.shape).double().cuda()
    # (code - shift) x scale on each side
    assert rel_err(back, reference) < rounding_bound(torch.float32, 2), rel_err(back, reference)
    cpu_parts = ADAPTER.quantize(w, s)
    # the CPU and the GPU quantizers agree but for rounding ties
    flips = tie_flip_error(rel_err(back, w.cuda()))
    err = rel_err(back.cpu(), ADAPTER.dequantize(cpu_parts, s, w.shape, torch.float32))
    assert err < flips, (err, flips)
    for dtype in (torch.float16, torch.bfloat16):
        for tokens in (1, 7, 300):
            x = torch.randn(tokens, 1024, device="cuda", dtype=dtype)
            bias = torch.randn(512, device="cuda", dtype=dtype)
            y = ADAPTER.linear(x, parts, s, w.shape, bias)
            product = x.double() @ reference.t()
            # relative to the product (a unit bias would hide a third of the error); four
            # roundings to the half dtype: the scale, the scaled weight, the output, the bias add
            err = rel_err(y.double() - bias.double(), product)
            assert y.dtype == dtype and err < rounding_bound(dtype, 4), (dtype, tokens, err)
