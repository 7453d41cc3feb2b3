from veil.proto.v1 import evidence_pb2 as _evidence_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetEvidenceRequest(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    def __init__(self, nonce: _Optional[bytes] = ...) -> None: ...

class EncryptedRequest(_message.Message):
    __slots__ = ("key_id", "ciphertext")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    key_id: bytes
    ciphertext: bytes
    def __init__(self, key_id: _Optional[bytes] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class EncryptedChunk(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class GetMetricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Metrics(_message.Message):
    __slots__ = ("simulated", "draining", "uptime_s", "requests_started", "requests_completed", "requests_rejected", "requests_cancelled", "requests_active", "evidence_served", "evidence_rate_limited", "total_kv_blocks", "period_s")
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_STARTED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_SERVED_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_RATE_LIMITED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PERIOD_S_FIELD_NUMBER: _ClassVar[int]
    simulated: bool
    draining: bool
    uptime_s: float
    requests_started: int
    requests_completed: int
    requests_rejected: int
    requests_cancelled: int
    requests_active: int
    evidence_served: int
    evidence_rate_limited: int
    total_kv_blocks: int
    period_s: float
    def __init__(self, simulated: _Optional[bool] = ..., draining: _Optional[bool] = ..., uptime_s: _Optional[float] = ..., requests_started: _Optional[int] = ..., requests_completed: _Optional[int] = ..., requests_rejected: _Optional[int] = ..., requests_cancelled: _Optional[int] = ..., requests_active: _Optional[int] = ..., evidence_served: _Optional[int] = ..., evidence_rate_limited: _Optional[int] = ..., total_kv_blocks: _Optional[int] = ..., period_s: _Optional[float] = ...) -> None: ...
