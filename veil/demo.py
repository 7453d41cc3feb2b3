"""``veil demo``: the main job end to end, on this machine.

Until the enclave server lands, the demo drives the channel both ways in one
process: it makes an enclave key, binds it into claims and ``report_data``,
seals a chat request to it (HPKE, padded), opens it on the enclave side,
streams an encrypted answer back (secretstream) and decrypts it, then checks
that no plaintext byte sequence of the prompt or answer appears in what would
have crossed the wire.
"""

from __future__ import annotations

import argparse
import hashlib
import secrets

from veil.attestation.binding import Claims, gpu_nonce, report_data
from veil.attestation.channel import HpkeSuite, PrivateKey, open_request, seal_request
from veil.attestation.stream import StreamDecryptor, StreamEncryptor
from veil.proto.v1 import generate_pb2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--suite",
        choices=[s.name for s in HpkeSuite],
        default=HpkeSuite.MLKEM768_X25519.name,
        help="HPKE suite of the enclave key (default: the post-quantum hybrid)",
    )


def run(args: argparse.Namespace) -> int:
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
    print("Veil demo: channel round trip in one process (enclave server: see issue #4)")
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
