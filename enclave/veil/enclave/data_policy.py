"""The data-handling policy: what the enclave promises about user data, and how it keeps it.

The policy is a small TOML file (default: ``data_policy.toml`` next to this module;
``veil serve --data-policy FILE`` picks another). The SHA-256 of the file's exact bytes
is the ``data_policy_digest`` in the attested claims. This server enforces exactly one
set of promises, and refuses (:class:`DataPolicyError`) a file that promises anything
else, because an attested promise the code does not keep would be a lie:

* ``log_content = false`` — :class:`MetadataLogFilter` rewrites every log record that
  reaches a handler: structured records keep only the policy's ``allowed_fields`` with
  scalar values; anything else (free text from a library, ``%``-arguments, exception
  tracebacks, stack info) is replaced by a fixed "redacted" line naming only the logger
  and, for exceptions, the exception *type*. Error texts the server puts into gRPC
  statuses are fixed strings chosen in the servicer (never an exception's message).
* ``retain = "none"`` — nothing about a request outlives its stream: the engine frees
  its KV blocks on finish, error, cancellation and client disconnect; nothing is written.
* ``share_kv_across_requests = false`` — the engine never shares KV blocks across tenants:
  a request that names no tenant shares with no one, and blocks that held another tenant's
  data are zeroed before they are handed over.
* ``share_kv_within_tenant`` (optional, default ``false``) — prefix caching: requests of one
  tenant (a tenant secret inside the sealed request; the SDK seals one per client instance)
  may reuse each other's full KV blocks, which stay in enclave memory (never written out)
  after a response until evicted. The cache key is derived inside the enclave; the time to
  first token this saves is visible to the host, per tenant only.
* ``log_exact_counts`` (optional, default ``false``) — whether a log record may carry a
  request's exact token counts. With ``false`` the filter drops :data:`EXACT_COUNT_FIELDS`
  (``prompt_tokens``, ``completion_tokens``, ``free_kv_blocks``: each, read before and after
  one request, gives that request's length) and rounds :data:`TIMING_FIELDS` (``queue_ms``,
  ``ttft_ms``, ``duration_ms``; time to first token grows with the prompt) up to a multiple of
  :data:`COARSE_MS`; and the policy may not list an exact-count field in ``allowed_fields``.
  ``true`` is an explicit, attested choice (the policy digest is in the claims) that a client
  can refuse. :data:`BUCKET_FIELDS` (``request_bucket``, ``response_bucket``: the padded sizes
  the host sees on the wire anyway) pass only when they are a bucket size (a power of two or a
  multiple of 64 KiB).
* ``core_dumps = false`` — :func:`harden_process` sets ``RLIMIT_CORE`` to 0 and calls
  ``prctl(PR_SET_DUMPABLE, 0)`` (no core file, no ptrace attach by same-uid processes,
  ``/proc/PID/mem`` closed to them).

Files: :func:`confine_temp_files` points ``tempfile``, ``TMPDIR`` and the torch/triton
compile caches at ``STATE_DIR/tmp/<pid>`` (mode 0700, removed at exit; left-overs of
dead servers are removed at start) and turns
off ``.pyc`` writing, so the process writes nowhere but its state directory.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any

from veil.enclave.errors import DataPolicyError

__all__ = [
    "BUCKET_FIELDS",
    "COARSE_MS",
    "EXACT_COUNT_FIELDS",
    "METADATA_FIELDS",
    "TIMING_FIELDS",
    "DataPolicy",
    "HardeningReport",
    "MetadataLogFilter",
    "coarse_ms",
    "configure_logging",
    "confine_temp_files",
    "harden_process",
    "install_exception_hooks",
    "load_data_policy",
    "log_event",
    "parse_data_policy",
    "remove_temp_files",
]

# Every field the server ever logs; each is metadata by construction (numbers, enum
# names, a server-chosen request handle). A policy may allow a subset, never more.
METADATA_FIELDS = frozenset(
    {
        "event",
        "request",
        "status",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "prompt_tokens_bucket",
        "completion_tokens_bucket",
        "streamed",
        "queue_ms",
        "ttft_ms",
        "duration_ms",
        "running",
        "waiting",
        "free_kv_blocks",
        "total_kv_blocks",
        "error_type",
        "port",
        "request_bucket",
        "response_bucket",
        "frames",
    }
)
# Per-request counts: only where the policy says log_exact_counts = true.
EXACT_COUNT_FIELDS = frozenset({"prompt_tokens", "completion_tokens", "free_kv_blocks"})
# Timings, rounded up to COARSE_MS unless log_exact_counts = true.
TIMING_FIELDS = frozenset({"queue_ms", "ttft_ms", "duration_ms"})
COARSE_MS = 100
# Padded sizes (bytes): kept only when they are a bucket size of veil.attestation.channel.padding.
BUCKET_FIELDS = frozenset({"request_bucket", "response_bucket"})
_BUCKET_STEP = 64 * 1024
_REQUIRED = {
    "log_content": False,
    "retain": "none",
    "share_kv_across_requests": False,
    "core_dumps": False,
}
_TOP_KEYS = {"version", *_REQUIRED, "log_exact_counts", "share_kv_within_tenant", "logging"}
_EVENT = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")
_SAFE_STR = re.compile(r"^[A-Za-z0-9_.:-]{0,64}$")
_MAX_POLICY_BYTES = 64 * 1024
_FIELDS_ATTR = "veil_fields"
PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


@dataclass(frozen=True, slots=True)
class DataPolicy:
    """A parsed data-handling policy; ``digest`` = SHA-256 of the file's bytes."""

    version: int
    log_content: bool
    retain: str
    share_kv_across_requests: bool
    core_dumps: bool
    share_kv_within_tenant: bool
    log_exact_counts: bool
    allowed_log_fields: frozenset[str]
    digest: bytes
    source: str


