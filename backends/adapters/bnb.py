"""bitsandbytes formats: NF4 / FP4 (optionally with double-quantized scales) and LLM.int8.

4-bit: the flattened weight is cut into blocks of 64 values, each with one absmax scale
(fp32, or with double quantization 8-bit codes plus one fp32 scale per 256 of them). The
parts are the plain tensors of a bnb `QuantState`, rebuilt per call for bnb.matmul_4bit.

int8 (LLM.int8): int8 weights with one absmax per output row. At matmul time the
activations are quantized per row to int8, except the input columns holding a value
with |x| >= 6.0: those columns are multiplied in the activation's dtype against the
dequantized weight columns and added to the int8 product (bnb's mixed decomposition).
bnb runs this on plain tensors on CPU and CUDA alike (on CPU the int8 product uses
torch._int_mm with AVX-512, else a float32 matmul).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..engine.base import BackendAdapter, FormatSpec, require_format
from ..engine.errors import BackendUnavailable, FormatUnsupported, MalformedFile, UnknownFormat
from ..engine.registry import register

log = logging.getLogger(__name__)

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256  # bnb quantizes the 4-bit absmax in blocks of this size
OUTLIER_THRESHOLD = 6.0
_BNB_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class BnbFormat(FormatSpec):
    quant_type: str = "nf4"  # "nf4", "fp4" or "int8"
    double_quant: bool = False
    # bnb's quantization block over the *flattened* weight: unlike FormatSpec.block_size
    # it puts no constraint on the input width.
    blocksize: int = BLOCKSIZE


def _four_bit(name, quant_type, double_quant, desc):
    absmax_bits = 8 / BLOCKSIZE + 32 / (BLOCKSIZE * NESTED_BLOCKSIZE) if double_quant else 32 / BLOCKSIZE
    return BnbFormat(backend="bnb", name=name, bits_per_weight=4 + absmax_bits, description=desc,
                     keep_final_projection=True, quant_type=quant_type, double_quant=double_quant)


_CODES: dict = {}


def _code(kind: str, device: str) -> torch.Tensor:
    """The lookup tables bnb derives from constants (never stored with the weight)."""
    code = _CODES.get((kind, device))
    return _make_code(kind, device) if code is None else code


@torch.compiler.disable  # bnb builds the tables with .tolist(); once cached, a compiled forward reads them
def _make_code(kind: str, device: str) -> torch.Tensor:
    import bitsandbytes.functional as bf

    code = (bf.create_dynamic_map(signed=True).to(device) if kind == "dynamic"
            else bf.get_4bit_type(kind, device=device))
    _CODES[(kind, device)] = code
    return code


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() < 2:
        raise FormatUnsupported(f"bitsandbytes stores matrices and convolution weights; got a "
                                f"{weight.dim()}-D tensor of shape {tuple(weight.shape)}.")
    w = weight.detach().reshape(weight.shape[0], -1)
    if w.dtype not in _BNB_FLOATS:
        w = w.float()
    return w.contiguous()


def _matrix_shape(shape) -> tuple:
    width = 1
    for d in shape[1:]:  # a loop, not prod(genexpr): torch.compile traces this
        width *= int(d)
    return int(shape[0]), width


@register
class BitsAndBytesAdapter(BackendAdapter):
    name = "bnb"
    package = "bitsandbytes"
    pip_requirement = "bitsandbytes>=0.45.0"
    formats = {
        "nf4": _four_bit("nf4", "nf4", False, "NF4 4-bit (normal-float levels), one fp32 scale "
                                                "per 64 weights; the usual QLoRA format"),
        "nf4dq": _four_bit("nf4dq", "nf4", True, "NF4 4-bit with double quantization: the "
                                                   "per-64 scales stored as 8-bit codes"),
        "fp4": _four_bit("fp4", "fp4", False, "FP4 4-bit (e2m1 float levels), one fp32 scale "
                                                "per 64 weights"),
        "fp4dq": _four_bit("fp4dq", "fp4", True, "FP4 4-bit with double quantization of the "
                                                   "per-64 scales"),
        # 8 bits plus one fp32 absmax per output row (32 / width more, < 0.05 for width >= 640)
        "int8": BnbFormat(backend="bnb", name="int8", bits_per_weight=8.0, quant_type="int8",
                          description="LLM.int8: int8 weights per row, int8 activations; input "
                                      "columns with values >= 6.0 stay in 16-bit",
                          min_compute_capability=(7, 5)),
    }

    def _spec(self, spec: FormatSpec) -> BnbFormat:
        if spec.backend != self.name:
            raise UnknownFormat(f"The bitsandbytes backend was given the format '{spec.id}' of "
                                f"another backend; use that backend's adapter for it.")
        return require_format(self, spec.name)

    def _functional(self):
        problem = self.missing_package()
        if problem:
            raise BackendUnavailable(problem)
        import bitsandbytes.functional as bf

        return bf

    # -- quantize -------------------------------------------------------------------
    def quantize(self, weight, spec):
        spec = self._spec(spec)
        bf = self._functional()
        w = _as_matrix(weight)
        if spec.quant_type == "int8":
            # bnb quantizes weights from fp16 (Int8Params does the same)
            cb, row_absmax, _ = bf.int8_vectorwise_quant(w.to(torch.float16))
            return {"weight": cb.contiguous(), "row_absmax": row_absmax.float().contiguous()}
        packed, state = bf.quantize_4bit(w, blocksize=spec.blocksize, quant_type=spec.quant_type,
                                         compress_statistics=spec.double_quant)
        parts = {"weight": packed, "absmax": state.absmax}
        if spec.double_quant:
            if state.state2.blocksize != NESTED_BLOCKSIZE:
                raise FormatUnsupported(
                    f"This bitsandbytes version double-quantizes with blocks of "
                    f"{state.state2.blocksize}, not {NESTED_BLOCKSIZE}; {spec.id} cannot store it. "
                    f"Install a supported version: python -m pip install '{self.pip_requirement}'")
            parts["nested_absmax"] = state.state2.absmax
            parts["offset"] = state.offset.reshape(()).float()
        return {k: v.detach().contiguous() for k, v in parts.items()}

    # -- dequantize -----------------------------------------------------------------
    def _check_parts(self, parts, spec: BnbFormat, shape) -> None:
        needed = ["weight", "row_absmax"] if spec.quant_type == "int8" else ["weight", "absmax"]
        if spec.double_quant:
            needed += ["nested_absmax", "offset"]
        missing = [k for k in needed if k not in parts]
        rows, width = _matrix_shape(shape)
        n = rows * width
        expected = n if spec.quant_type == "int8" else (n + 1) // 2
        if missing or parts["weight"].numel() != expected:
            raise MalformedFile(
                f"The stored {spec.id} weight does not match its shape {tuple(shape)} (missing "
                f"parts: {missing or 'none'}; payload {parts.get('weight', torch.empty(0)).numel()} "
                f"values, expected {expected}). The file is damaged or was written for another "
                f"layer; quantize the model again.")

    def _quant_state(self, bf, parts, spec: BnbFormat, qshape, dtype):
        device = str(parts["weight"].device)
        state2 = offset = None
        if spec.double_quant:
            state2 = bf.QuantState(absmax=parts["nested_absmax"], code=_code("dynamic", device),
                                   blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
            offset = parts["offset"]
        return bf.QuantState(absmax=parts["absmax"], shape=torch.Size(qshape),
                             code=_code(spec.quant_type, device), blocksize=spec.blocksize,
                             quant_type=spec.quant_type, dtype=dtype, offset=offset, state2=state2)

    def dequantize(self, parts, spec, shape, dtype):
        spec = self._spec(spec)
        bf = self._functional()
        self._check_parts(parts, spec, shape)
        work = dtype if dtype in _BNB_FLOATS else torch.float32
        if spec.quant_type == "int8":
            w = bf.int8_vectorwise_dequant(parts["weight"], parts["row_absmax"])
        else:
            # Flat: bnb 0.50's CPU kernel misplaces the scales of a matrix whose rows are not
            # a whole number of blocks (e.g. 64 x 288); the blocks run over the flat weight anyway.
            rows, width = _matrix_shape(shape)
            state = self._quant_state(bf, parts, spec, (rows * width,), work)
            w = bf.dequantize_4bit(parts["weight"], state)
        return w.reshape(shape).to(dtype)

    # -- compute --------------------------------------------------------------------
    def linear(self, x, parts, spec, shape, bias):
        spec = self._spec(spec)
        bf = self._functional()
        self._check_parts(parts, spec, shape)
        if len(shape) != 2 or x.dtype not in _BNB_FLOATS or x.numel() == 0:
            return super().linear(x, parts, spec, shape, bias)
        if bias is not None:
            bias = bias.to(x.dtype)
        if spec.quant_type == "int8":
            return self._int8_linear(x, parts, bias)
        if int(shape[1]) % spec.blocksize:
            # bnb's matmul wants block-aligned rows (CUDA warns and dequantizes; the CPU kernel
            # gets the scales wrong), so dequantize here
            log.debug("%s: width %s is not a multiple of %s, dequantizing for the matmul",
                      spec.id, shape[1], spec.blocksize)
            return super().linear(x, parts, spec, shape, bias)
        import bitsandbytes as bnb

        state = self._quant_state(bf, parts, spec, _matrix_shape(shape), x.dtype)
        # Linear4bit passes the packed weight transposed; bnb >= 0.45 accepts that layout
        return bnb.matmul_4bit(x, parts["weight"].t(), quant_state=state, bias=bias)

    @staticmethod
    def _int8_linear(x, parts, bias):
        cb, row_absmax = parts["weight"], parts["row_absmax"]
        ops = torch.ops.bitsandbytes
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or (bias is not None and bias.requires_grad))
        if needs_grad or not hasattr(ops, "int8_mixed_scaled_mm"):  # the op is bnb >= 0.46
            import bitsandbytes as bnb

            state = bnb.MatmulLtState()
            state.CB, state.SCB = cb, row_absmax
            state.threshold, state.has_fp16_weights, state.is_training = OUTLIER_THRESHOLD, False, False
            return bnb.matmul(x, cb, bias=bias, state=state)
        # Inference: the same ops MatMul8bitLt runs, without its autograd wrapper (and its
        # per-call warning about casting activations to fp16).
        x2 = x.reshape(-1, x.shape[-1])
        # copy: bnb's CPU kernel zeroes the outliers in place while it works
        ca, row_stats, outlier_cols = ops.int8_vectorwise_quant(x2.to(torch.float16, copy=True),
                                                                OUTLIER_THRESHOLD)
        y, _ = ops.int8_mixed_scaled_mm(x2, ca, cb, row_stats, row_absmax, outlier_cols, bias)
        return y.reshape(*x.shape[:-1], cb.shape[0])
