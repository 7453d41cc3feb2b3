"""Attestation evidence, its verification, and the channel bound to it.

Split as go-sev-guest does: **verify** (signatures, certificate chains,
collateral) and **validate** (report fields against a policy). Every verifier
takes one :class:`~veil.attestation.options.VerifyOptions` (the clock, the trusted
roots, the OCSP poster) and reports a :class:`~veil.attestation.verdict.Verdict`
of named checks. Nothing here imports torch, ``veil.client`` or ``veil.enclave``.

::

    veil.attestation
    ├── snp/          AMD SEV-SNP, and Azure's vTPM-wrapped form
    │   ├── report        ATTESTATION_REPORT parser / serialiser (pure)
    │   ├── certs         VCEK/VLEK extensions, pinned AMD roots
    │   ├── verify        signature, VCEK/VLEK → ASK/ASVK → ARK chain, extensions
    │   ├── validate      report fields against an SnpPolicy
    │   ├── azure         Azure CVM evidence: HCL report, runtime data, vTPM quote (parsers)
    │   └── azure_verify  the SNP report, the HCL binding and the vTPM quote, verified
    ├── tdx/          Intel TDX
    │   ├── quote         quote v4/v5 parser (pure)
    │   ├── pck           the PCK certificate's SGX extension
    │   ├── collateral    TCB info, QE identity, CRLs
    │   ├── tcb           TCB level appraisal, as Intel's QVL does it
    │   ├── verify        signatures, PCK chain, QE binding, collateral
    │   ├── cross_check   the same appraisal by dcap-qvl, which must agree
    │   ├── validate      TD fields against a TdxPolicy
    │   └── fetch         a quote's collateral through a collateral store
    ├── nvidia/       NVIDIA GPUs and NVSwitches
    │   ├── report        SPDM measurement report parser / serialiser (pure)
    │   ├── certs         pinned roots, chain checks, DICE TcbInfo FWID
    │   ├── rim           reference integrity manifests: parsed, then verified
    │   ├── ocsp          online revocation of device and RIM chains
    │   ├── verify        signature, chain, FWID, RIMs (and the checks below, end to end)
    │   └── validate      nonce, versions, measurements against the RIMs
    ├── channel/      HPKE requests, secretstream responses, size padding (pure)
    ├── binding       claims, report_data, gpu_nonce, key_id: evidence ↔ channel (pure)
    ├── bundle        a whole Veil Evidence message against a client Policy
    ├── policy        the client's trust policy (platforms, TCB, measurements, roots)
    ├── options       VerifyOptions: now, trusted_roots, ocsp_post
    ├── verdict       named checks: pass, fail, skip
    ├── certificates  X.509 loading shared by every family; der: minimal DER reading
    ├── collateral    fetching and caching vendor collateral (the only I/O here)
    ├── errors        every exception, drawn as a tree
    ├── audit/        the auditor's commands: veil attest fetch|show|verify, veil measure
    └── testing/      fake AMD, Intel and NVIDIA authorities for the simulator and the tests
"""
