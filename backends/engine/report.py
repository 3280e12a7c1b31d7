"""What a quantization did, layer by layer, in a form any host can show.

Every layer is recorded through `QuantReport.record`, whether Quantize Model made it or a
quantized file held it. Sizes are compared with a reference: the source model where there
is one (SOURCE), else the same values at 16 bits (AT_16_BITS: a layer read from a file as
it is stored has no float source)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Tuple

import torch

from .storage_census import stored_nbytes

QUANTIZED, FALLBACK, KEPT = "quantized", "fallback", "kept"
SOURCE, AT_16_BITS = "source", "16-bit"


@dataclass(frozen=True)
class LayerRecord:
    name: str
    shape: tuple
    action: str  # QUANTIZED, FALLBACK (stored in the format's fallback) or KEPT
    format_id: Optional[str]  # the storage format; None when kept
    reason: str
    bytes_before: int  # weight and bias in the report's reference (source dtype or 16 bits)
    bytes_after: int  # weight and bias as stored


@dataclass
class QuantReport:
    target: str  # "diffusion model", "clip_l", ...
    format_id: str
    recipe: str
    device: str
    versus: str = SOURCE  # what bytes_before measures: SOURCE or AT_16_BITS
    seconds: float = 0.0
    layers: List[LayerRecord] = field(default_factory=list)
    other_bytes: int = 0  # parameters outside Linear/Conv layers (norms, embeddings), stored
    other_bytes_before: int = 0  # the same in the reference
    notes: Tuple[str, ...] = ()  # more lines a host shows under the summary (a budget fit's choice)

    def reference_bytes(self, values: int, source_bytes: Optional[int]) -> int:
        """What `values` numbers take in the reference; `source_bytes`: in the source model."""
        if self.versus == AT_16_BITS:
            return 2 * values
        if source_bytes is None:
            raise ValueError(f"{self.target}: a report against the source needs the source's bytes")
        return source_bytes

    def record(self, name: str, shape, action: str, format_id: Optional[str], reason: str, *,
               values: int, stored_bytes: int, source_bytes: Optional[int] = None) -> None:
        """One Linear/Conv layer. values: its weights and biases, counted; source_bytes: what
        they took in the source (None where there is no source)."""
        self.layers.append(LayerRecord(name, tuple(shape), action, format_id, reason,
                                       self.reference_bytes(values, source_bytes), stored_bytes))

    def record_other(self, tensors: Iterable[torch.Tensor]) -> None:
        """Parameters outside the recorded layers, kept as they are."""
        for t in tensors:
            stored = stored_nbytes(t)  # a core QuantizedTensor: its data and scales
            self.other_bytes += stored
            self.other_bytes_before += self.reference_bytes(t.nelement(), stored)

    def count(self, action: str) -> int:
        return sum(1 for layer in self.layers if layer.action == action)

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers) + self.other_bytes_before

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers) + self.other_bytes

    def bytes_by_format(self) -> dict:
        out = Counter()
        for layer in self.layers:
            out[layer.format_id or "unquantized"] += layer.bytes_after
        out["unquantized"] += self.other_bytes
        return dict(out)

    def kept_reasons(self) -> dict:
        return dict(Counter(layer.reason for layer in self.layers if layer.action != QUANTIZED))

    def counts_text(self) -> str:
        return (f"{self.count(QUANTIZED)} layers quantized, {self.count(FALLBACK)} fallback, "
                f"{self.count(KEPT)} kept")

    def sizes_text(self, size: Callable[[int], str]) -> str:
        """"before -> after", saying when before is the 16-bit size rather than the source's."""
        before = size(self.bytes_before) + (" at 16 bits" if self.versus == AT_16_BITS else "")
        return f"{before} -> {size(self.bytes_after)}"

    def summary(self) -> str:
        return (f"{self.target}: {self.format_id} ({self.recipe} recipe) - {self.counts_text()}; "
                f"{self.sizes_text(_mib)} in {self.seconds:.1f} s on {self.device}")


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"
