"""What a quantization did, layer by layer, in a form any host can show."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import List, Optional

QUANTIZED, FALLBACK, KEPT = "quantized", "fallback", "kept"


@dataclass
class LayerRecord:
    name: str
    shape: tuple
    action: str  # QUANTIZED, FALLBACK (stored in the format's fallback) or KEPT
    format_id: Optional[str]  # the storage format; None when kept
    reason: str
    bytes_before: int
    bytes_after: int


@dataclass
class QuantReport:
    target: str  # "diffusion model", "clip_l", ...
    format_id: str
    recipe: str
    device: str
    seconds: float = 0.0
    layers: List[LayerRecord] = field(default_factory=list)
    other_bytes: int = 0  # parameters outside Linear/Conv layers (norms, embeddings)

    def count(self, action: str) -> int:
        return sum(1 for layer in self.layers if layer.action == action)

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers) + self.other_bytes

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

    def summary(self) -> str:
        mib = 1024 * 1024
        line = (f"{self.target}: {self.format_id} ({self.recipe} recipe) - "
                f"{self.count(QUANTIZED)} layers quantized, {self.count(FALLBACK)} fallback, "
                f"{self.count(KEPT)} kept; {self.bytes_before / mib:.1f} MiB -> "
                f"{self.bytes_after / mib:.1f} MiB in {self.seconds:.1f} s on {self.device}")
        return line

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(bytes_before=self.bytes_before, bytes_after=self.bytes_after,
                 bytes_by_format=self.bytes_by_format(), kept_reasons=self.kept_reasons())
        return d
