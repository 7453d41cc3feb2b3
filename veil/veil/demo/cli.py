"""``veil demo``: the main job end to end, on this machine.

It starts ``veil serve --tee simulated`` on a free loopback port in a subprocess
(with a temporary state directory), routes the client's traffic through an
in-process TCP relay (:class:`veil.demo.relay.Relay`, recording only) that counts
and records every byte (the untrusted host's view), attests the enclave and prints
the verdict, streams the answer to a sample question, then shows how many bytes
crossed the wire and checks that none of the question's or the answer's text
appears in them. Exit status 0 on success.

``veil demo --in-process`` runs the channel alone, in one process, without the
model or the server: it seals a request to a fresh enclave key, opens it, streams
an encrypted answer back and checks the wire the same way.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import secrets
import sys
import tempfile
import time
from pathlib import Path

from veil.attestation.binding import Claims, gpu_nonce, report_data
from veil.attestation.channel.hpke import HpkeSuite, PrivateKey, open_request, seal_request
from veil.attestation.channel.stream import StreamDecryptor, StreamEncryptor
from veil.proto.v1 import generate_pb2

QUESTION = "In one sentence, what is a trusted execution environment?"
SYSTEM = "You are a concise assistant."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``veil demo``."""
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="only the channel, in one process (no server, no model)",
    )
    parser.add_argument("--question", default=QUESTION, help="what to ask the model")
    parser.add_argument("--max-tokens", type=int, default=48, help="most tokens to generate (default 48)")
    parser.add_argument(
        "--suite",
        choices=[s.name for s in HpkeSuite],
        default=HpkeSuite.MLKEM768_X25519.name,
        help="HPKE suite of the enclave key in --in-process mode (default: the post-quantum hybrid)",
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``veil demo``."""
    if args.in_process:
        return _run_in_process(args)
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("veil.enclave.engine") is None:
        print("veil demo: no enclave engine here (client-only install?): in-process channel demo")
        return _run_in_process(args)
    return _run_server(args)


def _plaintext_in(wire: bytes, texts: list[str]) -> list[str]:
    """Which of ``texts`` (or any 12-character piece of them) occur in ``wire``, in UTF-8 or UTF-16."""
    found = []
    for text in texts:
        pieces = {text[i : i + 12] for i in range(0, max(1, len(text) - 11), 4)} | {text}
        for piece in pieces:
            if len(piece.strip()) < 6:
                continue
            if piece.encode() in wire or piece.encode("utf-16-le") in wire:
                found.append(piece)
                break
    return found


def _run_server(args: argparse.Namespace) -> int:
    from veil.client import AttestationError, ChannelError, Client, Policy, ServerError
    from veil.demo.relay import Relay
    from veil.enclave.local_server import LocalServer, ServerStartError

    print("Veil demo: attested, end-to-end encrypted chat with the embedded model")
    with tempfile.TemporaryDirectory(prefix="veil-demo-") as tmp:
        server = LocalServer(Path(tmp) / "state", log_dir=Path(tmp) / "logs")
        print("  starting           veil serve --tee simulated (loopback, temporary state dir) …", flush=True)
        t0 = time.monotonic()
        try:
            server.start()
        except ServerStartError as exc:
            print(f"veil demo: the server did not start: {exc}", file=sys.stderr)
            return 1
        tap = Relay((server.host, server.port), decode=False).start()
        try:
            print(f"  server             {server.address}, healthy after {time.monotonic() - t0:.1f} s")
            print(f"  relay              {tap.address} (plays the untrusted host: records every byte)")
            print(f"  simulation root    {server.root_pem}")
            policy = Policy.simulated(server.root_pem)
            with Client(tap.address, policy=policy) as client:
                t1 = time.monotonic()
                verdict = client.attest()
                print(f"\nAttestation ({(time.monotonic() - t1) * 1000:.0f} ms, simulated TEE):")
                print("  " + verdict.table().replace("\n", "\n  "))
                print(f"\nQuestion: {args.question}\nAnswer:   ", end="", flush=True)
                parts: list[str] = []
                stream = client.chat.completions.create(
                    messages=[
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": args.question},
                    ],
                    max_tokens=args.max_tokens,
                    temperature=0.0,
                    stream=True,
                )
                with stream:
                    for chunk in stream:
                        delta = chunk.choices[0].delta.content or ""
                        parts.append(delta)
                        print(delta, end="", flush=True)
                usage = stream.usage
                print()
        except (AttestationError, ChannelError, ServerError) as exc:
            print(f"veil demo: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        finally:
            time.sleep(0.05)
            tap.close()
            status = server.stop()
        answer = "".join(parts)
        wire = tap.all_bytes()
        leaked = _plaintext_in(wire, [args.question, answer])
        tokens = (
            f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens" if usage else "?"
        )
        print(f"\n  finish             {stream.finish_reason} ({tokens})")
        print(f"  wire bytes         {len(tap.sent)} B client->server, {len(tap.received)} B server->client")
        verdict_line = f"FOUND: {leaked!r}" if leaked else "none (question and answer searched)"
        print(f"  plaintext on wire  {verdict_line}")
        print(f"  server             stopped (exit status {status})")
        ok = bool(answer.strip()) and not leaked
        print("demo ok" if ok else "demo FAILED")
        return 0 if ok else 1


def _run_in_process(args: argparse.Namespace) -> int:
    suite = HpkeSuite[args.suite]
    question = "What is a trusted execution environment?"
    answer = ["A trusted execution environment ", "is hardware-isolated memory ", "the host cannot read."]
    wire: list[bytes] = []

    enclave_key = PrivateKey.generate(suite)
    public = enclave_key.public_key()
    claims = Claims(
        hpke_suite=suite.value,
        enclave_public_key=public.to_bytes(),
        model_digest=hashlib.sha256(b"demo model").digest(),
        engine_version="demo",
        data_policy_digest=hashlib.sha256(b"demo policy").digest(),
        server_build_digest=hashlib.sha256(b"demo build").digest(),
        simulated=True,
    )
    nonce = secrets.token_bytes(32)
    print("Veil demo: channel round trip in one process (no model, no server)")
    print(f"  enclave key        {suite.value}, key_id {public.key_id.hex()}")
    print(f"  gpu nonce          {gpu_nonce(nonce, public.to_bytes()).hex()[:32]}…")
    print(f"  report_data        {report_data(nonce, claims.canonical_bytes()).hex()[:32]}…")

    response_key, request_id = secrets.token_bytes(32), secrets.token_bytes(16)
    request = generate_pb2.GenerateRequest(
        request_id=request_id,
        response_key=response_key,
        chat=generate_pb2.ChatMessages(messages=[generate_pb2.ChatMessage(role="user", content=question)]),
        params=generate_pb2.SamplingParams(max_tokens=32),
    )
    sealed = seal_request(request, public)
    wire.append(sealed.SerializeToString())
    print(
        f"  request            {len(question)} B of prompt -> {len(sealed.ciphertext)} B of HPKE ciphertext"
    )

    opened = open_request(sealed, enclave_key)
    encryptor = StreamEncryptor(opened.response_key, opened.request_id)
    wire.append(encryptor.header)
    for i, delta in enumerate(answer):
        last = i == len(answer) - 1
        chunk = generate_pb2.ResponseChunk(text_delta=delta)
        if last:
            chunk.finish_reason = generate_pb2.FINISH_REASON_STOP
            chunk.usage.prompt_tokens, chunk.usage.completion_tokens = 9, len(answer)
        wire.append(encryptor.encrypt(chunk, final=last))

    decryptor = StreamDecryptor(response_key, request_id, wire[1])
    text = "".join(decryptor.decrypt(payload)[0].text_delta for payload in wire[2:])
    decryptor.close()
    print(f"  response           {len(wire) - 2} encrypted chunks of {[len(p) for p in wire[2:]]} B")
    print(f"  decrypted answer   {text!r}")

    blob = b"".join(wire)
    leaked = [s for s in [question, *answer] if s.encode() in blob]
    print(f"  wire bytes         {len(blob)} B in all; plaintext in them: {'YES' if leaked else 'none'}")
    ok = text == "".join(answer) and not leaked
    print("demo ok" if ok else "demo FAILED")
    return 0 if ok else 1
