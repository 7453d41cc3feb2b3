"""The enclave's stapled collateral: fetched once, cached in the state dir, refreshed before it expires.

The client never contacts a vendor service (DESIGN.md, "Stapled collateral"): the enclave
staples into every ``Evidence`` the vendor-signed collateral its evidence needs — the AMD CRL,
the NVIDIA RIMs of its GPUs' driver and VBIOS, the OCSP responses for its GPUs' device chains
and the RIM signing chains (for TDX: Intel TCB info / QE identity / PCK and root CA
CRLs from Intel PCS). A :class:`CollateralSource` fetches them:

* :class:`VendorCollateralSource` — the vendors' services, through
  :class:`veil.attestation.collateral.CollateralStore` (AMD KDS, NVIDIA RIM service and OCSP
  responder), for what a :class:`CollateralNeeds` names (derived from the evidence itself);
* the simulated TEE's source, which issues it with the fake authorities
  (:mod:`veil.enclave.tee.simulated_collateral`).

:class:`CollateralCache` holds the current set, writes it to ``STATE_DIR/collateral/stapled.pb``
(so a restart staples at once), and fetches afresh once three quarters of the shortest-lived
piece's lifetime has passed (CRL ``thisUpdate..nextUpdate``, OCSP ``thisUpdate..nextUpdate``,
RIM signing certificate validity), all read from the vendor's signed dates. A failed refresh
keeps serving the old set while it is still current, and raises
:class:`~veil.enclave.errors.CollateralUnavailableError` once it is not: the client would refuse it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from google.protobuf.message import DecodeError

from veil.attestation.collateral import CollateralStore
from veil.attestation.errors import VeilAttestationError
from veil.attestation.nvidia.certs import load_cert_chain
from veil.attestation.nvidia.report import parse_gpu_report
from veil.attestation.nvidia.rim import parse_rim
from veil.attestation.nvidia.verify import GpuKind, gpu_rim_ids
from veil.attestation.stapled import intel_collateral_proto, stapled_intel
from veil.attestation.tdx.fetch import fetch_tdx_collateral
from veil.attestation.tdx.quote import parse_tdx_quote
from veil.enclave.errors import CollateralUnavailableError
from veil.proto.v1 import evidence_pb2

__all__ = [
    "CollateralCache",
    "CollateralNeeds",
    "CollateralSource",
    "VendorCollateralSource",
    "refresh_time",
]

log = logging.getLogger("veil.enclave.collateral")
CACHE_FILE = "stapled.pb"
Clock = Callable[[], dt.datetime]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CollateralSource(Protocol):
    """Fetches a complete, fresh set of collateral (raises on failure)."""

    def fetch(self) -> evidence_pb2.Collateral: ...


def _windows(c: evidence_pb2.Collateral) -> list[tuple[dt.datetime, dt.datetime]]:
    """(start, end) of every dated piece, from the vendors' signed dates."""
    out: list[tuple[dt.datetime, dt.datetime]] = []
    if c.amd.crl:
        crl = x509.load_der_x509_crl(bytes(c.amd.crl))
        if crl.next_update_utc is not None:
            out.append((crl.last_update_utc, crl.next_update_utc))
    for raw in c.nvidia.ocsp_responses:
        resp = ocsp.load_der_ocsp_response(bytes(raw))
        for single in resp.responses:
            if single.next_update_utc is not None:
                out.append((single.this_update_utc, single.next_update_utc))
    intel = stapled_intel(c)
    if intel is not None:
        for doc in (intel.tcb_info, intel.qe_identity):
            out.append((doc.issue_date, doc.next_update))
    for xml in c.nvidia.rims:
        rim = parse_rim(bytes(xml))
        if rim.certificates:
            signer = rim.certificates[0]
            out.append((signer.not_valid_before_utc, signer.not_valid_after_utc))
    return out


def refresh_time(c: evidence_pb2.Collateral) -> tuple[dt.datetime, dt.datetime] | None:
    """(when to refresh, when the first piece expires); None when nothing in ``c`` is dated."""
    windows = _windows(c)
    if not windows:
        return None
    refresh = min(start + (end - start) * 3 / 4 for start, end in windows)
    return refresh, min(end for _, end in windows)


