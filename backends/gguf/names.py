"""Text-encoder GGUF files name their tensors either as ComfyUI does (what ComfyUI-GGUF's
converter writes) or as llama.cpp does. This maps llama.cpp's T5 encoder names to
ComfyUI's (the key layout of a T5-XXL text encoder file)."""
from __future__ import annotations

import re
from typing import Dict, Optional

from ..engine.errors import MalformedFile

T5_TOP = {"token_embd": "shared", "enc.output_norm": "encoder.final_layer_norm"}
T5_BLOCK = {
    "attn_q": "layer.0.SelfAttention.q", "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v", "attn_o": "layer.0.SelfAttention.o",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "attn_norm": "layer.0.layer_norm",
    "ffn_gate": "layer.1.DenseReluDense.wi_0", "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo", "ffn_norm": "layer.1.layer_norm",
}
_BLOCK = re.compile(r"enc\.blk\.(\d+)\.(\w+)")
# tensors that become embedding tables (looked up, not multiplied): decoded at load time
EMBEDDING_NAMES = re.compile(r"(^|\.)(shared|token_embedding|position_embedding|"
                             r"relative_attention_bias|embed_tokens)\.weight$")


def is_llama_cpp_t5(names) -> bool:
    return any(n.startswith("enc.blk.") or n == "token_embd.weight" for n in names)


def comfy_t5_name(name: str) -> Optional[str]:
    base, _, leaf = name.rpartition(".")
    if base in T5_TOP:
        return f"{T5_TOP[base]}.{leaf}"
    m = _BLOCK.fullmatch(base)
    if m and m.group(2) in T5_BLOCK:
        return f"encoder.block.{m.group(1)}.{T5_BLOCK[m.group(2)]}.{leaf}"
    return None


def rename_llama_cpp_t5(names, path: str) -> Dict[str, str]:
    """llama.cpp name -> ComfyUI name for a T5 encoder file; decoder tensors (a full T5)
    are left out; any other unknown name is an error naming it."""
    out, unknown = {}, []
    for name in names:
        if name.startswith("dec."):
            continue
        new = comfy_t5_name(name)
        if new is None:
            unknown.append(name)
        else:
            out[name] = new
    if unknown:
        raise MalformedFile(f"{path}: looks like a llama.cpp T5 file, but {len(unknown)} tensor "
                            f"names are not T5 encoder names (e.g. {', '.join(unknown[:3])}).")
    return out
