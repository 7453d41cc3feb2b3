"""Stapled collateral: the vendor-signed pieces an enclave ships inside ``Evidence.collateral``.

The enclave fetches, caches and staples them (``veil.enclave.collateral``); the client reads
them here and hands them to the verifiers, which check every piece against the vendor roots
alone, with freshness from the vendor's own signed dates and the injected clock. Nothing here
trusts a piece or reaches the network: it only parses.

* AMD: the ARK-signed CRL → ``crl`` of :func:`~veil.attestation.snp.verify.verify_snp`
  (``snp.chain.crl``: signature by the ARK, ``thisUpdate ≤ now ≤ nextUpdate``, the ASK/ASVK
  not listed).
* NVIDIA: the RIMs → a :class:`~veil.attestation.nvidia.rim.RimSet` (each RIM used is
  verified against the NVIDIA RIM root by ``gpu[i].rim.*``); the OCSP responses → an offline
  :data:`~veil.attestation.options.OcspPost` (:func:`~veil.attestation.nvidia.ocsp.stapled_ocsp`)
  for ``gpu[i].ocsp`` and the RIM chains' OCSP checks.
* Intel: the TCB info and QE identity as Intel's PCS serves them (``{"tcbInfo": …,
  "signature": …}`` / ``{"enclaveIdentity": …, "signature": …}``, the signed member sliced out
  byte for byte), their issuer chains, the PCK CRL and its issuer chain, the root CA CRL →
  a :class:`~veil.attestation.tdx.collateral.TdxCollateral` for
  :func:`~veil.attestation.tdx.verify.verify_tdx` (``tdx.collateral.*``, ``tdx.pck.crl``,
  ``tdx.tcb.status``). :func:`intel_collateral_proto` is the inverse the enclave staples with.

Pure: no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from veil.attestation.errors import MalformedInputError
from veil.attestation.nvidia.ocsp import stapled_ocsp
from veil.attestation.nvidia.rim import RimSet, parse_rim
from veil.attestation.options import OcspPost
from veil.attestation.tdx.collateral import TdxCollateral, collateral_from_pcs
from veil.proto.v1 import evidence_pb2

__all__ = ["StapledNvidia", "intel_collateral_proto", "stapled_amd_crl", "stapled_intel", "stapled_nvidia"]


def stapled_amd_crl(collateral: evidence_pb2.Collateral) -> x509.CertificateRevocationList | None:
    """The stapled AMD CRL (not yet trusted), None when none is stapled; raises
    :class:`MalformedInputError` when one is stapled but is not a DER CRL."""
    raw = bytes(collateral.amd.crl)
    if not raw:
        return None
    try:
        return x509.load_der_x509_crl(raw)
    except ValueError:
        raise MalformedInputError("the stapled AMD CRL is not a DER CRL") from None


@dataclass(frozen=True, slots=True)
class StapledNvidia:
    """The stapled NVIDIA collateral, parsed (not yet trusted)."""

    rims: RimSet
    ocsp_post: OcspPost | None  # None: no OCSP response stapled
    problems: tuple[str, ...]  # pieces that did not parse (a failed ``collateral.nvidia`` check)
    ocsp_count: int

    def describe(self) -> str:
        return f"{len(self.rims.rims)} RIM(s), {self.ocsp_count} OCSP response(s) stapled"


def stapled_nvidia(collateral: evidence_pb2.Collateral) -> StapledNvidia:
    """The stapled RIMs and an offline OCSP poster answering from the stapled responses."""
    rims = []
    problems = []
    for i, xml in enumerate(collateral.nvidia.rims):
        try:
            rims.append(parse_rim(bytes(xml)))
        except MalformedInputError as exc:
            problems.append(f"RIM {i}: {exc}")
    responses = [bytes(r) for r in collateral.nvidia.ocsp_responses]
    post = stapled_ocsp(responses) if responses else None
    return StapledNvidia(RimSet.of(rims), post, tuple(problems), len(responses))


def _signed_body(member: str, signed: bytes, signature: bytes) -> bytes:
    return (
        b'{"'
        + member.encode()
        + b'":'
        + signed
        + b',"signature":'
        + json.dumps(signature.hex()).encode()
        + b"}"
    )


def _pem(chain: tuple[x509.Certificate, ...]) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in chain)


def intel_collateral_proto(c: TdxCollateral) -> evidence_pb2.IntelCollateral:
    """``Evidence.collateral.intel`` for ``c``: the PCS bodies with the signed members verbatim."""
    return evidence_pb2.IntelCollateral(
        tcb_info=_signed_body("tcbInfo", c.tcb_info_json, c.tcb_info_signature),
        tcb_info_issuer_chain=_pem(c.tcb_info_issuer_chain),
        qe_identity=_signed_body("enclaveIdentity", c.qe_identity_json, c.qe_identity_signature),
        qe_identity_issuer_chain=_pem(c.qe_identity_issuer_chain),
        pck_crl=c.pck_crl_der or b"",
        pck_crl_issuer_chain=_pem(c.pck_crl_issuer_chain),
        root_ca_crl=c.root_ca_crl_der or b"",
    )


def stapled_intel(collateral: evidence_pb2.Collateral) -> TdxCollateral | None:
    """The stapled Intel collateral (not yet trusted), None when none is stapled; raises
    :class:`MalformedInputError` when it is stapled but incomplete or does not parse."""
    intel = collateral.intel
    if not intel.tcb_info and not intel.qe_identity:
        return None
    return collateral_from_pcs(
        tcb_info_response=bytes(intel.tcb_info),
        qe_identity_response=bytes(intel.qe_identity),
        tcb_info_issuer_chain=bytes(intel.tcb_info_issuer_chain),
        qe_identity_issuer_chain=bytes(intel.qe_identity_issuer_chain),
        pck_crl=bytes(intel.pck_crl) or None,
        pck_crl_issuer_chain=bytes(intel.pck_crl_issuer_chain) or None,
        root_ca_crl=bytes(intel.root_ca_crl) or None,
    )
