"""``veil chat TARGET "prompt"``: one attested, end-to-end encrypted chat turn from the shell.

The answer streams to stdout; what was verified goes to stderr (or, with
``--json``, everything goes to stdout as one JSON object). Exit status: 0 on
success, 2 bad arguments or policy, 3 attestation failed, 4 channel failure
(tampering, truncation), 5 server error or request rejected — each with a
one-line reason on stderr and no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from veil.attestation.policy import Policy
    from veil.client import Client

__all__ = ["add_arguments", "run"]

EXIT_USAGE, EXIT_ATTESTATION, EXIT_CHANNEL, EXIT_SERVER = 2, 3, 4, 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``veil chat``."""
    parser.add_argument("target", help="enclave address, host:port (or grpcs://host:port)")
    parser.add_argument("prompt", help="the user message ('-' reads it from stdin)")
    trust = parser.add_mutually_exclusive_group()
    trust.add_argument(
        "--policy", metavar="FILE", help="appraisal policy (TOML); default: hardware TEEs only"
    )
    trust.add_argument(
        "--trust-simulated",
        metavar="PEM",
        help="trust ONLY the software-simulated TEE whose root is PEM (development; proves nothing)",
    )
    parser.add_argument("--system", default=None, help="a system message to send first")
    parser.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    parser.add_argument(
        "--json-schema",
        metavar="FILE",
        help="constrain the answer to JSON valid under this JSON Schema (a .json file); an answer cut "
        "by --max-tokens (finish=length) may be incomplete JSON",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per call (default 120)")
    parser.add_argument("--save-evidence", metavar="FILE", help="write the raw evidence for later audit")
    parser.add_argument("--json", action="store_true", help="print one JSON object (answer + verdict)")


def _policy(args: argparse.Namespace) -> Policy:
    from veil.attestation.policy import Policy

    if args.trust_simulated:
        return Policy.simulated(args.trust_simulated)
    if args.policy:
        return Policy.from_file(args.policy)
    return Policy()


def _summary(client: Client) -> str:
    verdict = client.attestation
    claims = client.claims
    if verdict is None or claims is None:
        return "veil: not attested"
    counts = {s: sum(1 for c in verdict.checks if c.status.value == s) for s in ("pass", "fail", "skip")}
    platform = next((c.detail.split()[0] for c in verdict.checks if c.name == "policy.platform"), "?")
    lines = [
        f"veil: attested {platform} enclave: {counts['pass']} checks passed, {counts['skip']} skipped, "
        f"{counts['fail']} failed",
        f"veil:   enclave key  {claims.hpke_suite}",
        f"veil:   model        sha256:{claims.model_digest.hex()}",
        f"veil:   data policy  sha256:{claims.data_policy_digest.hex()}",
        f"veil:   build        sha256:{claims.server_build_digest.hex()}",
    ]
    if claims.simulated:
        lines.append("veil:   WARNING: SIMULATED TEE — this proves nothing about hardware")
    return "\n".join(lines)


def _response_format(path: str | None) -> dict[str, Any] | None:
    """``--json-schema FILE`` as an OpenAI ``response_format`` (named after the file)."""
    if path is None:
        return None
    from pathlib import Path

    from veil.client.errors import ConfigurationError

    text = Path(path).read_text(encoding="utf-8")
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise ConfigurationError(f"--json-schema {path}: not valid JSON: {exc}") from None
    name = "".join(c if c.isalnum() or c in "_-" else "_" for c in Path(path).stem)[:64]
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


def _chat(args: argparse.Namespace) -> int:
    from veil.client import Client

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": prompt})
    params: dict[str, Any] = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "response_format": _response_format(args.json_schema),
    }
    with Client(args.target, policy=_policy(args), timeout=args.timeout) as client:
        client.attest()
        if args.save_evidence:
            client.save_evidence(args.save_evidence)
        if args.json:
            reply = client.chat.completions.create(messages=messages, **params)
            verdict = client.attestation
            out = reply.to_dict()
            out["attestation"] = verdict.to_json() if verdict else None
            print(json.dumps(out, indent=2))
            return 0
        print(_summary(client), file=sys.stderr, flush=True)
        stream = client.chat.completions.create(messages=messages, stream=True, **params)
        with stream:
            for chunk in stream:
                content = chunk.choices[0].delta.content
                if content:
                    sys.stdout.write(content)
                    sys.stdout.flush()
        sys.stdout.write("\n")
        usage = stream.usage
        if usage is not None:
            print(
                f"veil: finish={stream.finish_reason} prompt_tokens={usage.prompt_tokens} "
                f"completion_tokens={usage.completion_tokens}",
                file=sys.stderr,
            )
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point of ``veil chat``; returns the exit status."""
    from veil.attestation.errors import VeilAttestationError
    from veil.client.errors import (
        AttestationError,
        ChannelError,
        ConfigurationError,
        ServerError,
    )

    def fail(code: int, what: str, exc: BaseException) -> int:
        reason = " ".join(str(exc).split())
        print(f"veil chat: {what}: {reason}", file=sys.stderr)
        return code

    try:
        return _chat(args)
    except (ConfigurationError, VeilAttestationError, OSError) as exc:
        return fail(EXIT_USAGE, "configuration error", exc)
    except AttestationError as exc:
        return fail(EXIT_ATTESTATION, "attestation failed", exc)
    except ChannelError as exc:
        return fail(EXIT_CHANNEL, "encrypted channel failed", exc)
    except ServerError as exc:
        return fail(EXIT_SERVER, "server error", exc)
    except KeyboardInterrupt:
        print("veil chat: interrupted", file=sys.stderr)
        return 130
