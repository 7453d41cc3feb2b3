"""The data-handling policy: parsing, its digest, and each enforcement mechanism."""

from __future__ import annotations

import hashlib
import io
import logging
import secrets
import subprocess
import sys
import textwrap
from importlib import resources
from pathlib import Path

import pytest

from veil.enclave.data_policy import (
    EXACT_COUNT_FIELDS,
    METADATA_FIELDS,
    MetadataLogFilter,
    load_data_policy,
    log_event,
    parse_data_policy,
)
from veil.enclave.errors import DataPolicyError

DEFAULT = resources.files("veil.enclave").joinpath("data_policy.toml").read_bytes()


def test_default_policy_and_digest() -> None:
    policy = load_data_policy()
    assert policy.log_content is False
    assert policy.retain == "none"
    assert policy.share_kv_across_requests is False
    assert policy.core_dumps is False
    assert policy.digest == hashlib.sha256(DEFAULT).digest()
    assert "request" in policy.allowed_log_fields and "event" in policy.allowed_log_fields
    assert policy.allowed_log_fields <= METADATA_FIELDS


def test_policy_from_file_digest_is_of_the_exact_bytes(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_bytes(DEFAULT + b"\n# a comment changes the digest\n")
    policy = load_data_policy(path)
    assert policy.digest == hashlib.sha256(path.read_bytes()).digest()
    assert policy.digest != load_data_policy().digest
    with pytest.raises(DataPolicyError):
        load_data_policy(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"log_content = false", b"log_content = true"),
        (b'retain = "none"', b'retain = "30d"'),
        (b"share_kv_across_requests = false", b"share_kv_across_requests = true"),
        (b"core_dumps = false", b"core_dumps = true"),
        (b"version = 1", b"version = 2"),
        (b"log_content = false", b"log_content = 0"),
        (b"log_content = false", b"log_contnet = false"),
        (b'    "port",', b'    "port",\n    "prompt",'),
        (b"[logging]", b"[logging]\nextra = 1"),
        (b"version = 1", b"version = 1\nunknown_promise = true"),
        (b"version = 1", b"version = = 1"),
    ],
)
def test_unenforceable_or_malformed_policies_are_refused(old: bytes, new: bytes) -> None:
    assert old in DEFAULT
    with pytest.raises(DataPolicyError):
        parse_data_policy(DEFAULT.replace(old, new, 1))


