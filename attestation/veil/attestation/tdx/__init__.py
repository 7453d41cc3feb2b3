"""Intel TDX evidence: quotes v4/v5, the PCK chain, TCB appraisal from Intel collateral.

* :mod:`~veil.attestation.tdx.quote` — the quote parser (pure).
* :mod:`~veil.attestation.tdx.pck` — the SGX extension of a PCK certificate.
* :mod:`~veil.attestation.tdx.collateral` — TCB info, QE identity, CRLs (dcap-qvl JSON or PCS form).
* :mod:`~veil.attestation.tdx.tcb` — TCB level appraisal, as Intel's QVL does it.
* :mod:`~veil.attestation.tdx.verify` — *verify*: signatures, PCK chain, QE binding, collateral.
* :mod:`~veil.attestation.tdx.cross_check` — the same quote appraised again by dcap-qvl, for agreement.
* :mod:`~veil.attestation.tdx.validate` — *validate*: TD fields against a :class:`TdxPolicy`.
* :mod:`~veil.attestation.tdx.fetch` — gathering a quote's collateral through a collateral store.
"""
