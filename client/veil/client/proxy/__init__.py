"""``veil proxy``: a local OpenAI-compatible HTTP server over the attested, encrypted channel.

An application that speaks the OpenAI REST API points ``base_url`` at the proxy; every request
goes through :class:`veil.client.AsyncClient` (a pool when given several targets), so the
prompt leaves this machine only sealed to an attested enclave key. Routes:
``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON, or Server-Sent Events with
``data: [DONE]`` last), ``GET /v1/models`` (the attested model and its digests),
``GET /health`` and ``GET /veil/attestation`` (every replica's verdict).

Why Starlette + Uvicorn rather than aiohttp: the SDK's async client already runs on asyncio, and
Starlette is a small, typed ASGI toolkit whose ``StreamingResponse`` cancels the generator
(and with it the gRPC call) when the HTTP client goes away; it is the stack of vLLM's
OpenAI-compatible server (FastAPI is built on it), so clients see the same HTTP behaviour. Uvicorn
is the reference ASGI server (h11, graceful shutdown on SIGTERM). Both come with the ``proxy``
extra and are imported only by ``veil proxy``: ``import veil.client`` never loads them.

Modules: ``_params`` (the table of OpenAI parameters: forwarded, handled here, or refused),
``_openai`` (response shapes, SSE framing, error objects and their HTTP statuses), ``_app``
(the Starlette routes) and ``cli`` (the command).
"""