def parse_data_policy(data: bytes, source: str = "<bytes>") -> DataPolicy:
    """Parse and check a policy file's bytes (pure; no I/O)."""
    if len(data) > _MAX_POLICY_BYTES:
        raise DataPolicyError(f"data policy {source} is larger than 64 KiB")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise DataPolicyError(f"data policy {source} is not UTF-8 TOML: {exc}") from None
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise DataPolicyError(f"data policy {source}: unknown keys {unknown} (a typo must not pass)")
    if doc.get("version") != 1:
        raise DataPolicyError(f"data policy {source}: version must be 1")
    for key, required in _REQUIRED.items():
        if key not in doc:
            raise DataPolicyError(f"data policy {source}: {key} is required")
        if doc[key] != required or type(doc[key]) is not type(required):
            raise DataPolicyError(
                f"data policy {source}: {key} = {doc[key]!r} cannot be enforced by this server "
                f"(it enforces {key} = {required!r})"
            )
    exact = doc.get("log_exact_counts", False)
    if type(exact) is not bool:
        raise DataPolicyError(f"data policy {source}: log_exact_counts must be true or false")
    within = doc.get("share_kv_within_tenant", False)
    if type(within) is not bool:
        raise DataPolicyError(f"data policy {source}: share_kv_within_tenant must be true or false")
    fields = _allowed_fields(doc.get("logging", {}), source)
    if not exact and fields & EXACT_COUNT_FIELDS:
        raise DataPolicyError(
            f"data policy {source}: logging.allowed_fields {sorted(fields & EXACT_COUNT_FIELDS)} are "
            "exact per-request counts, which log_exact_counts = false forbids"
        )
    return DataPolicy(
        version=1,
        log_content=False,
        retain="none",
        share_kv_across_requests=False,
        core_dumps=False,
        share_kv_within_tenant=within,
        log_exact_counts=exact,
        allowed_log_fields=fields,
        digest=hashlib.sha256(data).digest(),
        source=source,
    )


def _allowed_fields(section: object, source: str) -> frozenset[str]:
    if not isinstance(section, dict) or set(section) - {"allowed_fields"}:
        raise DataPolicyError(f"data policy {source}: [logging] may only hold allowed_fields")
    fields = section.get("allowed_fields", ["event"])
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        raise DataPolicyError(f"data policy {source}: logging.allowed_fields must be a list of strings")
    extra = sorted(set(fields) - METADATA_FIELDS)
    if extra:
        raise DataPolicyError(
            f"data policy {source}: logging.allowed_fields {extra} are not metadata fields this server knows"
        )
    return frozenset(fields) | {"event"}


def load_data_policy(path: Path | None = None) -> DataPolicy:
    """Load the policy at ``path``, or the default shipped in the package."""
    if path is None:
        data = resources.files("veil.enclave").joinpath("data_policy.toml").read_bytes()
        return parse_data_policy(data, "<default data_policy.toml>")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataPolicyError(f"cannot read data policy {path}: {exc.strerror}") from None
    return parse_data_policy(data, str(path))


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: object) -> None:
    """Log a structured, metadata-only record: ``event`` plus named scalar fields."""
    logger.log(level, event, extra={_FIELDS_ATTR: fields})


def _safe_value(value: object) -> object | None:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str) and _SAFE_STR.match(value):
        return value
    return None


def coarse_ms(value: float) -> int:
    """``value`` (milliseconds) rounded up to a multiple of :data:`COARSE_MS` (negative or not finite: -1)."""
    if not math.isfinite(value) or value < 0:
        return -1
    return math.ceil(value / COARSE_MS) * COARSE_MS


def _is_bucket(value: object) -> bool:
    if type(value) is not int or value < 1:
        return False
    return value & (value - 1) == 0 or value % _BUCKET_STEP == 0


def _shape(key: str, value: object, exact: bool) -> tuple[bool, object]:
    """(keep?, value) for one structured field under the count rules of the module docstring."""
    if key in EXACT_COUNT_FIELDS and not exact:
        return False, None
    if key in BUCKET_FIELDS:
        return _is_bucket(value), value
    if key in TIMING_FIELDS and not exact and isinstance(value, int | float) and not isinstance(value, bool):
        return True, coarse_ms(float(value))
    return True, value


