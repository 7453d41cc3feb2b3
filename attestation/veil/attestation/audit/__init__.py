"""The auditor's commands: ``veil attest fetch|show|verify`` and ``veil measure``.

* :mod:`~veil.attestation.audit.cli` — ``veil attest``: arguments, input loading, output.
* :mod:`~veil.attestation.audit.fetch` — ``GetEvidence`` from a live server (grpc + ``veil.proto`` only).
* :mod:`~veil.attestation.audit.show` — every field of an artifact, decoded and named.
* :mod:`~veil.attestation.audit.verify` — one artifact + collateral + policy in, one verdict out.
* :mod:`~veil.attestation.audit.measure` — ``veil measure snp`` (needs the ``measure`` extra).
"""
