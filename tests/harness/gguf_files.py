"""GGUF files written with gguf-py alone (never QuantKit's writer), the way other tools
write them: for tests that QuantKit reads files it did not write.

llama.cpp's T5 encoder names are spelled out here on their own (from llama.cpp's tensor
naming), not derived from backends/gguf/names.py, so a mistake in either shows.
"""
from __future__ import annotations

import numpy as np

import gguf
from gguf.quants import quantize as np_quantize

Q8_0 = gguf.GGMLQuantizationType.Q8_0

# ComfyUI's T5 key (after "encoder.block.N.") -> llama.cpp's (after "enc.blk.N.")
LLAMA_CPP_T5_BLOCK = {
    "layer.0.SelfAttention.q": "attn_q",
    "layer.0.SelfAttention.k": "attn_k",
    "layer.0.SelfAttention.v": "attn_v",
    "layer.0.SelfAttention.o": "attn_o",
    "layer.0.SelfAttention.relative_attention_bias": "attn_rel_b",
    "layer.0.layer_norm": "attn_norm",
    "layer.1.DenseReluDense.wi_0": "ffn_gate",
    "layer.1.DenseReluDense.wi_1": "ffn_up",
    "layer.1.DenseReluDense.wo": "ffn_down",
    "layer.1.layer_norm": "ffn_norm",
}
LLAMA_CPP_T5_TOP = {"shared": "token_embd", "encoder.final_layer_norm": "enc.output_norm"}


def llama_cpp_t5_name(key: str) -> str:
    base, _, leaf = key.rpartition(".")
    if base in LLAMA_CPP_T5_TOP:
        return f"{LLAMA_CPP_T5_TOP[base]}.{leaf}"
    _, _, n, rest = base.split(".", 3)  # encoder.block.N.<rest>
    return f"enc.blk.{n}.{LLAMA_CPP_T5_BLOCK[rest]}.{leaf}"


def safetensors_items(path):
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            yield key, f.get_tensor(key)


def write_file(path, items, arch: str, quantize=lambda key, tensor: False, keep=()) -> dict:
    """Streams a .gguf (tensor infos first, then one tensor's data at a time, so a 5 GB file
    never sits in memory). `items()` gives (key, tensor) pairs afresh. Weights the predicate
    picks are stored Q8_0 by gguf-py, as 2-D rows; a convolution's shape goes to
    comfy.gguf.orig_shape.<key> (ComfyUI-GGUF's convention); the rest F16, 1-D tensors F32.
    Returns the Q8_0 bytes of the keys in `keep`."""
    def encoded():
        for key, tensor in items():
            array = tensor.float().numpy()
            rows = array.reshape(array.shape[0], -1) if tensor.dim() >= 2 else array
            if tensor.dim() >= 2 and rows.shape[1] % 32 == 0 and quantize(key, tensor):
                data = np_quantize(rows, Q8_0)
                yield key, data, Q8_0, data.shape, tuple(tensor.shape) if tensor.dim() > 2 else None
            else:
                array = array if tensor.dim() <= 1 else array.astype(np.float16)
                yield key, array, None, array.shape, None

    writer = gguf.GGUFWriter(str(path), arch)
    for key, data, raw_dtype, shape, orig in encoded():  # pass 1: what the file will hold
        if orig is not None:
            writer.add_array(f"comfy.gguf.orig_shape.{key}", list(orig))
        writer.add_tensor_info(key, shape, data.dtype, data.nbytes, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    kept = {}
    for key, data, _, _, _ in encoded():  # pass 2: the data
        writer.write_tensor_data(data)
        if key in keep:
            kept[key] = data
    writer.close()
    return kept
