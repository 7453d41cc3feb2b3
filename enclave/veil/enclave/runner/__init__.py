"""Model runners: the one owner of device state (weights, KV cache, CUDA graphs).

* :mod:`~veil.enclave.runner.cpu` — the CPU runner (Veil's AVX-512 kernels, PyTorch ops as fallback).
* :mod:`~veil.enclave.runner.cuda` — the GPU runner on Triton kernels, decode steps from CUDA graphs.
"""
