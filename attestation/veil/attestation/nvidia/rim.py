"""NVIDIA Reference Integrity Manifests (RIMs): signed TCG swidtag XML with golden measurements.

NVIDIA publishes one RIM per driver version (``NV_GPU_DRIVER_GH100_<version>``) and one per
VBIOS build (``NV_GPU_VBIOS_<project>_<project sku>_<chip sku>_<version without dots>``).
Each is a ``SoftwareIdentity`` document whose ``Payload`` lists ``Resource type="Measurement"``
elements — ``index`` (0-based: SPDM block ``index + 1``), ``active``, ``alternatives`` and
``Hash0``…``HashN-1`` (SHA-384) — enveloped-signed with XMLDSig (ECDSA-SHA384, C14N 1.1) by a
certificate whose chain, carried in ``KeyInfo``, ends at the NVIDIA CoRIM signing Root CA.

:func:`parse_rim` reads the structure (no trust); :func:`verify_rim` checks the signature
(``signxml``), the chain to the pinned RIM root and its validity at ``now``, and that the
measurements parsed are exactly those inside the signed content (``signxml``/``lxml`` are
imported only when a RIM is parsed or verified, so GPU verification without RIMs needs
neither). Comparing a report's measurements with a RIM's golden values is
:func:`veil.attestation.nvidia.validate.compare_measurements`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

from cryptography import x509

from veil.attestation.errors import MalformedInputError
from veil.attestation.nvidia.certs import (
    cert_name,
    chain_problem,
    nvidia_rim_root,
    validity_problem,
)
from veil.attestation.nvidia.ocsp import check_ocsp
from veil.attestation.options import VerifyOptions
from veil.attestation.verdict import Verdict, VerdictBuilder

__all__ = [
    "Rim",
    "RimKind",
    "RimMeasurement",
    "RimSet",
    "driver_rim_id",
    "parse_rim",
    "switch_bios_rim_id",
    "vbios_rim_id",
    "verify_rim",
]

RimKind = Literal["driver", "vbios"]
_SWID = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd"
_DS = "http://www.w3.org/2000/09/xmldsig#"
_SHA384_NS = "http://www.w3.org/2001/04/xmlenc#sha384"
_VBIOS_VERSION = re.compile(r"^[0-9A-Fa-f]{2}(\.[0-9A-Fa-f]{2}){4}$")
_MAX_RIM_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RimMeasurement:
    index: int  # 0-based; the report's SPDM block index is index + 1
    name: str
    active: bool
    size: int
    alternatives: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Rim:
    """A parsed (not yet trusted) RIM."""

    kind: RimKind
    tag_id: str
    product: str
    version: str  # Meta colloquialVersion: "590.12" or "96.00.A5.00.01"
    measurements: tuple[RimMeasurement, ...]
    certificates: tuple[x509.Certificate, ...]  # KeyInfo chain, signer first
    xml: bytes

    @property
    def active(self) -> dict[int, RimMeasurement]:
        return {m.index: m for m in self.measurements if m.active}


def driver_rim_id(version: str, product: str = "GH100") -> str:
    """RIM service id of a driver RIM, e.g. ``NV_GPU_DRIVER_GH100_590.12``."""
    return f"NV_GPU_DRIVER_{product}_{version}"


def vbios_rim_id(project: str, project_sku: str, chip_sku: str, vbios_version: str) -> str:
    """RIM service id of a VBIOS RIM, e.g. ``NV_GPU_VBIOS_G520_0200_885_9600A50001``."""
    return f"NV_GPU_VBIOS_{project}_{project_sku}_{chip_sku}_{vbios_version.replace('.', '').upper()}"


def switch_bios_rim_id(vbios_version: str) -> str:
    """RIM service id of an NVSwitch (LS10) BIOS RIM; NVSwitches report no project/SKU, NVIDIA fixes them."""
    return f"NV_SWITCH_BIOS_5612_0002_890_{vbios_version.replace('.', '').upper()}"


def _xml_root(xml_bytes: bytes) -> Any:
    if not isinstance(xml_bytes, bytes) or not xml_bytes:
        raise MalformedInputError("RIM must be non-empty bytes")
    if len(xml_bytes) > _MAX_RIM_BYTES:
        raise MalformedInputError("RIM larger than 4 MiB")
    if b"<!DOCTYPE" in xml_bytes or b"<!ENTITY" in xml_bytes:
        raise MalformedInputError("RIM must not carry a DTD")
    from lxml import etree  # signxml's XML library; imported only where RIMs are used

    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
    try:
        return etree.fromstring(xml_bytes, parser=parser)
    except (etree.XMLSyntaxError, ValueError) as exc:
        raise MalformedInputError(f"RIM is not well-formed XML: {exc}") from None


def _measurements(root: Any) -> tuple[RimMeasurement, ...]:
    out: list[RimMeasurement] = []
    for res in root.iterfind(f"{{{_SWID}}}Payload/{{{_SWID}}}Resource"):
        if res.get("type") != "Measurement":
            continue
        try:
            index = int(res.get("index", ""))
            count = int(res.get("alternatives", ""))
            size = int(res.get("size", ""))
            active = {"True": True, "False": False}[res.get("active", "")]
            alternatives = tuple(bytes.fromhex(res.get(f"{{{_SHA384_NS}}}Hash{i}", "")) for i in range(count))
        except (KeyError, ValueError):
            raise MalformedInputError(f"RIM measurement {res.get('index')!r} malformed") from None
        if index < 0 or count < 1 or any(len(a) != size for a in alternatives):
            raise MalformedInputError(f"RIM measurement {index}: alternatives/size inconsistent")
        if any(m.index == index for m in out):
            raise MalformedInputError(f"RIM measurement index {index} repeats")
        out.append(RimMeasurement(index, res.get("name", ""), active, size, alternatives))
    if not out:
        raise MalformedInputError("RIM holds no measurements")
    return tuple(out)


def parse_rim(xml_bytes: bytes, *, kind: RimKind | None = None) -> Rim:
    """Parse a RIM swidtag. ``kind`` defaults from the version's shape (VBIOS: ``xx.xx.xx.xx.xx``)."""
    root = _xml_root(xml_bytes)
    if root.tag != f"{{{_SWID}}}SoftwareIdentity":
        raise MalformedInputError("RIM root element is not a swid SoftwareIdentity")
    version = _meta_version(root)
    meta = root.find(f"{{{_SWID}}}Meta")
    detected: RimKind = "vbios" if _VBIOS_VERSION.match(version) else "driver"
    certs: list[x509.Certificate] = []
    for el in root.iterfind(f".//{{{_DS}}}X509Certificate"):
        try:
            certs.append(x509.load_der_x509_certificate(base64.b64decode("".join((el.text or "").split()))))
        except (ValueError, binascii.Error):
            raise MalformedInputError("RIM KeyInfo certificate does not parse") from None
    return Rim(
        kind=kind or detected,
        tag_id=str(root.get("tagId", "")),
        product=str(meta.get("product", "")),
        version=version,
        measurements=_measurements(root),
        certificates=tuple(certs),
        xml=xml_bytes,
    )


