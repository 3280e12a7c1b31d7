"""The report of a model read from .gguf files: what its layers hold as loaded, compared
with the same layers at 16 bits (a file has no float source to compare with)."""
from __future__ import annotations

from ..backends.engine.errors import MalformedFile
from ..backends.engine.modules import QuantizedLayer
from ..backends.engine.report import AT_16_BITS, KEPT, QUANTIZED, QuantReport


def file_report(root, find, path: str, target: str) -> QuantReport:
    """root: after its quantized weights were swapped in. find(module): the file's tensor a
    float layer's weight came from (None: from a .safetensors file beside the .gguf)."""
    report = QuantReport(target=target, format_id="gguf", recipe="file", device="cpu",
                         versus=AT_16_BITS)
    types, recorded = set(), set()
    for name, m in root.named_modules():
        if isinstance(m, QuantizedLayer):
            qtype = m.spec.name
            bias = 0 if m.bias is None else m.bias.nelement()
            report.record(name, m.weight_shape, QUANTIZED, m.spec.id, "",
                          values=m.weight_shape.numel() + bias, stored_bytes=m.stored_bytes())
        elif hasattr(m, "has_bias"):  # a float layer of gguf_loading_ops
            if m.weight is None:
                raise MalformedFile(f"{path}: layer {name} got no weight from the file.")
            tensor = find(m)
            qtype = tensor.qtype if tensor is not None else str(m.weight.dtype).removeprefix("torch.")
            params = list(m.parameters(recurse=False))
            report.record(name, m.weight.shape, KEPT, None, f"stored as {qtype} in the file",
                          values=sum(p.nelement() for p in params),
                          stored_bytes=sum(p.nelement() * p.element_size() for p in params))
        else:
            continue
        types.add(qtype)
        recorded.add(name)
    report.format_id = "types " + ", ".join(sorted(types))
    report.record_other(p for n, p in root.named_parameters() if n.rpartition(".")[0] not in recorded)
    return report
