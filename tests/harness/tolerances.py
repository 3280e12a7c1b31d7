"""Every numeric tolerance the tests use: four kinds of comparison, their bounds.

1. A FORMAT's round trip against the float weights: a band from the format's physics.
   On Gaussian weights no code that spends b bits a weight can beat a relative RMS error of
   2^-b (the rate-distortion bound of a Gaussian source), and codes with one absmax scale
   per block or row stay within a small factor of it: measured 1.55-2.8x for every
   integer/NF4/FP4 format here (2026-12-02). So a round trip must land in [1, 3.2] x 2^-b: a
   format one bit coarser or finer than it claims, or a scale off by a few per cent, leaves
   the band. float8 e4m3 keeps 3 mantissa bits per value instead: its relative RMS rounding
   error is at most 2^-4 / sqrt(3) (uniform rounding in the top binade) and, values spread
   over the binades, at least half of that. Heavy-tailed weights (Student-t, 3 dof) widen
   absmax-scaled codes' error: up to 8 x 2^-b. Formats that also round the activations to
   8 bits add at most 3.2 x 2^-8 to a layer's output (`activation_error`). The output error
   of a whole model is banded the same way around a float noise reference
   (noise_reference.py).

2. A LAYER's output against the float product of the float weights: `product_bound`. For
   inputs x with independent zero-mean entries of variance s^2, E||x E^T||^2 = s^2 ||E||^2
   and E||x W^T||^2 = s^2 ||W||^2, so a weight error e_w = ||E|| / ||W|| reaches y = x W^T as
   e_w in expectation; over n output values each squared norm is a chi-square-like sum of
   relative spread sqrt(2/n), so the ratio of the norms strays from 1 by about sqrt(2/n)
   (measured 0.6-1.4 x sqrt(2/n) on float draws: iid, per-row and per-32-block absmax noise
   on Student-t weights, and a 3x3 conv; worst of 300 draws 6.4 x), and 8 x sqrt(2/n) leaves
   a margin of over 5 standard deviations (every CPU format, test_contract.py: output /
   weight error 0.98-1.02). The bias is exact: measure against x W^T alone.

3. Two computations of the SAME math (a fused kernel against its reference, our dequantizer
   against gguf-py, a compiled graph against eager): `rounding_bound(dtype, k)` =
   2u sqrt(k), u = eps / 2 the unit roundoff of the dtype, k the roundings each output
   value went through (a k-term sum: k; the weight, its scale and the output each cast to
   bf16: 3). One correctly rounded operation is off by at most u. In a sum the error of
   each step is u x the partial sum, and random-sign partial sums grow like sqrt(i), so a
   sequential sum of k terms is off by about u sqrt(k) RMS or less (blocked and pairwise
   sums, as BLAS libraries use, do better); twice that leaves room for another machine's
   summation order (CI runs on a fresh machine). Used as allclose's rtol and atol.
   Measured (2026-12-06, CPU): float32 products of 256-512 terms 0.1-0.15 of the bound,
   half-precision outputs 0.12-0.25 of rounding_bound(dtype, 3). Bit-exact comparisons
   stay exact. An RMS comparison (rel_err) is held to the same bound: the RMS of the
   errors is below their largest.

4. The same QUANTIZER run twice (float32 against float64 scales, CPU against GPU, ours
   against the library's): the codes agree except where a value lies within float32
   rounding of a decision boundary. With codes up to L = 127, x / s is off by at most
   L x rounding_bound(float32, 2) (the scale's rounding and the division's), so a code can
   flip only inside a window of twice that around each boundary, one code step apart: a
   fraction of at most 2 x 127 x 1.7e-7 = 4.3e-5 of the codes. `TIE_FRACTION` allows 1e-3
   (23x): a rounding mode changed (floor for round) flips about half of them, a scale off by
   a code step nearly all. Each flip moves a value by one step, whose own rounding error
   is step / sqrt(12) RMS, so flips add at most `tie_flip_error` = sqrt(12 x TIE_FRACTION)
   = 0.11 x the round trip's error.

Not tolerances, and not here: what a test claims (a fit beats the best single format by
a stated margin, a model fits a budget, an estimate from N samples lies within its
sampling spread) is stated in the test, from the claim.
"""
from __future__ import annotations

import math

import torch

from .formats import ACTIVATION_QUANTIZED, FLOAT8_FORMATS

BAND_ABOVE_BOUND = 3.2  # stated margin over the rate-distortion bound, Gaussian weights
HEAVY_TAIL_FACTOR = 8.0
PRODUCT_SIGMAS = 8.0  # margin of product_bound, in units of the ratio's spread sqrt(2/n)


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


def product_bound(weight_error: float, n_outputs: int) -> float:
    """Highest relative error a weight error carries into x W^T over n_outputs values
    (random isotropic x, bias left out)."""
    return weight_error * (1 + PRODUCT_SIGMAS * math.sqrt(2 / n_outputs))


TIE_FRACTION = 1e-3  # fraction of codes two runs of the same quantizer may differ in (4. above)


def tie_flip_error(round_trip_error: float) -> float:
    """Relative error the tie flips of two runs of the same quantizer may put between their
    decoded weights, given the round trip's own relative error."""
    return math.sqrt(12 * TIE_FRACTION) * round_trip_error


def rounding_bound(dtype: torch.dtype, k: int = 1) -> float:
    """Relative difference allowed between two computations of the same math in `dtype`
    whose outputs went through k roundings each (a k-term sum: k)."""
    return 2 * (torch.finfo(dtype).eps / 2) * math.sqrt(k)
