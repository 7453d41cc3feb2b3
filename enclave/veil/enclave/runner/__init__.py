"""Model runners: the one owner of device state (weights, KV cache, CUDA graphs).

* :mod:`~veil.enclave.runner.protocol` — ``Runner``, the one interface the engines use, and
  ``SeqStep``, the unit of work it executes (pure: no torch at run time).
* :mod:`~veil.enclave.runner.cpu` — ``CpuRunner`` (Veil's AVX-512 kernels, PyTorch ops as fallback).
* :mod:`~veil.enclave.runner.cuda` — ``CudaRunner`` on Triton kernels, decode steps from CUDA graphs;
  :mod:`~veil.enclave.runner.gpu_weights` repacks the loader's weights for its kernels.
"""
