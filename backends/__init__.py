"""QuantKit's quantization, pure torch (nothing here imports ComfyUI):

    engine/    formats, the registry, quantized modules, quantizing a tree, recipes, reports
    adapters/  one module per quantization library: torchao, bitsandbytes, optimum-quanto
    api/       the library API outside ComfyUI: quantize(module, ...), quantize_pipeline(pipe, ...)
    gguf/      the GGUF codec (llama.cpp blocks): its adapter, quantizer, decoder, file reader/writer
    kernels/   fast paths on NVIDIA GPUs: the kernel choice per layer, decode groups, Triton kernels
"""
