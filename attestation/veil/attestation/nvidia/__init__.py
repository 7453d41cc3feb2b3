"""NVIDIA GPU and NVSwitch evidence: SPDM measurement reports, device chains, RIMs, OCSP.

* :mod:`~veil.attestation.nvidia.report` — the SPDM GET_MEASUREMENTS request/response parser (pure).
* :mod:`~veil.attestation.nvidia.certs` — pinned roots, chain checks, DICE TcbInfo FWID.
* :mod:`~veil.attestation.nvidia.rim` — reference integrity manifests (signed swidtag XML).
* :mod:`~veil.attestation.nvidia.ocsp` — OCSP revocation status of device chains.
* :mod:`~veil.attestation.nvidia.verify` — *verify*: signature, chain, FWID, nonce, RIM comparison.
"""
