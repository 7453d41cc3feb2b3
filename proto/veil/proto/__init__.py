"""Veil's wire protocol: ``.proto`` sources under ``veil/v1`` and the generated code.

Import the generated modules from the versioned package, so a ``v2`` can live beside it::

    from veil.proto.v1 import evidence_pb2, generate_pb2, service_pb2, service_pb2_grpc

:mod:`veil.proto.chat` holds the one rule for chat messages (allowed roles, content), checked by the
client before it seals a request and by the enclave after it opens one.
"""
