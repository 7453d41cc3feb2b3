"""A fake NVIDIA RIM authority: a CoRIM-like root → RIM signing certificate, and signed RIMs.

RIMs are made exactly as NVIDIA's are (the real verifier, :func:`~veil.attestation.nvidia.rim.verify_rim`,
checks them): a TCG swidtag ``SoftwareIdentity`` whose ``Payload`` lists the golden
measurements (SHA-384, ``index`` 0-based: SPDM block ``index + 1``), enveloped-signed with
XMLDSig (ECDSA-SHA384, C14N 1.1) by ``signxml``, the signing chain in ``KeyInfo``. Used by the
simulated TEE (which staples the RIMs of its simulated GPU) and by the tests. The real NVIDIA
RIM root is never faked: verification is told to trust this root explicitly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from veil.attestation.testing.pki import ca_key_usage, key_identifiers, leaf_key_usage

__all__ = ["FakeRimCa", "build_rim_xml", "make_fake_rim_ca"]

_SWID = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd"
_SHA384_NS = "http://www.w3.org/2001/04/xmlenc#sha384"


def _cert(
    subject: str,
    issuer: str,
    key: ec.EllipticCurvePrivateKey,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    organization: str,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    def name(cn: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
            ]
        )

    builder = (
        x509.CertificateBuilder()
        .subject_name(name(subject))
        .issuer_name(name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(ca_key_usage() if ca else leaf_key_usage(), critical=True)
    )
    for identifier in key_identifiers(key.public_key(), issuer_key.public_key()):
        builder = builder.add_extension(identifier, critical=False)
    return builder.sign(issuer_key, hashes.SHA384())


@dataclass(frozen=True, slots=True)
class FakeRimCa:
    """A RIM root and the certificate that signs RIMs, with their P-384 keys."""

    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    signer_key: ec.EllipticCurvePrivateKey
    signer: x509.Certificate

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """Signer first, root last (what ``KeyInfo`` carries)."""
        return (self.signer, self.root)

    def sign_rim(
        self,
        *,
        kind: Literal["driver", "vbios"],
        version: str,
        golden: Mapping[int, bytes],
        product: str = "GH100",
        inactive: Mapping[int, bytes] | None = None,
    ) -> bytes:
        """A signed RIM (XML bytes) whose active golden measurements are ``golden``
        (0-based index → SHA-384 value); ``inactive`` ones are listed but not compared."""
        from lxml import etree
        from signxml.algorithms import CanonicalizationMethod, DigestAlgorithm, SignatureMethod
        from signxml.signer import XMLSigner

        root = etree.fromstring(
            build_rim_xml(kind=kind, version=version, golden=golden, product=product, inactive=inactive)
        )
        signer = XMLSigner(
            signature_algorithm=SignatureMethod.ECDSA_SHA384,
            digest_algorithm=DigestAlgorithm.SHA384,
            c14n_algorithm=CanonicalizationMethod.CANONICAL_XML_1_1,
        )
        signed = signer.sign(root, key=self.signer_key, cert=list(self.chain))
        return bytes(etree.tostring(signed, xml_declaration=False))


def build_rim_xml(
    *,
    kind: Literal["driver", "vbios"],
    version: str,
    golden: Mapping[int, bytes],
    product: str = "GH100",
    inactive: Mapping[int, bytes] | None = None,
) -> bytes:
    """The unsigned swidtag of a RIM (see :meth:`FakeRimCa.sign_rim`)."""
    from lxml import etree

    values = {i: (v, True) for i, v in golden.items()}
    values.update({i: (v, False) for i, v in (inactive or {}).items() if i not in golden})
    tag_id = hashlib.sha384(f"{kind}/{product}/{version}".encode()).hexdigest()
    root = etree.Element(
        f"{{{_SWID}}}SoftwareIdentity",
        nsmap={None: _SWID, "ns2": _SHA384_NS},
        attrib={"corpus": "false", "name": product, "patch": "false", "supplemental": "false",
                "tagId": tag_id, "version": "1.0", "tagVersion": "0"},
    )  # fmt: skip
    etree.SubElement(
        root, f"{{{_SWID}}}Entity", name="NVIDIA Corporation (SIMULATED)", role="softwareCreator tagCreator"
    )
    etree.SubElement(
        root,
        f"{{{_SWID}}}Meta",
        colloquialVersion=version,
        edition="GPU" if kind == "driver" else "VBIOS",
        product=product,
        revision="r1",
        PayloadType="direct",
    )
    payload = etree.SubElement(root, f"{{{_SWID}}}Payload")
    for index in sorted(values):
        value, active = values[index]
        attrib = {"type": "Measurement", "index": str(index), "active": str(active), "alternatives": "1"}
        attrib[f"{{{_SHA384_NS}}}Hash0"] = value.hex()
        attrib.update(name=f"Measurement_{index}", size=str(len(value)))
        etree.SubElement(payload, f"{{{_SWID}}}Resource", attrib=attrib)
    return bytes(etree.tostring(root))


def make_fake_rim_ca(
    *,
    not_before: datetime,
    not_after: datetime,
    keys: tuple[ec.EllipticCurvePrivateKey, ec.EllipticCurvePrivateKey] | None = None,
    organization: str = "Fake NVIDIA RIM Authority",
    prefix: str = "Fake ",
) -> FakeRimCa:
    """A RIM root and RIM signing certificate (fresh P-384 keys unless given)."""
    root_key, signer_key = keys or (
        ec.generate_private_key(ec.SECP384R1()),
        ec.generate_private_key(ec.SECP384R1()),
    )
    root_cn, signer_cn = f"{prefix}NVIDIA Reference Value Root CA", f"{prefix}NVIDIA RIM Signing"
    root = _cert(root_cn, root_cn, root_key, root_key, ca=True, organization=organization,
                 not_before=not_before, not_after=not_after)  # fmt: skip
    signer = _cert(signer_cn, root_cn, signer_key, root_key, ca=False, organization=organization,
                   not_before=not_before, not_after=not_after)  # fmt: skip
    return FakeRimCa(root_key, root, signer_key, signer)
