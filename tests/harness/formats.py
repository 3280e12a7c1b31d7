"""Per-format expectations shared by the tests.

WEIGHT ERROR, from the formats' physics. On Gaussian weights no code that spends b bits
a weight can beat a relative RMS error of 2^-b (the rate-distortion bound of a Gaussian
source), and codes with one absmax scale per block or row stay within a small factor of
it: measured 1.55-2.8x for every integer/NF4/FP4 format here (2026-12-02). So a round
trip must land in [1, 3.2] x 2^-b: a format one bit coarser or finer than it claims, or a
scale off by a few per cent, leaves the band. float8 e4m3 keeps 3 mantissa bits per value
instead: its relative RMS rounding error is at most 2^-4 / sqrt(3) (uniform rounding in
the top binade) and, values spread over the binades, at least half of that. Heavy-tailed
weights (Student-t, 3 dof) widen absmax-scaled codes' error: up to 8 x 2^-b.

OUTPUT ERROR of one denoiser call vs the unquantized model on the same inputs (tiny SD3,
heavy-tailed weights), by format id. A format without an entry fails the tests until
someone states its bound.
"""
import math

FLOAT8_FORMATS = {"torchao:fp8wo", "torchao:fp8dq", "quanto:fp8"}  # e4m3: 3 mantissa bits
# formats that also round the activations to 8 bits (W8A8, fp8 row-wise, LLM.int8)
ACTIVATION_QUANTIZED = {"torchao:int8dq", "torchao:fp8dq", "bnb:int8"}
BAND_ABOVE_BOUND = 3.2  # stated margin over the rate-distortion bound, Gaussian weights
HEAVY_TAIL_FACTOR = 8.0


def weight_error_band(format_id: str, bits: float, heavy: bool = False) -> tuple:
    """(lowest, highest) relative RMS error a round trip of this format may give."""
    if format_id in FLOAT8_FORMATS:
        top = 2 ** -4 / math.sqrt(3)
        return top / 2, top * (1.25 if heavy else 1.0)
    floor = 2 ** -bits
    return (0.0 if heavy else floor), floor * (HEAVY_TAIL_FACTOR if heavy else BAND_ABOVE_BOUND)


def activation_error(format_id: str) -> float:
    """What rounding the activations to 8 bits adds to a layer's output error, at most."""
    return BAND_ABOVE_BOUND * 2 ** -8 if format_id in ACTIVATION_QUANTIZED else 0.0


# Denoiser output vs the unquantized model on the same inputs (tiny SD3, heavy-tailed).
OUTPUT_TOLERANCE = {
    "torchao:int8wo": 0.03, "torchao:int8dq": 0.04, "torchao:fp8wo": 0.05, "torchao:fp8dq": 0.08,
    "torchao:int4wo": 0.25,
    "bnb:nf4": 0.25, "bnb:nf4dq": 0.25, "bnb:fp4": 0.35, "bnb:fp4dq": 0.35, "bnb:int8": 0.05,
    "quanto:int8": 0.03, "quanto:fp8": 0.06, "quanto:int4": 0.25,
    "gguf:Q8_0": 0.03, "gguf:Q6_K": 0.06, "gguf:Q5_K": 0.1, "gguf:Q5_1": 0.1, "gguf:Q5_0": 0.12,
    "gguf:Q4_K": 0.2, "gguf:Q4_1": 0.2, "gguf:Q4_0": 0.25, "gguf:Q3_K": 0.35, "gguf:Q2_K": 0.7,
}


def cpu_format_ids(registry, hardware_problem):
    import torch
    out = []
    # a backend whose package is missing keeps its formats here: their tests fail, saying
    # which package to install, rather than the parametrisation shrinking unnoticed
    for adapter in registry.adapters().values():
        for spec in adapter.formats.values():
            if not spec.read_only and hardware_problem(spec, torch.device("cpu")) is None:
                out.append(spec.id)
    return out
