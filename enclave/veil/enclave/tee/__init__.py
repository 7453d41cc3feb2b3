"""Where the enclave's evidence comes from: the provider protocol and its implementations.

* :mod:`~veil.enclave.tee.provider` — the two-phase provider interface (GPU reports, then the CPU report).
* :mod:`~veil.enclave.tee.simulated` — a software TEE for development and CI (loud; untrusted by default).
"""
