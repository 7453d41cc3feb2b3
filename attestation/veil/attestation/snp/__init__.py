"""AMD SEV-SNP evidence, including Azure's vTPM-wrapped form.

* :mod:`~veil.attestation.snp.report` — the ``ATTESTATION_REPORT`` parser and serialiser (pure).
* :mod:`~veil.attestation.snp.certs` — VCEK/VLEK extensions and the pinned AMD roots.
* :mod:`~veil.attestation.snp.verify` — *verify*: signature, VCEK/VLEK → ASK/ASVK → ARK chain, extensions.
* :mod:`~veil.attestation.snp.validate` — *validate*: report fields against an :class:`SnpPolicy`.
* :mod:`~veil.attestation.snp.azure` — Azure CVMs: parsing the HCL report, its runtime data and
  the vTPM quote around the SNP report (pure).
* :mod:`~veil.attestation.snp.azure_verify` — *verify* for Azure CVMs: the SNP report, the HCL
  binding and the vTPM quote.
"""
