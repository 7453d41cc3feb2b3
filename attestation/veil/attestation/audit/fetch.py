"""``veil attest fetch``'s one RPC: ``GetEvidence`` on a live Veil server, bytes as received.

A direct gRPC call with the ``veil.proto`` messages (``veil.attestation`` imports no
``veil.client``). The answer is returned exactly as it came off the wire, so the file an
auditor saves is what the server signed, not a re-serialization.
"""

from __future__ import annotations

import grpc

from veil.attestation.audit.verify import AuditUsageError
from veil.proto.v1 import service_pb2

__all__ = ["GET_EVIDENCE", "fetch_evidence", "grpc_address"]

GET_EVIDENCE = "/veil.v1.AttestationService/GetEvidence"
_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def grpc_address(target: str) -> tuple[str, bool]:
    """``host:port``, ``grpc://host:port`` or ``grpcs://host:port`` → (address, use TLS)."""
    scheme, sep, rest = target.partition("://")
    if not sep:
        address, tls = target, False
    elif scheme in ("grpc", "grpcs"):
        address, tls = rest, scheme == "grpcs"
    else:
        raise AuditUsageError(f"unsupported target scheme in {target!r} (use host:port or grpcs://)")
    if ":" not in address:
        raise AuditUsageError(f"target must be host:port, got {target!r}")
    return address, tls


def _identity(data: bytes) -> bytes:
    return data


def fetch_evidence(target: str, nonce: bytes, *, timeout: float) -> bytes:
    """Call ``GetEvidence(nonce)`` on ``target``; the serialized ``Evidence`` as received.

    Raises :class:`AuditUsageError` ("GetEvidence from TARGET failed: CODE: details") when the
    call fails; the bytes are not checked here (the caller parses them).
    """
    address, tls = grpc_address(target)
    options = [
        ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ]
    channel = (
        grpc.secure_channel(address, grpc.ssl_channel_credentials(), options=options)
        if tls
        else grpc.insecure_channel(address, options=options)
    )
    try:
        call = channel.unary_unary(
            GET_EVIDENCE,
            request_serializer=service_pb2.GetEvidenceRequest.SerializeToString,
            response_deserializer=_identity,
        )
        data: bytes = call(service_pb2.GetEvidenceRequest(nonce=nonce), timeout=timeout)
    except grpc.RpcError as exc:
        code = exc.code().name if isinstance(exc, grpc.Call) else "UNKNOWN"
        details = (exc.details() if isinstance(exc, grpc.Call) else None) or "no details"
        raise AuditUsageError(f"GetEvidence from {target} failed: {code}: {details}") from None
    finally:
        channel.close()
    return data
