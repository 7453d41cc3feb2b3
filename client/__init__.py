"""The Veil client SDK. Imports neither torch nor ``veil.enclave``."""

from veil.client.errors import (
    AttestationError,
    ChannelError,
    ConfigurationError,
    RequestRejectedError,
    ServerError,
    VeilClientError,
)

__all__ = [
    "AttestationError",
    "ChannelError",
    "ConfigurationError",
    "RequestRejectedError",
    "ServerError",
    "VeilClientError",
]
