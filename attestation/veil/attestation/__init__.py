"""Attestation evidence, its verification, and the channel bound to it.

Split as go-sev-guest does: **verify** (signatures, certificate chains,
collateral) and **validate** (report fields against a policy). Every verifier
reports a :class:`~veil.attestation.verdict.Verdict` of named checks; time,
roots and network are parameters.

Channel and binding (pure):
    ``binding`` (claims, ``report_data``, ``gpu_nonce``, ``key_id``), ``channel``
    (HPKE requests), ``stream`` (secretstream responses), ``padding`` (size buckets).
AMD SEV-SNP:
    ``snp`` (report parser/serialiser), ``snp_verify`` (signature, VCEK/VLEK chain,
    extensions), ``snp_policy`` (validation), ``amd_certs`` (KDS extensions, pinned ARKs),
    ``azure`` (Azure CVM: HCL report, vTPM quote).
Intel TDX:
    ``tdx`` (quote parser), ``tdx_verify`` (signatures, PCK chain, collateral),
    ``tdx_pck``, ``tdx_tcb``, ``tdx_collateral``, ``tdx_fetch``, ``tdx_policy``.
NVIDIA GPU:
    ``nvidia`` (SPDM parser/serialiser), ``nvidia_verify``, ``nvidia_certs``,
    ``nvidia_rim`` (reference integrity manifests), ``nvidia_ocsp`` (online option).
Veil bundles:
    ``evidence`` (a whole ``Evidence`` message: platform, GPUs, binding, policy),
    ``policy`` (the client's trust policy).
Shared:
    ``certificates`` (X.509 loading), ``collateral`` (fetching and caching vendor
    collateral; the only module here that does I/O), ``verdict``, ``errors``.

Nothing here imports torch or ``veil.enclave``.
"""