class MetadataLogFilter(logging.Filter):
    """Rewrites every record to metadata only (see the module docstring); never drops a record."""

    def __init__(
        self, allowed_fields: frozenset[str], *, simulated: bool, exact_counts: bool = False
    ) -> None:
        super().__init__()
        self._allowed = allowed_fields
        self._exact = exact_counts
        self._tag = "SIMULATED TEE" if simulated else "TEE"

    def filter(self, record: logging.LogRecord) -> bool:
        fields: dict[str, object] = {}
        raw = getattr(record, _FIELDS_ATTR, None)
        structured = isinstance(raw, Mapping) and isinstance(record.msg, str) and not record.args
        if structured and isinstance(raw, Mapping) and _EVENT.match(str(record.msg)):
            for key, value in raw.items():
                safe = _safe_value(value)
                if key in self._allowed and (safe is not None or value is None):
                    keep, shaped = _shape(key, safe, self._exact)
                    if keep:
                        fields[key] = shaped
        else:
            record.msg = "record.redacted"
        if record.exc_info and record.exc_info[0] is not None and "error_type" in self._allowed:
            fields["error_type"] = record.exc_info[0].__name__
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        setattr(record, _FIELDS_ATTR, fields)
        record.veil_tag = self._tag
        record.veil_kv = " ".join(f"{k}={v}" for k, v in sorted(fields.items()))
        return True


_FORMAT = "%(asctime)s %(levelname)s [%(veil_tag)s] %(name)s %(message)s %(veil_kv)s"


def configure_logging(
    policy: DataPolicy, *, simulated: bool, stream: Any = None, level: int = logging.INFO
) -> logging.Handler:
    """Send all logging to ``stream`` (stderr) through the metadata filter; filter every root handler."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    flt = MetadataLogFilter(
        policy.allowed_log_fields, simulated=simulated, exact_counts=policy.log_exact_counts
    )
    root = logging.getLogger()
    for existing in list(root.handlers):
        existing.addFilter(flt)
    handler.addFilter(flt)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    return handler


@dataclass(frozen=True, slots=True)
class HardeningReport:
    core_limit: tuple[int, int]
    dumpable: bool | None  # None where prctl is unavailable (not Linux)


def harden_process() -> HardeningReport:
    """Disable core dumps: ``RLIMIT_CORE`` = 0 and ``prctl(PR_SET_DUMPABLE, 0)`` (Linux)."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    limit = resource.getrlimit(resource.RLIMIT_CORE)
    if not sys.platform.startswith("linux"):
        return HardeningReport(limit, None)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise DataPolicyError(f"prctl(PR_SET_DUMPABLE, 0) failed: errno {ctypes.get_errno()}")
    dumpable = int(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
    if dumpable != 0:
        raise DataPolicyError("process is still dumpable after prctl(PR_SET_DUMPABLE, 0)")
    return HardeningReport(limit, False)


_CACHE_ENV = (
    "TRITON_CACHE_DIR",
    "TORCHINDUCTOR_CACHE_DIR",
    "CUDA_CACHE_PATH",
    "XDG_CACHE_HOME",
    "HF_HOME",
    "TORCH_HOME",
)


def confine_temp_files(state_dir: Path) -> Path:
    """Make ``STATE_DIR/tmp/<pid>`` (0700, fresh) the only place temp and cache files can go.

    Left-overs of servers that died without cleaning up (their pid is gone) are removed
    first, so nothing about an old request outlives its process for long.
    """
    parent = Path(state_dir) / "tmp"
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    for old in parent.iterdir():
        if not old.name.isdigit() or not _alive(int(old.name)) or int(old.name) == os.getpid():
            shutil.rmtree(old, ignore_errors=True)
    tmp = parent / str(os.getpid())
    tmp.mkdir(mode=0o700)
    for name in ("TMPDIR", "TEMP", "TMP"):
        os.environ[name] = str(tmp)
    for name in _CACHE_ENV:
        os.environ[name] = str(tmp / name.lower())
    tempfile.tempdir = str(tmp)
    sys.dont_write_bytecode = True
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_temp_files(tmp: Path) -> None:
    """Delete the temp directory made by :func:`confine_temp_files` (at exit)."""
    shutil.rmtree(tmp, ignore_errors=True)


def install_exception_hooks(logger: logging.Logger) -> None:
    """Uncaught exceptions are logged by type only, never with message or traceback."""

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        log_event(logger, "uncaught_exception", logging.ERROR, error_type=exc_type.__name__)

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        name = args.exc_type.__name__ if args.exc_type is not None else "unknown"
        log_event(logger, "uncaught_thread_exception", logging.ERROR, error_type=name)

    sys.excepthook = hook
    threading.excepthook = thread_hook
