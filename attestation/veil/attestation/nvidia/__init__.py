"""NVIDIA GPU and NVSwitch evidence: SPDM measurement reports, device chains, RIMs, OCSP.

* :mod:`~veil.attestation.nvidia.report` — the SPDM GET_MEASUREMENTS request/response parser (pure).
* :mod:`~veil.attestation.nvidia.certs` — pinned roots, chain checks, DICE TcbInfo FWID.
* :mod:`~veil.attestation.nvidia.rim` — reference integrity manifests (signed swidtag XML).
* :mod:`~veil.attestation.nvidia.ocsp` — OCSP revocation status of device and RIM chains.
* :mod:`~veil.attestation.nvidia.verify` — *verify*: signature, chain, FWID, RIM signatures, OCSP;
  :func:`~veil.attestation.nvidia.verify.verify_gpu` runs the *validate* checks too.
* :mod:`~veil.attestation.nvidia.validate` — *validate*: nonce, driver / VBIOS versions against a
  :class:`GpuPolicy`, measurements against the RIMs (pure).
"""
