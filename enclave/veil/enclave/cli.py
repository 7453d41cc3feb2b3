"""``veil serve``: flags and entry point (heavy imports happen inside :func:`run`)."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="GGUF or HF checkpoint (default: the embedded model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    parser.add_argument("--port", type=int, default=0, help="port (default 0: pick a free one and print it)")
    parser.add_argument(
        "--tee",
        choices=["auto", "snp", "tdx", "azure", "simulated"],
        default="simulated",
        help="attestation provider: auto (probe configfs-tsm, /dev/sev-guest, the Azure vTPM), snp "
        "(configfs-tsm or /dev/sev-guest), tdx (configfs-tsm), azure (vTPM HCL report, SNP or TDX), "
        "simulated (software TEE for development; default). Hardware choices probe before the model "
        "loads and exit non-zero, naming every interface probed, when none is usable",
    )
    parser.add_argument(
        "--gpus",
        default="auto",
        metavar="auto|none|N",
        help="NVIDIA GPUs in CC mode via NVML: auto (use them when present, CPU-only without a driver), "
        "none, or exactly N (refuse to start otherwise); the simulated TEE always reports one",
    )
    parser.add_argument(
        "--state-dir",
        default=None,
        help="simulation chain + temp files (default: $VEIL_STATE_DIR or ~/.local/state/veil)",
    )
    parser.add_argument("--data-policy", default=None, metavar="FILE", help="data-handling policy TOML")
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda", "auto"],
        default="auto",
        help="where the model runs: cpu (Veil's CPU kernels), cuda (Triton kernels + CUDA graphs on a GPU), "
        "auto (default: cuda when torch sees a GPU, else cpu); printed at start-up",
    )
    parser.add_argument("--max-batch", type=int, default=None, help="most sequences decoded together")
    parser.add_argument("--kv-cache-mb", type=int, default=None, help="KV cache size in MiB")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds in-flight streams get on SIGTERM")
    parser.add_argument(
        "--frame-interval-ms",
        type=_positive_ms,
        default=75.0,
        help="streamed answers leave as one equal-size frame per interval (default 75 ms); "
        "shorter: less latency, more bandwidth; the wire shows elapsed time in intervals",
    )
    parser.add_argument(
        "--evidence-rate",
        type=float,
        default=50.0,
        help="GetEvidence calls per second, all peers together (burst: twice that)",
    )
    limits = parser.add_argument_group("limits per peer (a peer is a remote address, IPv6 per /64)")
    limits.add_argument(
        "--peer-evidence-rate",
        type=float,
        default=10.0,
        help="GetEvidence calls per second per peer (burst: twice that, at least 1)",
    )
    limits.add_argument(
        "--peer-generate-rate",
        type=float,
        default=20.0,
        help="Generate calls per second per peer (burst: --peer-generate-burst)",
    )
    limits.add_argument("--peer-generate-burst", type=int, default=64, help="Generate burst per peer")
    limits.add_argument(
        "--max-calls-per-peer", type=int, default=128, help="calls one peer may hold at once, any method"
    )
    limits.add_argument(
        "--max-streams-per-connection",
        type=int,
        default=64,
        help="HTTP/2 concurrent streams per connection",
    )
    limits.add_argument(
        "--request-timeout",
        type=float,
        default=10.0,
        help="seconds a call has to send its request message (half-open calls end after this)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics (the same aggregates as MetricsService) on this port; 0 picks one",
    )
    parser.add_argument(
        "--metrics-host", default="127.0.0.1", help="address for --metrics-port (default: loopback)"
    )
    parser.add_argument(
        "--metrics-period",
        type=_period,
        default=10.0,
        help="published metrics are a snapshot refreshed at most this often, in seconds (>= 1; default 10)",
    )


def _period(text: str) -> float:
    value = float(text)
    if not value >= 1.0:
        raise argparse.ArgumentTypeError("must be at least 1 second")
    return value


def _positive_ms(text: str) -> float:
    value = float(text)
    if not 1.0 <= value <= 10_000.0:
        raise argparse.ArgumentTypeError("must be between 1 and 10000 ms")
    return value


def run(args: argparse.Namespace) -> int:
    import sys

    sys.dont_write_bytecode = True  # before the heavy imports: nothing written outside the state dir
    import asyncio

    from veil.enclave.errors import EnclaveError
    from veil.enclave.server import serve

    try:
        return asyncio.run(serve(args))
    except EnclaveError as exc:
        print(f"veil serve: {type(exc).__name__}: {exc}", flush=True)
        return 1
    except OSError as exc:
        print(f"veil serve: cannot start: {exc.strerror or type(exc).__name__}", flush=True)
        return 1
