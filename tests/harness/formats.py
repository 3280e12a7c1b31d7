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

OUTPUT ERROR of a whole model is banded around the float noise reference of the layers a
format quantized (noise_reference.py), with the same margin.
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