def _meta_version(root: Any) -> str:
    meta = root.find(f"{{{_SWID}}}Meta")
    if meta is None or not meta.get("colloquialVersion"):
        raise MalformedInputError("RIM Meta/colloquialVersion missing")
    return str(meta.get("colloquialVersion"))


@functools.lru_cache(maxsize=64)
def _signed_content(xml: bytes, signer: x509.Certificate) -> tuple[str, tuple[RimMeasurement, ...]] | str:
    """XMLDSig check with ``signer``'s key → (version, measurements) read from the signed element,
    or why not. The time is pinned inside the signer's validity, which is checked apart."""
    from signxml.algorithms import SignatureMethod
    from signxml.exceptions import InvalidInput, SignXMLException
    from signxml.verifier import SignatureConfiguration, XMLVerifier

    methods = frozenset(
        {SignatureMethod.ECDSA_SHA384, SignatureMethod.ECDSA_SHA512, SignatureMethod.ECDSA_SHA256}
    )
    moment = signer.not_valid_before_utc
    config = SignatureConfiguration(expect_references=1, signature_methods=methods, verification_time=moment)
    try:
        result = XMLVerifier().verify(xml, x509_cert=signer, expect_config=config)
    except (InvalidInput, SignXMLException) as exc:
        return f"XML signature invalid: {type(exc).__name__}: {str(exc)[:160]}"
    except Exception as exc:  # fail closed on anything signxml/lxml raise for hostile input
        return f"XML signature not verifiable: {type(exc).__name__}"
    signed = result.signed_xml if not isinstance(result, list) else None
    if signed is None or signed.tag != f"{{{_SWID}}}SoftwareIdentity":
        return "signature does not cover the whole SoftwareIdentity document"
    try:
        return _meta_version(signed), _measurements(signed)
    except MalformedInputError as exc:
        return f"signed content malformed: {exc}"


