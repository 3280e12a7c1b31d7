"""How quantized layers compute fast on NVIDIA GPUs: the kernel chosen per layer and device
(fast_linear), decode groups, and the Triton kernels (imported only where Triton runs)."""
