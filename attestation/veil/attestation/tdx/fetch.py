"""Gather a TDX quote's collateral from Intel PCS through a :class:`CollateralStore`.

The quote names what it needs: the FMSPC (from its PCK leaf's SGX extension) picks
the TCB info, and the PCK leaf's issuer (Platform or Processor CA) picks the PCK
CRL. The store does the HTTP, the on-disk cache and the offline mode; this module
only asks for the right items and assembles them into a :class:`TdxCollateral`.
"""

from __future__ import annotations

from cryptography import x509

from veil.attestation.collateral import CollateralStore
from veil.attestation.errors import CollateralError, MalformedInputError
from veil.attestation.tdx.collateral import TdxCollateral, collateral_from_pcs
from veil.attestation.tdx.pck import parse_pck_extensions
from veil.attestation.tdx.quote import TdxQuote

__all__ = ["fetch_tdx_collateral", "pck_ca_of"]

_CAS = {"Intel SGX PCK Platform CA": "platform", "Intel SGX PCK Processor CA": "processor"}


def pck_ca_of(quote: TdxQuote) -> str:
    """``"platform"`` or ``"processor"``: which PCK CA issued the quote's PCK leaf."""
    names = quote.pck_chain.leaf.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    issuer = str(names[0].value) if names else ""
    if issuer not in _CAS:
        raise MalformedInputError(f"PCK leaf issuer {issuer!r} is not an Intel SGX PCK CA")
    return _CAS[issuer]


def fetch_tdx_collateral(store: CollateralStore, quote: TdxQuote) -> TdxCollateral:
    """TCB info (for the quote's FMSPC), TD QE identity, PCK CRL and root CA CRL.

    Raises :class:`CollateralError` when an item cannot be had (offline and not
    cached, HTTP failure) and :class:`MalformedInputError` when what came back
    does not parse.
    """
    fmspc = parse_pck_extensions(quote.pck_chain.leaf).fmspc
    tcb = store.tdx_tcb_info(fmspc)
    qe = store.tdx_qe_identity()
    pck_crl = store.intel_pck_crl(pck_ca_of(quote))
    root_crl = store.intel_root_ca_crl()
    if not tcb.issuer_chain or not qe.issuer_chain or not pck_crl.issuer_chain:
        raise CollateralError("Intel PCS collateral came without its issuer chain")
    return collateral_from_pcs(
        tcb_info_response=tcb.content,
        qe_identity_response=qe.content,
        tcb_info_issuer_chain=tcb.issuer_chain,
        qe_identity_issuer_chain=qe.issuer_chain,
        pck_crl=pck_crl.content,
        pck_crl_issuer_chain=pck_crl.issuer_chain,
        root_ca_crl=root_crl.content,
    )
