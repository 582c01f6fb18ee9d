"""Buyer side of the stub: an OpenAI-compatible HTTP API (aiohttp).

Endpoints:

* ``POST /v1/chat/completions``: validated with
  :func:`provider.openai.request.decode_chat_request` (400 naming the field),
  routed by ``model`` to the least-loaded ready provider of that model (404
  listing the served models when none serves it; 503 when all are busy),
  relayed back. Streaming responses are ``text/event-stream``
  written through as the provider produced them; the status line is only
  committed once known (first chunk, or first keepalive comment).
* ``GET /v1/models``: models of connected providers.
* ``GET /v1/status``: the pool, drops and counters as JSON.
* ``GET /v1/events``: pool events as SSE, starting with a ``snapshot``.
* ``GET /v1/autotune-candidates`` and ``GET /v1/autotune-candidates.sig``: the
  signed autotune catalog feed (exact bytes) and its detached signature
  (404 when the stub has no ``catalog_models``).
* ``POST /admin/providers/{id}/drain`` and ``POST /admin/providers/{id}/drop``.

Errors are OpenAI-style JSON (:class:`provider.openai.response.ErrorResponse`), or,
once a stream is committed, an SSE ``data: {"error": ...}`` event followed by
``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from provider.openai.request import MAX_BODY_BYTES, BadRequest, decode_chat_request
from provider.openai.response import SSE_DONE, ErrorBody, ErrorResponse, encode

from .catalog import Catalog
from .config import StubConfig
from .endpoint import WebSocketSide
from .events import EventBus
from .frames import ResponseChunk, ResponseEnd
from .pool import Pool
from .relay import Flight, Gone, NoProviderAvailable, Relay, SettlementRequired

logger = logging.getLogger(__name__)

KEEPALIVE = b": keepalive\n\n"

#: Transport and socket send buffer of a ``/v1/events`` subscriber (bytes).
EVENTS_BUFFER_BYTES = 16 * 1024

#: HTTP status, error type and code for an end frame that is not ``complete``.
END_ERRORS: dict[str, tuple[int, str, str]] = {
    "error_context_exceeded": (400, "invalid_request_error", "context_length_exceeded"),
    "error_queue_full": (503, "server_error", "queue_full"),
    "error_model_not_loaded": (503, "server_error", "model_not_loaded"),
    "error_internal": (500, "server_error", "internal_error"),
    "provider_timeout": (504, "server_error", "provider_timeout"),
    "cancelled": (503, "server_error", "cancelled"),
    # The output did not meet response_format (the coordinator answers 502 with the text).
    "malformed_json_response": (502, "server_error", "malformed_json_response"),
    "json_schema_validation_failed": (502, "server_error", "json_schema_validation_failed"),
}

#: HTTP status for a request that ended without an end frame (:class:`Gone`).
GONE_STATUS: dict[str, int] = {
    "provider_dropped": 502,
    "probe_failed": 502,
    "cancel_unanswered": 504,
    "stub_shutdown": 503,
    "tier2_session_closed": 502,
    "tier2_rekey_failed": 502,
    "provider_fenced": 502,
}

_PATH_RE = re.compile(r"at `\$\.?([^`]*)`")
_MISSING_RE = re.compile(r"missing required field `([^`]+)`")


def error_param(message: str) -> str | None:
    """The field a msgspec validation message is about, e.g. ``messages[0].role``."""
    parts = []
    path = _PATH_RE.search(message)
    if path and path.group(1):
        parts.append(path.group(1))
    missing = _MISSING_RE.search(message)
    if missing:
        parts.append(missing.group(1))
    return ".".join(parts) or None


def error_body(
    message: str, type_: str, *, code: str | None = None, param: str | None = None
) -> bytes:
    return encode(
        ErrorResponse(error=ErrorBody(message=message, type=type_, param=param, code=code))
    )


def error_response(
    status: int,
    message: str,
    type_: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An OpenAI-style JSON error response."""
    return web.Response(
        status=status,
        body=error_body(message, type_, code=code, param=param),
        content_type="application/json",
        headers=headers,
    )


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=msgspec.json.encode(data), content_type="application/json"
    )


