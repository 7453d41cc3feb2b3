"""Prefix-cache keys: who may share KV blocks, and the hash chain that names a block's contents.

A full KV block (``block_size`` tokens) is content-addressed by a hash chain over token ids:
``h_0 = H_k(tokens of block 0)``, ``h_i = H_k(h_{i-1} ‖ tokens of block i)``, where ``H_k`` is
BLAKE2b keyed with the *tenant's cache key* ``k``. So a block's name covers every token before
it (two prompts share block ``i`` only if they agree on all of ``[0, (i+1)·block_size)``), and
two tenants' names for the same tokens are unrelated: a lookup with one tenant's key can never
find another tenant's block.

The cache key is derived inside the enclave, never chosen by the client or the host:
``k = BLAKE2b(key=enclave secret, data=tenant secret)``. The enclave secret is 32 random bytes
drawn when the engine starts and never leaves it; the tenant secret is carried inside the
encrypted request (``GenerateRequest.tenant_secret``: the SDK's random per-instance secret, or
one derived from the application's ``tenant=`` secret). Knowing a tenant secret is what it takes
to share that tenant's cache; the host sees only ciphertext, and a client naming a secret
learns nothing about any other tenant's key. Whether a tenant's requests may share at all is
the attested data policy's ``share_kv_within_tenant``.

Pure: ``hashlib`` only (no I/O, no torch).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from veil.enclave.errors import EngineInternalError, InvalidRequestError

__all__ = [
    "CACHE_KEY_SIZE",
    "ENCLAVE_SECRET_SIZE",
    "TENANT_SECRET_MAX",
    "TENANT_SECRET_MIN",
    "block_hash",
    "check_tenant_secret",
    "extend_block_hashes",
    "tenant_cache_key",
]

ENCLAVE_SECRET_SIZE = 32
CACHE_KEY_SIZE = 32
# A tenant secret must be guess-proof: whoever knows it shares (and can time) the tenant's cache.
TENANT_SECRET_MIN = 16
TENANT_SECRET_MAX = 64
_TENANT_PERSON = b"veil/tenant/v1"  # BLAKE2b personalisation (at most 16 bytes)
_BLOCK_PERSON = b"veil/kvblock/v1"
_MAX_TOKEN = 2**32 - 1


def check_tenant_secret(secret: object) -> bytes | None:
    """The request's tenant secret, or None when it carries none (then it shares nothing).

    Raises :class:`InvalidRequestError` for anything but 16 to 64 bytes."""
    if secret is None or secret == b"":
        return None
    if not isinstance(secret, bytes) or not TENANT_SECRET_MIN <= len(secret) <= TENANT_SECRET_MAX:
        raise InvalidRequestError(f"tenant_secret must be {TENANT_SECRET_MIN} to {TENANT_SECRET_MAX} bytes")
    return secret


def tenant_cache_key(enclave_secret: bytes, tenant_secret: bytes) -> bytes:
    """The key that seeds a tenant's block hash chain: keyed BLAKE2b of the tenant secret."""
    if len(enclave_secret) != ENCLAVE_SECRET_SIZE:
        raise EngineInternalError(f"the enclave cache secret must be {ENCLAVE_SECRET_SIZE} bytes")
    secret = check_tenant_secret(tenant_secret)
    if secret is None:
        raise EngineInternalError("no tenant secret to derive a cache key from")
    return hashlib.blake2b(
        secret, key=enclave_secret, person=_TENANT_PERSON, digest_size=CACHE_KEY_SIZE
    ).digest()


def block_hash(cache_key: bytes, parent: bytes, tokens: Sequence[int]) -> bytes:
    """The name of a full block holding ``tokens`` after the block named ``parent`` (b"" for the first)."""
    if any(not 0 <= t <= _MAX_TOKEN for t in tokens):
        raise EngineInternalError("token id outside uint32")
    h = hashlib.blake2b(key=cache_key, person=_BLOCK_PERSON, digest_size=32)
    h.update(struct.pack("<B", len(parent)))
    h.update(parent)
    h.update(struct.pack(f"<{len(tokens)}I", *tokens))
    return h.digest()


def extend_block_hashes(
    hashes: list[bytes], cache_key: bytes, token_ids: Sequence[int], block_size: int, num_blocks: int
) -> None:
    """Append to ``hashes`` (the chain of ``token_ids``' first blocks) until it names ``num_blocks``."""
    if num_blocks * block_size > len(token_ids):
        raise EngineInternalError("hashing a block that is not full")
    for i in range(len(hashes), num_blocks):
        parent = hashes[i - 1] if i else b""
        hashes.append(block_hash(cache_key, parent, token_ids[i * block_size : (i + 1) * block_size]))
