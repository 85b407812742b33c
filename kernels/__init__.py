"""Attention and KV-cache kernels: CUDA sources launched through CuPy, with torch references."""