class _Relay:
    """Relays one flight to one buyer response."""

    def __init__(self, api: BuyerAPI, request: web.Request, flight: Flight) -> None:
        self.api = api
        self.request = request
        self.flight = flight
        self.response: web.StreamResponse | None = None
        self.parts: list[str] = []
        self.at_boundary = True
        self.done_seen = False

    @property
    def rid(self) -> str:
        return self.flight.request_id

    async def run(self) -> web.StreamResponse:
        config = self.api.config
        flight = self.flight
        start = time.monotonic()
        deadline = start + config.request_timeout_s
        keepalive = config.keepalive_s if flight.stream else None
        next_keepalive = start + keepalive if keepalive is not None else float("inf")
        getter: asyncio.Future[Any] | None = None
        try:
            while True:
                if getter is None:
                    # One pending get() reused across timeouts: cancelling a
                    # get() that just completed could lose a frame.
                    getter = asyncio.ensure_future(flight.queue.get())
                wake = min(deadline, next_keepalive)
                done, _ = await asyncio.wait({getter}, timeout=max(0.0, wake - time.monotonic()))
                now = time.monotonic()
                if not done:
                    if now >= deadline:
                        self.api.relay.cancel(self.rid, "timeout")
                        return await self._fail(
                            504,
                            f"request timed out after {config.request_timeout_s}s",
                            "server_error",
                            "timeout",
                        )
                    assert keepalive is not None
                    # Wall-clock keepalives, whatever the provider is doing;
                    # the first one commits 200 and the SSE headers.
                    response = await self._commit()
                    if self.at_boundary:
                        await response.write(KEEPALIVE)
                    next_keepalive = now + keepalive
                    continue
                item = getter.result()
                getter = None
                if isinstance(item, ResponseChunk):
                    await self._chunk(item)
                elif isinstance(item, Gone):
                    return await self._gone(item)
                else:
                    assert isinstance(item, ResponseEnd)
                    return await self._end(item)
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the buyer goes away.
            self._buyer_gone()
            raise
        except ConnectionResetError:
            self._buyer_gone()
            return self.response or web.Response(status=499)
        finally:
            if getter is not None:
                getter.cancel()

    def _buyer_gone(self) -> None:
        reason = "shutdown" if self.api.side.stopping else "buyer_disconnected"
        if self.api.relay.cancel(self.rid, reason):
            logger.info(
                "buyer disconnected request_id=%s provider_id=%s",
                self.rid,
                self.flight.provider_id,
            )

    async def _commit(self) -> web.StreamResponse:
        if self.response is None:
            response = web.StreamResponse(
                status=200,
                headers={
                    "Content-Type": "text/event-stream; charset=utf-8",
                    "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no",
                    "X-Request-Id": self.rid,
                },
            )
            await response.prepare(self.request)
            self.response = response
        return self.response

    async def _chunk(self, chunk: ResponseChunk) -> None:
        if not self.flight.stream:
            self.parts.append(chunk.data)
            return
        response = await self._commit()
        await response.write(chunk.data.encode())
        self.at_boundary = chunk.data.endswith("\n\n")
        self.done_seen = self.done_seen or SSE_DONE.strip() in chunk.data

    async def _end(self, end: ResponseEnd) -> web.StreamResponse:
        if end.status != "complete":
            status, type_, code = END_ERRORS.get(end.status, (500, "server_error", end.status))
            message = end.error or f"provider ended the request with status {end.status}"
            return await self._fail(status, message, type_, code)
        if self.flight.stream:
            response = await self._commit()
            if not self.done_seen:
                logger.warning(
                    "stream complete without [DONE] request_id=%s provider_id=%s",
                    self.rid,
                    self.flight.provider_id,
                )
                await response.write(SSE_DONE.encode())
            await response.write_eof()
            return response
        text = "".join(self.parts)
        try:
            msgspec.json.decode(text)
        except msgspec.DecodeError:
            logger.warning(
                "non-stream response is not JSON request_id=%s provider_id=%s bytes=%d",
                self.rid,
                self.flight.provider_id,
                len(text),
            )
            return await self._fail(
                502, "provider returned an invalid completion", "server_error", "bad_gateway"
            )
        return web.Response(
            body=text.encode(),
            content_type="application/json",
            headers={"X-Request-Id": self.rid},
        )

    async def _gone(self, gone: Gone) -> web.StreamResponse:
        status = GONE_STATUS.get(gone.cause, 502)
        message = f"provider {self.flight.provider_id} lost the request: {gone.cause}"
        if gone.detail:
            message += f" ({gone.detail})"
        return await self._fail(status, message, "server_error", gone.cause)

    async def _fail(
        self, status: int, message: str, type_: str, code: str | None
    ) -> web.StreamResponse:
        logger.info(
            "request error request_id=%s provider_id=%s status=%d code=%s committed=%s",
            self.rid,
            self.flight.provider_id,
            status,
            code,
            self.response is not None,
        )
        if self.response is None:
            return error_response(
                status, message, type_, code=code, headers={"X-Request-Id": self.rid}
            )
        # Committed: the status line is gone, so the error travels in-band.
        event = b"data: " + error_body(message, type_, code=code) + b"\n\n"
        if not self.at_boundary:
            event = b"\n\n" + event
        await self.response.write(event)
        if not self.done_seen:
            await self.response.write(SSE_DONE.encode())
        await self.response.write_eof()
        return self.response