def _capture(
    fields: frozenset[str] | None = None, *, exact_counts: bool = False
) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(veil_tag)s|%(message)s|%(veil_kv)s"))
    allowed = fields or load_data_policy().allowed_log_fields
    handler.addFilter(MetadataLogFilter(allowed, simulated=True, exact_counts=exact_counts))
    logger = logging.getLogger(f"veil.test.{secrets.token_hex(4)}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    return logger, stream


def test_filter_keeps_allowed_metadata_only() -> None:
    canary = f"CANARY-{secrets.token_hex(8)}"
    # Issue #12 changed the default: exact counts are dropped and timings coarsened unless the
    # policy says log_exact_counts = true; this filter is that opt-in, with the old assertion.
    fields = load_data_policy().allowed_log_fields | {"prompt_tokens"}
    logger, out = _capture(fields, exact_counts=True)
    log_event(logger, "request.done", request="ab12", prompt_tokens=7, duration_ms=1.5, prompt=canary)
    log_event(logger, "request.done", status=f"free text {canary}")  # not a safe token → dropped
    text = out.getvalue()
    assert "SIMULATED TEE|request.done|duration_ms=1.5 prompt_tokens=7 request=ab12" in text
    assert canary not in text
    assert "prompt=" not in text


def test_default_filter_drops_exact_counts_and_coarsens_timings() -> None:
    every = METADATA_FIELDS | EXACT_COUNT_FIELDS  # even a filter that allowed them
    logger, out = _capture(every)
    log_event(
        logger,
        "request.done",
        request="ab12",
        prompt_tokens=1234,
        completion_tokens=57,
        free_kv_blocks=311,
        ttft_ms=123.4,
        queue_ms=0.0,
        duration_ms=1001,
        request_bucket=2048,
        response_bucket=1000,  # not a bucket size: dropped
    )
    text = out.getvalue().strip()
    kv = "duration_ms=1100 queue_ms=0 request=ab12 request_bucket=2048 ttft_ms=200"
    assert text == f"SIMULATED TEE|request.done|{kv}"
    for exact in ("1234", "57", "311", "123.4", "1001"):
        assert exact not in text


def test_exact_counts_are_an_explicit_attested_opt_in() -> None:
    assert load_data_policy().log_exact_counts is False
    assert b"log_exact_counts = false" in DEFAULT
    opted = DEFAULT.replace(b"log_exact_counts = false", b"log_exact_counts = true").replace(
        b'    "port",', b'    "port",\n    "prompt_tokens",\n    "completion_tokens",'
    )
    policy = parse_data_policy(opted)
    assert policy.log_exact_counts is True and "prompt_tokens" in policy.allowed_log_fields
    assert policy.digest != load_data_policy().digest  # a client pinning the default refuses it
    # omitted: the safe default
    assert parse_data_policy(DEFAULT.replace(b"log_exact_counts = false", b"")).log_exact_counts is False
    for bad in (
        DEFAULT.replace(b'    "port",', b'    "port",\n    "prompt_tokens",'),  # counts without opt-in
        DEFAULT.replace(b"log_exact_counts = false", b"log_exact_counts = 0"),
        DEFAULT.replace(b"log_exact_counts = false", b'log_exact_counts = "no"'),
    ):
        with pytest.raises(DataPolicyError):
            parse_data_policy(bad)


def test_filter_redacts_free_text_arguments_and_tracebacks() -> None:
    canary = f"CANARY-{secrets.token_hex(8)}"
    logger, out = _capture()
    logger.info("user said %s", canary)
    logger.warning(f"f-string with {canary}")
    try:
        raise RuntimeError(canary)
    except RuntimeError:
        logger.exception("failed")
        log_event(logger, "request.failed", logging.ERROR, request="x1")
    logger.info("stack", stack_info=True)
    text = out.getvalue()
    assert canary not in text
    assert "Traceback" not in text
    assert text.count("record.redacted") == 4
    assert "error_type=RuntimeError" in text


def test_fields_outside_the_policy_are_dropped() -> None:
    logger, out = _capture(frozenset({"event", "status"}))
    log_event(logger, "request.done", status="ok", prompt_tokens=3)
    assert out.getvalue().strip() == "SIMULATED TEE|request.done|status=ok"


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")
def test_harden_process_disables_core_dumps(tmp_path: Path) -> None:
    proc = _run(
        """
        import ctypes, resource
        from veil.enclave.data_policy import harden_process
        report = harden_process()
        libc = ctypes.CDLL(None)
        print(resource.getrlimit(resource.RLIMIT_CORE), libc.prctl(3, 0, 0, 0, 0), report.dumpable)
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["(0,", "0)", "0", "False"]


def test_temp_files_are_confined_to_the_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = _run(
        f"""
        import os, sys, tempfile
        from pathlib import Path
        from veil.enclave.data_policy import confine_temp_files, remove_temp_files
        tmp = confine_temp_files(Path({str(state)!r}))
        fd, name = tempfile.mkstemp()
        os.close(fd)
        print(Path(name).parent == tmp, os.environ["TMPDIR"] == str(tmp), sys.dont_write_bytecode)
        print(str(Path(os.environ["TRITON_CACHE_DIR"]).parent) == str(tmp))
        remove_temp_files(tmp)
        print(tmp.exists(), tmp.name == str(os.getpid()), tmp.parent == Path({str(state)!r}) / "tmp")
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True", "True", "True", "False", "True", "True"]


def test_left_overs_of_dead_servers_are_removed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True
    )
    stale = state / "tmp" / dead.stdout.decode().strip()
    stale.mkdir(parents=True)
    (stale / "left-over").write_text("old request data")
    (state / "tmp" / "not-a-pid").mkdir()
    proc = _run(
        f"""
        from pathlib import Path
        from veil.enclave.data_policy import confine_temp_files
        tmp = confine_temp_files(Path({str(state)!r}))
        print(sorted(p.name for p in tmp.parent.iterdir()) == [tmp.name])
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True"]


def test_uncaught_exceptions_log_their_type_only(tmp_path: Path) -> None:
    canary = f"CANARY-{secrets.token_hex(8)}"
    proc = _run(
        f"""
        import logging, threading
        from veil.enclave.data_policy import configure_logging, install_exception_hooks, load_data_policy
        configure_logging(load_data_policy(), simulated=True)
        install_exception_hooks(logging.getLogger("veil.enclave.server"))
        logging.getLogger("grpc").error("library text %s", {canary!r})
        t = threading.Thread(target=lambda: 1 / 0 if False else (_ for _ in ()).throw(KeyError({canary!r})))
        t.start(); t.join()
        raise ValueError({canary!r})
        """,
        tmp_path,
    )
    assert proc.returncode == 1
    assert canary not in proc.stderr + proc.stdout
    assert "[SIMULATED TEE]" in proc.stderr
    assert "error_type=ValueError" in proc.stderr
    assert "error_type=KeyError" in proc.stderr
    assert "record.redacted" in proc.stderr


def test_serve_refuses_a_policy_it_cannot_keep(tmp_path: Path) -> None:
    bad = tmp_path / "weak.toml"
    bad.write_bytes(DEFAULT.replace(b'retain = "none"', b'retain = "7d"'))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "veil",
            "serve",
            "--state-dir",
            str(tmp_path / "s"),
            "--data-policy",
            str(bad),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "DataPolicyError" in proc.stdout and "retain" in proc.stdout
    assert not (tmp_path / "s").exists()  # refused before anything was written
