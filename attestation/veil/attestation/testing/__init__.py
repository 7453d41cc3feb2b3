"""Fake vendor authorities: AMD, Intel and NVIDIA certificate chains and evidence made in software.

Used by the simulated TEE (``veil.enclave.tee.simulated``) and by the tests, so both exercise
the same code; the real verifiers check what they make, and only the trust anchor differs.
Never trusted by a default policy.

* :mod:`~veil.attestation.testing.snp` — a fake AMD KDS chain (ARK → ASK → VCEK) and signed SNP reports.
* :mod:`~veil.attestation.testing.tdx` — a fake Intel PKI, TDX quotes and PCS collateral.
* :mod:`~veil.attestation.testing.nvidia` — a fake NVIDIA device CA and SPDM reports.
* :mod:`~veil.attestation.testing.pki` — what they share: DER scraps, extensions, keys as PEM.
"""
