"""Collateral: vendor certificates, TCB info, CRLs and RIMs, fetched and cached.

The one I/O shell of ``veil.attestation``; verification itself never fetches.

* AMD KDS: VCEK for (product, hwID, reported TCB), VCEK/VLEK certificate chains
  (ASK/ASVK + ARK), CRLs. KDS rate-limits clients, so requests to it are spaced by
  ``kds_min_interval_s`` and a 429/503 answer is retried after its ``Retry-After``
  (bounded), never hammered.
* Intel PCS (v4): TDX TCB info for an FMSPC, the TDX QE identity, PCK CRLs, each
  with its issuer chain from the response header; the SGX root CA CRL.
* NVIDIA: RIMs by id (the service returns JSON with the RIM base64-encoded); OCSP is
  an online check and is never served from the cache.

Everything is cached on disk under ``cache_dir``, keyed by what identifies the item
(product + hwID + TCB for a VCEK, FMSPC for TCB info, RIM id, …); items with a
``nextUpdate`` are refreshed only by the caller's policy, the cache never decides
validity — the verifier does, against its injected ``now``. ``offline=True`` uses
only the cache and files given, and raises :class:`CollateralError` for anything
else. Base URLs, the HTTP client and the sleep function are injected, so tests run
against a real HTTP server on loopback and never touch the internet.

``httpx`` comes with the ``audit`` extra and is imported on the first fetch, so this
module imports without it; fetching without it raises :class:`CollateralError` naming
``pip install 'veil[audit]'``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

from veil.attestation.errors import CollateralError, MalformedInputError

if TYPE_CHECKING:
    import httpx

__all__ = ["CollateralStore", "Endpoints", "Fetched"]

_PRODUCTS = ("Milan", "Genoa", "Turin")
_SAFE = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Base URLs of the vendor services (point them at a loopback server in tests)."""

    amd_kds: str = "https://kdsintf.amd.com"
    intel_pcs: str = "https://api.trustedservices.intel.com"
    intel_certs: str = "https://certificates.trustedservices.intel.com"
    nvidia_rim: str = "https://rim.attestation.nvidia.com"
    nvidia_ocsp: str = "https://ocsp.ndis.nvidia.com"


@dataclass(frozen=True, slots=True)
class Fetched:
    """A collateral item: its bytes and, where the service sends one, its issuer chain (PEM)."""

    content: bytes
    issuer_chain: bytes = b""
    from_cache: bool = False