def verify_rim(
    rim: Rim, options: VerifyOptions, *, prefix: str = "rim", require_ocsp: bool = False
) -> Verdict:
    """``{p}.signature``, ``{p}.chain`` and ``{p}.chain.validity`` of one RIM, plus ``{p}.ocsp``
    (every certificate below the root, signer included) when ``options.ocsp_post`` is given
    (online or stapled); without one ``{p}.ocsp`` fails when ``require_ocsp``.

    With no ``options.trusted_roots`` the chain must end at the pinned NVIDIA CoRIM signing Root CA.
    """
    root = options.anchor_for(rim.certificates, nvidia_rim_root)
    now = options.now
    v = VerdictBuilder()
    chain = rim.certificates
    if not chain:
        v.fail(f"{prefix}.signature", "RIM carries no signing certificate")
    else:
        signed = _signed_content(rim.xml, chain[0])
        if isinstance(signed, str):
            v.fail(f"{prefix}.signature", signed)
        elif signed != (rim.version, rim.measurements):
            v.fail(f"{prefix}.signature", "version or measurements differ from the signed content")
        else:
            v.passed(f"{prefix}.signature", f"XMLDSig by {cert_name(chain[0])}")
    problem = chain_problem(chain, root)
    v.check(f"{prefix}.chain", problem is None, problem or f"{len(chain)} certificates to {cert_name(root)}")
    certs = chain if chain and chain[-1] == root else (*chain, root)
    validity = validity_problem(certs, now)
    v.check(f"{prefix}.chain.validity", validity is None, validity or f"valid at {now.isoformat()}")
    if options.ocsp_post is not None:
        anchored = replace(options, trusted_roots=(root,))
        v.extend(check_ocsp(chain, anchored, prefix=prefix, skip_leaf=False).checks)
    elif require_ocsp:
        v.fail(f"{prefix}.ocsp", "no OCSP response for the RIM signing chain (none stapled, not online)")
    return v.build()


@dataclass(frozen=True, slots=True)
class RimSet:
    """The RIMs a verifier may use, looked up by kind and version."""

    rims: tuple[Rim, ...] = ()

    @classmethod
    def of(cls, rims: Iterable[Rim]) -> RimSet:
        return cls(tuple(rims))

    def candidates(self, kind: RimKind, version: str) -> tuple[Rim, ...]:
        """Every distinct RIM of ``kind`` for ``version`` (hex digits compared case-insensitively)."""
        found: dict[bytes, Rim] = {}
        for r in self.rims:
            if r.kind == kind and r.version.upper() == version.upper():
                found.setdefault(r.xml, r)
        return tuple(found.values())

    def find(self, kind: RimKind, version: str) -> Rim | None:
        """The one RIM for ``version``; None when there is none or the choice is ambiguous."""
        found = self.candidates(kind, version)
        return found[0] if len(found) == 1 else None
