"""Compute kernels: CPU paths over PyTorch ops, Triton GPU kernels, a reference for each."""