@dataclass
class CollateralStore:
    """Fetches collateral over HTTP (or not, when ``offline``) with an on-disk cache."""

    cache_dir: Path | None = None
    offline: bool = False
    endpoints: Endpoints = field(default_factory=Endpoints)
    client: httpx.Client | None = None
    timeout_s: float = 20.0
    kds_min_interval_s: float = 2.0
    max_retries: int = 3
    max_retry_after_s: float = 30.0
    sleep: Callable[[float], None] = time.sleep
    monotonic: Callable[[], float] = time.monotonic
    _last_kds: float | None = field(default=None, init=False, repr=False)

    # -- AMD KDS ---------------------------------------------------------------------------

    def amd_vcek(self, product: str, hwid: bytes, tcb: dict[str, int]) -> Fetched:
        """The VCEK (DER) for a chip at a reported TCB: keys ``bl tee snp ucode`` (+ ``fmc`` on Turin)."""
        _check_product(product)
        if len(hwid) not in (8, 64):
            raise MalformedInputError(f"hwID must be 64 bytes (8 on Turin), got {len(hwid)}")
        names = {"bl": "blSPL", "tee": "teeSPL", "snp": "snpSPL", "ucode": "ucodeSPL", "fmc": "fmcSPL"}
        unknown = set(tcb) - set(names)
        if unknown or not {"bl", "tee", "snp", "ucode"} <= set(tcb):
            raise MalformedInputError(f"TCB needs bl, tee, snp, ucode (+fmc); got {sorted(tcb)}")
        query = "&".join(f"{names[k]}={int(v)}" for k, v in sorted(tcb.items(), key=lambda kv: kv[0]))
        key = f"amd/vcek/{product}/{hwid.hex()}/" + "_".join(f"{k}{tcb[k]}" for k in sorted(tcb)) + ".der"
        url = f"{self.endpoints.amd_kds}/vcek/v1/{product}/{hwid.hex()}?{query}"
        return self._get(key, url, kds=True)

    def amd_cert_chain(self, product: str, signer: str = "vcek") -> Fetched:
        """ASK+ARK (``signer="vcek"``) or ASVK+ARK (``"vlek"``) as PEM."""
        _check_product(product)
        if signer not in ("vcek", "vlek"):
            raise MalformedInputError(f"signer must be 'vcek' or 'vlek', got {signer!r}")
        return self._get(
            f"amd/{signer}/{product}/cert_chain.pem",
            f"{self.endpoints.amd_kds}/{signer}/v1/{product}/cert_chain",
            kds=True,
        )

    def amd_crl(self, product: str, signer: str = "vcek") -> Fetched:
        """The CRL of the product's ARK (DER)."""
        _check_product(product)
        return self._get(
            f"amd/{signer}/{product}/crl.der", f"{self.endpoints.amd_kds}/{signer}/v1/{product}/crl", kds=True
        )

    # -- Intel PCS ---------------------------------------------------------------------------

    def tdx_tcb_info(self, fmspc: bytes) -> Fetched:
        """TDX TCB info JSON for an FMSPC, with the ``TCB-Info-Issuer-Chain`` header."""
        if len(fmspc) != 6:
            raise MalformedInputError(f"FMSPC must be 6 bytes, got {len(fmspc)}")
        return self._get(
            f"intel/tdx/tcb/{fmspc.hex()}.json",
            f"{self.endpoints.intel_pcs}/tdx/certification/v4/tcb?fmspc={fmspc.hex()}",
            chain_header="TCB-Info-Issuer-Chain",
        )

    def tdx_qe_identity(self) -> Fetched:
        """The TDX QE identity JSON, with the ``SGX-Enclave-Identity-Issuer-Chain`` header."""
        return self._get(
            "intel/tdx/qe_identity.json",
            f"{self.endpoints.intel_pcs}/tdx/certification/v4/qe/identity",
            chain_header="SGX-Enclave-Identity-Issuer-Chain",
        )

    def intel_pck_crl(self, ca: str = "platform") -> Fetched:
        """The PCK CRL (DER) of the ``platform`` or ``processor`` CA, with its issuer chain."""
        if ca not in ("platform", "processor"):
            raise MalformedInputError(f"PCK CA must be 'platform' or 'processor', got {ca!r}")
        return self._get(
            f"intel/pckcrl/{ca}.der",
            f"{self.endpoints.intel_pcs}/sgx/certification/v4/pckcrl?ca={ca}&encoding=der",
            chain_header="SGX-PCK-CRL-Issuer-Chain",
        )

    def intel_root_ca_crl(self) -> Fetched:
        """The Intel SGX Root CA's CRL (DER)."""
        return self._get("intel/root_ca_crl.der", f"{self.endpoints.intel_certs}/IntelSGXRootCA.der")

    # -- NVIDIA ------------------------------------------------------------------------------

    def nvidia_rim(self, rim_id: str) -> Fetched:
        """A driver or VBIOS RIM (swidtag XML) by its id, e.g. ``NV_GPU_DRIVER_GH100_535.86.10``."""
        if not _SAFE.match(rim_id):
            raise MalformedInputError("RIM id has characters outside [A-Za-z0-9._-]")
        fetched = self._get(f"nvidia/rim/{rim_id}.json", f"{self.endpoints.nvidia_rim}/v1/rim/{rim_id}")
        try:
            doc = json.loads(fetched.content)
            xml = base64.b64decode(doc["rim"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise CollateralError(f"RIM service answer for {rim_id} is not the expected JSON") from None
        return Fetched(xml, from_cache=fetched.from_cache)

    def nvidia_ocsp(self, request_der: bytes) -> bytes:
        """POST an OCSP request (DER) to NVIDIA's responder; never cached, refused offline."""
        if self.offline:
            raise CollateralError("OCSP is an online check; refused in offline mode")
        response = self._request(
            "POST",
            self.endpoints.nvidia_ocsp,
            content=request_der,
            headers={"Content-Type": "application/ocsp-request"},
        )
        return response.content

    # -- plumbing ----------------------------------------------------------------------------

    def put(self, key: str, content: bytes, issuer_chain: bytes = b"") -> None:
        """Seed the cache with a file the user gave (offline mode reads only these)."""
        if self.cache_dir is None:
            raise CollateralError("no cache directory configured")
        _atomic_write(self._path(key), content)
        if issuer_chain:
            _atomic_write(self._path(key + ".chain.pem"), issuer_chain)

    def _path(self, key: str) -> Path:
        assert self.cache_dir is not None
        parts = key.split("/")
        if not all(_SAFE.match(p) for p in parts):
            raise MalformedInputError(f"unsafe cache key {key!r}")
        return self.cache_dir.joinpath(*parts)

    def _get(self, key: str, url: str, *, kds: bool = False, chain_header: str | None = None) -> Fetched:
        if self.cache_dir is not None:
            path = self._path(key)
            if path.is_file():
                chain_path = self._path(key + ".chain.pem")
                chain = chain_path.read_bytes() if chain_path.is_file() else b""
                return Fetched(path.read_bytes(), chain, from_cache=True)
        if self.offline:
            raise CollateralError(f"offline: {key} is not in the cache and was not given")
        response = self._request("GET", url, kds=kds)
        chain = b""
        if chain_header is not None:
            raw = response.headers.get(chain_header)
            if raw is None:
                raise CollateralError(f"{url}: response lacks the {chain_header} header")
            chain = unquote(raw).encode()
        if self.cache_dir is not None:
            self.put(key, response.content, chain)
        return Fetched(response.content, chain)

    def _request(
        self,
        method: str,
        url: str,
        *,
        kds: bool = False,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        try:
            import httpx
        except ImportError:
            raise CollateralError(
                f"cannot fetch {_redact(url)}: fetching collateral needs httpx: pip install 'veil[audit]'"
            ) from None
        client = self.client or httpx.Client(timeout=self.timeout_s, follow_redirects=False)
        try:
            for attempt in range(self.max_retries + 1):
                if kds:
                    self._space_kds()
                try:
                    response = client.request(method, url, content=content, headers=headers)
                except httpx.HTTPError as exc:
                    raise CollateralError(f"{method} {_redact(url)} failed: {type(exc).__name__}") from None
                if response.status_code in (429, 503) and attempt < self.max_retries:
                    self.sleep(self._retry_after(response))
                    continue
                if response.status_code != 200:
                    raise CollateralError(f"{method} {_redact(url)} answered HTTP {response.status_code}")
                return response
        finally:
            if self.client is None:
                client.close()
        raise CollateralError(f"{method} {_redact(url)}: still rate-limited after {self.max_retries} retries")

    def _space_kds(self) -> None:
        now = self.monotonic()
        if self._last_kds is not None:
            wait = self._last_kds + self.kds_min_interval_s - now
            if wait > 0:
                self.sleep(wait)
                now += wait
        self._last_kds = now

    def _retry_after(self, response: httpx.Response) -> float:
        try:
            delay = float(response.headers.get("Retry-After", "5"))
        except ValueError:
            delay = 5.0
        return min(max(delay, 0.0), self.max_retry_after_s)


def _check_product(product: str) -> None:
    if product not in _PRODUCTS:
        raise MalformedInputError(f"unknown AMD product {product!r} (expected one of {_PRODUCTS})")


def _redact(url: str) -> str:
    return url.split("?", 1)[0]


def _atomic_write(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def quote_chain(pem: bytes) -> str:
    """URL-encode a PEM chain the way Intel PCS sends it in a header (used by test servers)."""
    return quote(pem.decode())