class BuyerAPI:
    """The buyer HTTP API of the stub.

    Args:
        config: Stub configuration (``host``, ``http_port``, ``keepalive_s``,
            ``request_timeout_s``, ``events_queue_size``).
        pool: The provider pool (read for models, status).
        side: The provider endpoint (sessions, admin actions).
        relay: Requests in flight (routing, cancels).
        bus: The event bus behind ``/v1/events``.
        status: Callable returning the ``/v1/status`` document.
    """

    def __init__(
        self,
        config: StubConfig,
        pool: Pool,
        side: WebSocketSide,
        relay: Relay,
        bus: EventBus,
        status: Callable[[], dict[str, Any]],
        catalog: Catalog | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.side = side
        self.relay = relay
        self.bus = bus
        self.catalog = catalog
        self._status = status
        self.port = 0
        self._runner: web.AppRunner | None = None

    def make_app(self) -> web.Application:
        # Room above the body limit so decode_chat_request, not aiohttp,
        # reports an oversize body as a field-named 400.
        app = web.Application(client_max_size=MAX_BODY_BYTES + 64 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/status", self.status)
        app.router.add_get("/v1/events", self.events)
        app.router.add_get("/v1/autotune-candidates", self.autotune_candidates)
        app.router.add_get("/v1/autotune-candidates.sig", self.autotune_signature)
        app.router.add_post("/admin/providers/{provider_id}/drain", self.admin_drain)
        app.router.add_post("/admin/providers/{provider_id}/drop", self.admin_drop)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(
            self.make_app(),
            handler_cancellation=True,
            shutdown_timeout=1.0,
            access_log=None,
        )
        await self._runner.setup()
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.config.host, self.config.http_port))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        logger.info("buyer API listening host=%s port=%d", self.config.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------
    # Handlers

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error_response(
                413,
                f"request body is larger than {MAX_BODY_BYTES} bytes",
                "invalid_request_error",
                code="request_too_large",
            )
        try:
            chat = decode_chat_request(raw)
            body = raw.decode()
        except (BadRequest, UnicodeDecodeError) as exc:
            message = str(exc)
            logger.info("bad request: %s", message)
            return error_response(400, message, "invalid_request_error", param=error_param(message))
        served = self.served_models()
        if chat.model is not None and served and chat.model not in served:
            logger.info("unknown model model=%s", chat.model)
            return error_response(
                404,
                f"model {chat.model!r} is not served here; served models: "
                + ", ".join(sorted(served)),
                "invalid_request_error",
                code="model_not_found",
                param="model",
            )
        try:
            flight = await self._dispatch(body, chat)
        except NoProviderAvailable as exc:
            logger.info("no provider for request model=%s", chat.model)
            return error_response(503, str(exc), "server_error", code="no_provider_available")
        except SettlementRequired as exc:
            logger.warning("route snapshot failed before provider dispatch: %s", exc)
            return error_response(
                500,
                "Could not durably record route snapshot",
                "server_error",
                code="route_snapshot_failed",
            )
        return await _Relay(self, request, flight).run()

    def served_models(self) -> set[str]:
        """Every model a connected provider announced."""
        return {
            model
            for record in self.pool.providers.values()
            if record.connected
            for model in record.models
        }

    async def _dispatch(self, body: str, chat: Any) -> Flight:
        """Dispatch to a provider of ``chat.model`` (any provider when it names none).

        The pool prefers providers of the model but falls back to any; a
        buyer who named a model must get that model or a 503. A session the
        relay closes for a rekey is passed over for the next one.
        """
        if chat.model is None:
            return await self.relay.dispatch(body, stream=chat.stream)
        error = NoProviderAvailable(f"no ready provider of model {chat.model!r} has a free slot")
        for _ in range(8):
            session = self._session_for(chat.model)
            try:
                return await self.relay.dispatch(
                    body, stream=chat.stream, model=chat.model, session=session
                )
            except NoProviderAvailable as exc:
                error = exc
        raise error

    def _session_for(self, model: str) -> Any:
        """The session of the least-loaded routable provider serving ``model``."""
        record = self.pool.pick(model)
        if (
            record is None
            or model not in record.models
            or record.provider_id not in self.relay.sessions
        ):
            raise NoProviderAvailable(f"no ready provider of model {model!r} has a free slot")
        return self.relay.sessions[record.provider_id]
    async def autotune_candidates(self, request: web.Request) -> web.Response:
        if self.catalog is None:
            return error_response(
                404,
                "the stub has no catalog (catalog_models)",
                "invalid_request_error",
                code="not_found",
            )
        return web.Response(body=self.catalog.feed.raw, content_type="application/json")

    async def autotune_signature(self, request: web.Request) -> web.Response:
        if self.catalog is None:
            return error_response(
                404,
                "the stub has no catalog (catalog_models)",
                "invalid_request_error",
                code="not_found",
            )
        return web.Response(body=self.catalog.signature, content_type="application/json")

    async def models(self, request: web.Request) -> web.Response:
        seen: dict[str, str] = {}
        for record in self.pool.providers.values():
            if record.connected:
                for model in record.models:
                    seen.setdefault(model, record.provider_id)
        created = int(time.time())
        data = [
            {"id": model, "object": "model", "created": created, "owned_by": provider_id}
            for model, provider_id in seen.items()
        ]
        return json_response({"object": "list", "data": data})

    async def status(self, request: web.Request) -> web.Response:
        return json_response(self._status())

    async def events(self, request: web.Request) -> web.StreamResponse:
        subscriber, snapshot = self.bus.subscribe(lambda: self.pool.snapshot(time.monotonic()))
        logger.info("events subscriber joined subscriber_id=%d", subscriber.id)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        try:
            await response.prepare(request)
            if request.transport is not None:
                # Keep hidden buffering small: the bounded queue is what
                # absorbs a slow subscriber, not megabytes of transport and
                # autotuned kernel buffers.
                request.transport.set_write_buffer_limits(high=EVENTS_BUFFER_BYTES)
                sock = request.transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, EVENTS_BUFFER_BYTES)
            await response.write(_sse(snapshot))
            while True:
                event = await subscriber.get()
                if event is None:
                    break
                await response.write(_sse(event))
            await response.write_eof()
        except ConnectionResetError:
            pass
        finally:
            self.bus.unsubscribe(subscriber)
            logger.info(
                "events subscriber left subscriber_id=%d delivered=%d dropped=%d",
                subscriber.id,
                subscriber.delivered,
                subscriber.dropped_total,
            )
        return response

    async def admin_drain(self, request: web.Request) -> web.Response:
        provider_id = request.match_info["provider_id"]
        try:
            self.side.send_drain(provider_id)
        except KeyError as exc:
            return error_response(404, str(exc.args[0]), "invalid_request_error", code="not_found")
        return json_response({"provider_id": provider_id, "sent": "drain"}, status=202)

    async def admin_drop(self, request: web.Request) -> web.Response:
        provider_id = request.match_info["provider_id"]
        try:
            self.side.session(provider_id).abort("fault_drop", "admin endpoint")
        except KeyError as exc:
            return error_response(404, str(exc.args[0]), "invalid_request_error", code="not_found")
        return json_response({"provider_id": provider_id, "dropped": True})


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(event) + b"\n\n"
