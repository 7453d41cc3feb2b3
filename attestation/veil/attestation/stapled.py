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
* Intel: carried for the TDX bundle verification of a later issue.

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from veil.attestation.errors import MalformedInputError
from veil.attestation.nvidia.ocsp import stapled_ocsp
from veil.attestation.nvidia.rim import RimSet, parse_rim
from veil.attestation.options import OcspPost
from veil.proto.v1 import evidence_pb2

__all__ = ["StapledNvidia", "stapled_amd_crl", "stapled_nvidia"]


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
