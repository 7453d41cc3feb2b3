"""The proxy's ASGI application (Starlette): OpenAI routes over one attested :class:`AsyncClient`.

The client (a pool when given several targets) is made inside the server's event loop, at
start-up, and closed at shut-down. Handlers translate only: :mod:`._params` checks the request,
the SDK does the attested, encrypted round trip, :mod:`._openai` shapes the answer. A request
is logged as method, path, status and duration; never a body, a prompt or a completion.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from veil.client._async_client import AsyncClient, AsyncStream, AsyncTextStream
from veil.client._types import ChatCompletion, Completion
from veil.client.errors import VeilClientError
from veil.client.proxy import _openai as oa
from veil.client.proxy._params import (
    CHAT_PARAMS,
    COMPLETION_PARAMS,
    OpenAIRequest,
    ProxyRequestError,
    translate,
)

__all__ = ["MAX_BODY_BYTES", "create_app"]

log = logging.getLogger("veil.proxy")
MAX_BODY_BYTES = 4 * 1024 * 1024  # the enclave refuses larger requests anyway
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
Handler = Callable[[Request], Awaitable[Response]]


def _error(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def _refusal(exc: ProxyRequestError) -> JSONResponse:
    return _error(exc.status, oa.error_body(exc.message, type=exc.type, param=exc.param, code=exc.code))


def _sdk_error(exc: VeilClientError) -> JSONResponse:
    status, body, headers = oa.error_response(exc)
    return _error(status, body, headers)


async def _json_body(request: Request) -> object:
    size = 0
    parts = []
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise ProxyRequestError(f"request body over {MAX_BODY_BYTES} bytes", status=413)
        parts.append(part)
    try:
        return json.loads(b"".join(parts))
    except (ValueError, UnicodeDecodeError):
        raise ProxyRequestError("the request body is not valid JSON") from None


class Proxy:
    """The routes, around one client made by ``make_client`` at start-up."""

    def __init__(self, make_client: Callable[[], AsyncClient], api_key: str | None) -> None:
        self._make_client = make_client
        self._api_key = api_key.encode() if api_key else None
        self._client: AsyncClient | None = None
        self._started = int(time.time())

    @property
    def client(self) -> AsyncClient:
        if self._client is None:  # pragma: no cover - routes run only inside the lifespan
            raise RuntimeError("the proxy has not started")
        return self._client

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._client = self._make_client()
        try:
            yield
        finally:
            await self._client.close()

    def guarded(self, handler: Handler, *, open_route: bool = False) -> Handler:
        """``handler`` behind the API key check and the request log line."""

        async def run(request: Request) -> Response:
            start = time.monotonic()
            response: Response
            try:
                if not open_route and not self._authorized(request):
                    response = _error(
                        401,
                        oa.error_body(
                            "Incorrect API key provided (send 'Authorization: Bearer KEY')",
                            type="invalid_request_error",
                            code="invalid_api_key",
                        ),
                    )
                else:
                    response = await handler(request)
            except ProxyRequestError as exc:
                response = _refusal(exc)
            except VeilClientError as exc:
                response = _sdk_error(exc)
            log.info(
                "%s %s %d %.0fms", request.method, request.url.path, response.status_code,
                (time.monotonic() - start) * 1000,
            )  # fmt: skip
            return response

        return run

    def _authorized(self, request: Request) -> bool:
        if self._api_key is None:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._api_key)

    # ---- routes

    async def health(self, request: Request) -> Response:
        states = [r.state for r in self.client.replicas]
        usable = sum(s in ("ready", "unattested", "recovering") for s in states)
        body = {"status": "ok" if usable else "unavailable", "replicas": len(states), "usable": usable}
        return JSONResponse(body, status_code=200 if usable else 503)

    async def attestation(self, request: Request) -> Response:
        replicas = await self.client.ensure_attested()
        return JSONResponse({"object": "list", "data": [r.to_dict() for r in replicas]})

    async def _models(self) -> list[dict[str, Any]]:
        """The attested model (one per release: every replica must show the same)."""
        client = self.client
        if not any(r.model for r in client.replicas):
            await client.attest()  # raises the attestation failure (502) when no replica is good
        seen: dict[str, dict[str, Any]] = {}
        for replica in client.replicas:
            if replica.model and replica.model not in seen and replica.identity:
                fields = replica.identity.fields()
                seen[replica.model] = {
                    "id": replica.model,
                    "object": "model",
                    "created": self._started,
                    "owned_by": "veil",
                    "veil": {
                        "model_digest": fields.get("model_digest"),
                        "platform": fields.get("platform"),
                        "server_build_digest": fields.get("server_build_digest"),
                        "data_policy_digest": fields.get("data_policy_digest"),
                        "attested": True,
                    },
                }
        return list(seen.values())

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": await self._models()})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        for entry in await self._models():
            if entry["id"] == name:
                return JSONResponse(entry)
        raise _no_such_model(name)

    async def _check_model(self, req: OpenAIRequest) -> None:
        if req.model is None:
            return
        known = {entry["id"] for entry in await self._models()}
        if req.model not in known:
            raise _no_such_model(req.model)

    async def chat_completions(self, request: Request) -> Response:
        req = translate(await _json_body(request), CHAT_PARAMS)
        await self._check_model(req)
        if not req.stream:
            reply: ChatCompletion = await self.client.chat.completions.create(**req.kwargs)
            return JSONResponse(oa.chat_completion(reply))
        stream = await self.client.chat.completions.create(**req.kwargs, stream=True)
        events = _events(
            stream, req.include_usage, lambda c: oa.chat_chunk(c, include_usage=req.include_usage),
            "chat.completion.chunk",
        )  # fmt: skip
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)

    async def completions(self, request: Request) -> Response:
        req = translate(await _json_body(request), COMPLETION_PARAMS)
        req.kwargs.setdefault("max_tokens", 16)  # the OpenAI API's default for this endpoint
        await self._check_model(req)
        if not req.stream:
            reply = cast(Completion, await self.client.completions.create(**req.kwargs))
            return JSONResponse(oa.text_completion(reply))
        stream = cast(AsyncTextStream, await self.client.completions.create(**req.kwargs, stream=True))
        events = _events(
            stream, req.include_usage, lambda p: oa.text_chunk(p, include_usage=req.include_usage),
            "text_completion",
        )  # fmt: skip
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


def _no_such_model(name: str) -> ProxyRequestError:
    return ProxyRequestError(
        f"The model `{name}` does not exist (this proxy serves the attested model listed by GET /v1/models)",
        param="model",
        status=404,
        code="model_not_found",
    )


async def _events(
    stream: AsyncStream | AsyncTextStream,
    include_usage: bool,
    shape: Callable[[Any], dict[str, Any]],
    kind: str,
) -> AsyncIterator[bytes]:
    """SSE for one stream: a ``data:`` event per piece, the usage chunk if asked, ``[DONE]``.

    A failure after the first byte cannot change the HTTP status: it ends the stream with
    ``event: error`` and the error object instead of ``[DONE]``.
    """
    last: dict[str, Any] = {}
    try:
        async for piece in stream:
            last = shape(piece)
            yield oa.sse(last)
        if include_usage:
            yield oa.sse(
                oa.usage_chunk(
                    id=last.get("id", ""), created=last.get("created", 0), model=last.get("model", ""),
                    usage=stream.usage, object=kind,
                )
            )  # fmt: skip
        yield oa.DONE
    except VeilClientError as exc:
        yield oa.error_event(oa.error_response(exc)[1])
    finally:
        await stream.close()


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    message = exc.detail if isinstance(exc, HTTPException) else "internal error"
    kind = "invalid_request_error" if status < 500 else "server_error"
    return _error(status, oa.error_body(str(message), type=kind))


def create_app(make_client: Callable[[], AsyncClient], *, api_key: str | None = None) -> Starlette:
    """The proxy's ASGI app; ``make_client`` is called once, inside the server's event loop."""
    proxy = Proxy(make_client, api_key)
    g = proxy.guarded
    routes = [
        Route("/health", g(proxy.health, open_route=True), methods=["GET"]),
        Route("/v1/models", g(proxy.models), methods=["GET"]),
        Route("/v1/models/{model:path}", g(proxy.model), methods=["GET"]),
        Route("/v1/chat/completions", g(proxy.chat_completions), methods=["POST"]),
        Route("/v1/completions", g(proxy.completions), methods=["POST"]),
        Route("/veil/attestation", g(proxy.attestation), methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=proxy.lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _http_error},
    )
