"""``veil proxy TARGET [TARGET ...] --port P``: serve the OpenAI REST API on this machine over Veil.

Binds 127.0.0.1 by default; any other ``--host`` needs an API key (``--api-key`` or the
``VEIL_PROXY_API_KEY`` environment variable, which keeps it out of the process list), checked
as ``Authorization: Bearer KEY`` on every route but ``/health``. Once listening it prints
``veil proxy: listening on http://HOST:PORT`` on stdout (with ``--port 0``, the port chosen).
SIGINT / SIGTERM stop it gracefully (open streams get 10 s). Exit status 2: bad arguments or policy.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from veil.attestation.policy import Policy

__all__ = ["add_arguments", "run"]

EXIT_USAGE = 2
API_KEY_ENV = "VEIL_PROXY_API_KEY"


class _UsageError(Exception):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``veil proxy``."""
    parser.add_argument(
        "targets", nargs="+", metavar="TARGET", help="enclave replica address(es), host:port (or grpcs://)"
    )
    parser.add_argument("--port", type=int, required=True, help="HTTP port to listen on (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback)")
    trust = parser.add_mutually_exclusive_group()
    trust.add_argument(
        "--policy", metavar="FILE", help="appraisal policy (TOML); default: hardware TEEs only"
    )
    trust.add_argument(
        "--release", metavar="FILE", help="a signed release manifest to pin (needs --publisher-key)"
    )
    trust.add_argument(
        "--trust-simulated",
        metavar="PEM",
        help="trust ONLY the software-simulated TEE whose root is PEM (development; proves nothing)",
    )
    parser.add_argument("--publisher-key", metavar="FILE", help="the release publisher's Ed25519 public key")
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; needed off loopback)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per enclave call (default 120)")


def _policy(args: argparse.Namespace) -> Policy:
    from pathlib import Path

    from veil.attestation.policy import Policy

    if args.publisher_key and not args.release:
        raise _UsageError("--publisher-key goes with --release FILE")
    if args.release:
        if not args.publisher_key:
            raise _UsageError("--release needs --publisher-key FILE (the key the manifest must be signed by)")
        return Policy.from_release(
            Path(args.release).read_bytes(), publisher_key=Path(args.publisher_key).read_bytes()
        )
    if args.trust_simulated:
        return Policy.simulated(args.trust_simulated)
    if args.policy:
        return Policy.from_file(args.policy)
    return Policy()


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise _UsageError("veil proxy needs the proxy extra: pip install 'veil[proxy]'") from None
    from veil.client import AsyncClient
    from veil.client._base import replica_targets
    from veil.client._transport import channel_target
    from veil.client.proxy._app import create_app

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host) and not api_key:
        raise _UsageError(
            f"refusing to listen on {args.host} (not loopback) without an API key: "
            f"give --api-key or set {API_KEY_ENV}"
        )
    if not 0 <= args.port < 65536:
        raise _UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.timeout <= 0:
        raise _UsageError("--timeout must be positive")
    policy = _policy(args)
    targets = list(args.targets)
    replica_targets(targets, None, channel_target)  # refuse bad targets now, before listening

    def make_client() -> AsyncClient:
        return AsyncClient(targets, policy=policy, timeout=args.timeout)

    app = create_app(make_client, api_key=api_key)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print(f"veil proxy: {len(targets)} replica(s): {', '.join(targets)}", file=sys.stderr)
    print(f"veil proxy: listening on http://{shown}:{port}", flush=True)
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=10
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point of ``veil proxy``; returns the exit status."""
    from veil.attestation.errors import VeilAttestationError
    from veil.client.errors import ConfigurationError

    try:
        return _serve(args)
    except (_UsageError, ConfigurationError, VeilAttestationError, OSError) as exc:
        reason = " ".join(str(exc).split())
        print(f"veil proxy: {reason}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 0
