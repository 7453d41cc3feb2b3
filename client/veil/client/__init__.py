"""The Veil client SDK: attested, end-to-end encrypted chat with a Veil enclave.

::

    from veil.client import Client, Policy

    client = Client("localhost:50051", policy=Policy.simulated("state/simulation-root.pem"))
    reply = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}])
    print(reply.choices[0].message.content)
    print(client.attestation.table())

Imports neither torch nor ``veil.enclave``.
"""

from veil.attestation.policy import Policy
from veil.attestation.verdict import Check, CheckStatus, Verdict
from veil.client._async_client import AsyncClient, AsyncStream, AsyncTextStream
from veil.client._client import Client, Stream, TextStream
from veil.client._identity import EnclaveIdentity
from veil.client._pool import ReplicaStatus
from veil.client._transport import (
    AsyncGrpcTransport,
    AsyncResponseStream,
    AsyncTransport,
    GrpcTransport,
    ResponseStream,
    Transport,
)
from veil.client._types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    Choice,
    ChoiceDelta,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionUsage,
)
from veil.client.errors import (
    AttestationError,
    ChannelError,
    ClientClosedError,
    ConfigurationError,
    RequestRejectedError,
    ServerError,
    StreamInterruptedError,
    VeilClientError,
)

__all__ = [
    "AsyncClient",
    "AsyncGrpcTransport",
    "AsyncResponseStream",
    "AsyncStream",
    "AsyncTextStream",
    "AsyncTransport",
    "AttestationError",
    "ChannelError",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionMessage",
    "Check",
    "CheckStatus",
    "Choice",
    "ChoiceDelta",
    "ChunkChoice",
    "Client",
    "ClientClosedError",
    "Completion",
    "CompletionChoice",
    "CompletionUsage",
    "ConfigurationError",
    "EnclaveIdentity",
    "GrpcTransport",
    "Policy",
    "ReplicaStatus",
    "RequestRejectedError",
    "ResponseStream",
    "ServerError",
    "Stream",
    "StreamInterruptedError",
    "TextStream",
    "Transport",
    "VeilClientError",
    "Verdict",
]
