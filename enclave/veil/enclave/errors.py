"""Every exception ``veil.enclave`` raises.

::

    EnclaveError                     base
    ├── ModelLoadError               a weights file / checkpoint cannot be loaded
    │                                (missing, truncated, unsupported tensor type or architecture)
    ├── InvalidRequestError          a request is rejected before it reaches the engine loop
    │   │                            (empty prompt, max_tokens < 1, temperature < 0, top_p ∉ (0, 1])
    │   ├── PromptTooLongError       prompt (+ max_tokens) longer than the context
    │   │   └── PromptTooLargeError  prompt or chat messages over the byte limit checked
    │   │                            before tokenizing
    │   └── ResponseFormatError      a response_format (JSON Schema, grammar) that is invalid,
    │                                unsupported or too large to compile
    ├── EngineOverloadedError        the waiting queue is full (the server maps it to
    │                                RESOURCE_EXHAUSTED)
    ├── EngineStoppedError           the engine is draining or stopped
    ├── EngineInternalError          an internal invariant of the engine broke (a bug, never bad input)
    ├── ReplayRefusedError           a sealed request outside the replay window or already seen
    │   │                            (the server maps it to INVALID_ARGUMENT, a fixed message)
    │   └── ReplayCacheFullError     no room to remember another request id (RESOURCE_EXHAUSTED)
    ├── AttestationProviderError     a TEE attestation provider failed to produce evidence
    │   ├── CollateralUnavailableError   no current vendor collateral to staple (fetch failed and
    │   │                                the cached set expired, or it does not parse)
    │   └── TeeUnavailableError      no usable TEE / GPU interface: missing, permission denied,
    │                                CC mode off, dev-tools mode on (``veil serve`` exits non-zero)
    ├── DataPolicyError              the data-handling policy file is malformed or promises
    │                                something this server cannot enforce
    └── DeviceUnavailableError       the requested compute device is not there (``--device cuda``
                                     without a GPU)

Messages never contain prompt or completion text (data-handling policy).
"""

from __future__ import annotations

__all__ = [
    "AttestationProviderError",
    "CollateralUnavailableError",
    "DataPolicyError",
    "DeviceUnavailableError",
    "EnclaveError",
    "EngineInternalError",
    "EngineOverloadedError",
    "EngineStoppedError",
    "InvalidRequestError",
    "ModelLoadError",
    "PromptTooLargeError",
    "PromptTooLongError",
    "ReplayCacheFullError",
    "ReplayRefusedError",
    "ResponseFormatError",
    "TeeUnavailableError",
]


class EnclaveError(Exception):
    """Base of every error raised by ``veil.enclave``."""


class ModelLoadError(EnclaveError):
    """A model file or checkpoint cannot be loaded."""


class InvalidRequestError(EnclaveError):
    """A request's parameters are invalid; nothing was queued."""


class PromptTooLongError(InvalidRequestError):
    """The prompt does not fit the model's context."""


class PromptTooLargeError(PromptTooLongError):
    """The prompt (or all chat messages) is larger in bytes than the engine tokenizes."""


class ResponseFormatError(InvalidRequestError):
    """A response_format cannot be enforced: malformed, unsupported by the grammar library, too large."""


class EngineOverloadedError(EnclaveError):
    """The engine's queue is full."""


class EngineStoppedError(EnclaveError):
    """The engine is draining or stopped and admits no new requests."""


class EngineInternalError(EnclaveError):
    """An internal invariant of the engine (scheduler, block manager) broke: a bug, never bad input."""


class ReplayRefusedError(EnclaveError):
    """A sealed request is outside the replay window or its request id was already seen."""


class ReplayCacheFullError(ReplayRefusedError):
    """The replay guard is full: the request is refused rather than an id forgotten."""


class AttestationProviderError(EnclaveError):
    """An attestation provider could not produce evidence."""


class DataPolicyError(EnclaveError):
    """The data-handling policy is malformed or promises what this server cannot enforce."""


class CollateralUnavailableError(AttestationProviderError):
    """No current vendor collateral to staple into the evidence (see ``veil.enclave.collateral``)."""


class TeeUnavailableError(AttestationProviderError):
    """No usable TEE or GPU attestation interface (see ``veil.enclave.tee.probe``)."""


class DeviceUnavailableError(EnclaveError):
    """The requested compute device (a CUDA GPU, or the Triton interpreter on the CPU) is not available."""