@dataclass
class CollateralCache:
    """The current stapled collateral (see the module docstring); thread-safe."""

    source: CollateralSource
    cache_dir: Path | None = None
    clock: Clock = _utcnow
    _value: evidence_pb2.Collateral | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def current(self) -> evidence_pb2.Collateral:
        """The collateral to staple now, fetched or refreshed first when due."""
        with self._lock:
            now = self.clock()
            if self._value is None:
                self._value = self._load()
            due = self._times(self._value)
            if self._value is not None and due is not None and now < due[0]:
                return self._value
            try:
                fresh = self.source.fetch()
                self._times(fresh)  # refuse what does not parse before caching it
            except Exception as exc:  # a vendor service down, or a bug: keep what is still current
                if self._value is not None and due is not None and now < due[1]:
                    log.warning(
                        "collateral refresh failed (%s); the cached set is current until %s",
                        type(exc).__name__,
                        due[1],
                    )
                    return self._value
                raise CollateralUnavailableError(f"no current collateral: {type(exc).__name__}") from exc
            self._value = fresh
            self._store(fresh)
            return fresh

    @staticmethod
    def _times(c: evidence_pb2.Collateral | None) -> tuple[dt.datetime, dt.datetime] | None:
        if c is None:
            return None
        try:
            return refresh_time(c)
        except (ValueError, VeilAttestationError) as exc:
            raise CollateralUnavailableError(f"collateral does not parse: {exc}") from None

    def _path(self) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / CACHE_FILE

    def _load(self) -> evidence_pb2.Collateral | None:
        path = self._path()
        if path is None or not path.is_file():
            return None
        msg = evidence_pb2.Collateral()
        try:
            msg.ParseFromString(path.read_bytes())
            refresh_time(msg)
        except (OSError, DecodeError, ValueError, VeilAttestationError):
            return None  # a damaged cache is fetched afresh
        return msg

    def _store(self, c: evidence_pb2.Collateral) -> None:
        path = self._path()
        if path is None:
            return
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(c.SerializeToString())
        os.replace(tmp, path)


# --- the vendors' services -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CollateralNeeds:
    """What an enclave's evidence needs stapled: the AMD product (``Milan`` …) and signer
    (``vcek`` / ``vlek``), a TDX quote (its FMSPC and PCK CA name the Intel collateral), and each
    GPU's (kind, SPDM report, PEM device chain)."""

    amd_product: str | None = None
    amd_signer: str = "vcek"
    gpus: Sequence[tuple[GpuKind, bytes, bytes]] = ()
    tdx_quote: bytes | None = None


@dataclass
class VendorCollateralSource:
    """Fetches :class:`CollateralNeeds` from AMD KDS and NVIDIA through a :class:`CollateralStore`.

    OCSP requests name each device-chain certificate below the root (the leaf excepted, as
    NVIDIA's verifier does: it is made by the firmware and never registered) and each RIM
    signing-chain certificate below its root; the responses are stapled as they came.
    """

    store: CollateralStore
    needs: CollateralNeeds

    def fetch(self) -> evidence_pb2.Collateral:
        out = evidence_pb2.Collateral()
        if self.needs.amd_product is not None:
            out.amd.crl = self.store.amd_crl(self.needs.amd_product, self.needs.amd_signer).content
        if self.needs.tdx_quote is not None:
            tdx = fetch_tdx_collateral(self.store, parse_tdx_quote(self.needs.tdx_quote))
            out.intel.CopyFrom(intel_collateral_proto(tdx))
        rims: dict[str, bytes] = {}
        responses: list[bytes] = []
        for kind, report, chain_pem in self.needs.gpus:
            for rim_id in gpu_rim_ids(parse_gpu_report(report), kind).values():
                if rim_id not in rims:
                    rims[rim_id] = self.store.nvidia_rim(rim_id).content
            responses += self._ocsp(load_cert_chain(chain_pem), skip_leaf=True)
        seen: set[bytes] = set()
        for xml in rims.values():
            chain = parse_rim(xml).certificates
            key = b"".join(c.fingerprint(hashes.SHA256()) for c in chain)
            if key not in seen:
                seen.add(key)
                responses += self._ocsp(chain, skip_leaf=False)
        out.nvidia.rims.extend(rims.values())
        out.nvidia.ocsp_responses.extend(dict.fromkeys(responses))
        return out

    def _ocsp(self, chain: Sequence[x509.Certificate], *, skip_leaf: bool) -> list[bytes]:
        out = []
        for i in range(1 if skip_leaf else 0, len(chain) - 1):
            request = (
                ocsp.OCSPRequestBuilder().add_certificate(chain[i], chain[i + 1], hashes.SHA384()).build()
            )
            out.append(self.store.nvidia_ocsp(request.public_bytes(Encoding.DER)))
        return out
