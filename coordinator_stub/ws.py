"""Provider side of the stub: the WebSocket endpoint ``/ws/provider``.

One :class:`ProviderSession` per registered connection. It owns:

* a writer task, the only place frames go out (so faults such as delay,
  duplication and stalls apply to every frame, in order, and every TEXT write
  arms the write deadline);
* an inactivity watchdog (only well-formed TEXT frames count as liveness);
* the warm-up task, while the provider is behind the warm-up gate.

Requests to a provider are :class:`Flight` objects: the provider's chunk and
end frames, or a :class:`Gone` marker when the session is lost, arrive on the
flight's queue, so a waiting buyer can never hang on a dead provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import msgspec
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response

from provider.protocol import (
    PROTOCOL_VERSION,
    CancelRequest,
    Drain,
    DrainStatus,
    Heartbeat,
    Hello,
    HelloAck,
    InferenceRequest,
    InferenceResponseChunk,
    InferenceResponseEnd,
    Invalid,
    Nak,
    Preflight,
    PreflightAck,
    StateUpdate,
    WarmUp,
    decode_coordinator_frame,
    decode_provider_frame,
    encode_text,
    message_type,
)

from .config import WS_PATH, StubConfig
from .events import EventBus
from .faults import Faults, RefuseMode
from .observe import Changes, FrameLog, FrameRecord, RejectRecord
from .pool import Pool, RequestKind

logger = logging.getLogger(__name__)

#: Body of the stub's own warm-up request (the real coordinator's gate).
WARMUP_BODY = msgspec.json.encode(
    {
        "messages": [{"role": "user", "content": "Reply with ok."}],
        "max_tokens": 2,
        "stream": False,
    }
).decode()

#: Fields the real coordinator requires in ``hello`` that
#: :class:`provider.protocol.Hello` gives defaults (so decoding alone would
#: accept a hello the real coordinator closes with 4001).
HELLO_WIRE_REQUIRED = ("version", "tier")

#: Longest close reason a close frame can carry, in bytes.
MAX_CLOSE_REASON = 123


def close_reason(text: str) -> str:
    """``text`` cut to fit a close frame (123 bytes, whole characters)."""
    return text.encode()[:MAX_CLOSE_REASON].decode(errors="ignore")


class SessionClosed(Exception):
    """The provider session ended before a frame could be written."""


class ProbeFailed(Exception):
    """Writing a routed request did not finish within the probe timeout."""


class NoProviderAvailable(Exception):
    """No ready provider has a free slot."""


@dataclass(frozen=True)
class Gone:
    """End of a flight without an end frame (session lost, probe failed...)."""

    cause: str
    detail: str = ""


FlightItem = InferenceResponseChunk | InferenceResponseEnd | Gone


@dataclass(eq=False)
class Flight:
    """One request sent to a provider and what came back for it.

    ``queue`` yields the provider's chunks, then exactly one
    :class:`~provider.protocol.InferenceResponseEnd` or :class:`Gone`.
    """

    request_id: str
    provider_id: str
    session: ProviderSession
    kind: RequestKind
    stream: bool
    created: float
    queue: asyncio.Queue[FlightItem] = field(default_factory=asyncio.Queue)
    next_seq: int = 0
    seq_gaps: int = 0
    end: InferenceResponseEnd | None = None
    failure: Gone | None = None
    finished: bool = False
    cancel_reason: str | None = None
    grace_handle: asyncio.TimerHandle | None = None

    async def wait_end(self, timeout: float) -> InferenceResponseEnd | Gone | None:
        """Consume the queue up to the end; ``None`` if ``timeout`` passes first."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    item = await self.queue.get()
                    if isinstance(item, InferenceResponseEnd | Gone):
                        return item
        except TimeoutError:
            return None


class StubConnection(ServerConnection):
    """:class:`ServerConnection` with the real coordinator's quirks.

    * Write deadline: ``write_deadline`` (monotonic) is armed by the session
      on every TEXT write and never cleared. A PING received after it calls
      ``on_pong_failure`` (the session aborts the connection) instead of
      being processed: the real coordinator's automatic PONG fails there.
      websockets has already queued its own PONG by the time the frame is
      seen, so a client may still get that PONG just before the reset.
    * Stalls: while ``stalled``, reading from the transport stays paused even
      when websockets' own flow control would resume it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.write_deadline: float | None = None
        self.on_pong_failure: Callable[[], None] | None = None
        self.stalled = False
        self._doomed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assembler_resume = self.recv_messages.resume

        def resume() -> None:
            if not self.stalled:
                assembler_resume()

        self.recv_messages.resume = resume

    def process_event(self, event: Any) -> None:
        if self._doomed:
            return
        if (
            isinstance(event, Frame)
            and event.opcode is Opcode.PING
            and self.write_deadline is not None
            and self.on_pong_failure is not None
            and time.monotonic() > self.write_deadline
        ):
            self._doomed = True
            self.on_pong_failure()
            return
        super().process_event(event)

    def set_stalled(self, stalled: bool) -> None:
        """Pause (or resume) reading from the socket."""
        self.stalled = stalled
        if stalled:
            self.transport.pause_reading()
        elif not self.recv_messages.paused:
            self.transport.resume_reading()


@dataclass(eq=False)
class _Outgoing:
    message: msgspec.Struct | None
    raw: str | bytes
    type: str
    not_before: float
    bound: float | None
    future: asyncio.Future[None]


def _retrieve(future: asyncio.Future[Any]) -> None:
    # Fire-and-forget sends must not log "exception was never retrieved".
    if not future.cancelled():
        future.exception()


class ProviderSession:
    """One registered provider connection."""

    def __init__(
        self, side: WebSocketSide, conn: StubConnection, session_id: int, hello: Hello, now: float
    ) -> None:
        self.side = side
        self.conn = conn
        self.session_id = session_id
        self.hello = hello
        self.provider_id = hello.provider_id
        self.started = now
        self.last_liveness = now
        self.last_text_write: float | None = None
        self.drop_cause: str | None = None
        self.drop_detail = ""
        self.closed = False
        #: Set when the provider reports ``ready``: a failed warm-up (say,
        #: model still loading) is retried then instead of after the pause.
        self.reported_ready = asyncio.Event()
        self.unstalled = asyncio.Event()
        self.unstalled.set()
        self._outbox: asyncio.Queue[_Outgoing] = asyncio.Queue()
        self._current: _Outgoing | None = None
        self._tasks: list[asyncio.Task[None]] = []
        conn.on_pong_failure = self._pong_failed

    def __repr__(self) -> str:
        return f"<ProviderSession provider_id={self.provider_id} session_id={self.session_id}>"

    @property
    def stalled(self) -> bool:
        return self.conn.stalled

    def start(self) -> None:
        name = f"{self.provider_id}#{self.session_id}"
        self._tasks.append(asyncio.create_task(self._writer(), name=f"writer {name}"))
        self._tasks.append(asyncio.create_task(self._watchdog(), name=f"watchdog {name}"))

    def add_task(self, task: asyncio.Task[None]) -> None:
        self._tasks.append(task)

    # ------------------------------------------------------------------
    # Sending

    def send(self, message: msgspec.Struct, *, bound: float | None = None) -> asyncio.Future[None]:
        """Queue ``message``; the future resolves once it is written.

        ``bound`` limits the write itself (not the configured delay or a
        stall): past it the session is dropped with cause ``probe_failed``.
        """
        return self._enqueue(message, encode_text(message), message_type(message), bound)

    def send_raw(self, data: str | bytes) -> asyncio.Future[None]:
        """Queue an arbitrary frame (TEXT for ``str``, BINARY for ``bytes``)."""
        if isinstance(data, bytes):
            return self._enqueue(None, data, "<binary>", None)
        decoded = decode_coordinator_frame(data)
        kind = decoded.type if isinstance(decoded, Invalid) else message_type(decoded)
        return self._enqueue(None, data, kind or "<invalid>", None)

    def _enqueue(
        self, message: msgspec.Struct | None, raw: str | bytes, kind: str, bound: float | None
    ) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        if self.closed:
            future.set_exception(SessionClosed(f"session {self.session_id} is closed"))
            return future
        not_before = time.monotonic() + self.side.faults.delay_s
        self._outbox.put_nowait(_Outgoing(message, raw, kind, not_before, bound, future))
        return future

    async def _writer(self) -> None:
        try:
            while True:
                item = self._current = await self._outbox.get()
                delay = item.not_before - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self.unstalled.wait()
                copies = 2 if self.side.faults.duplicate else 1
                try:
                    for _ in range(copies):
                        await self._write(item)
                except TimeoutError:
                    detail = f"writing {item.type} took more than {item.bound}s"
                    item.future.set_exception(ProbeFailed(detail))
                    self.abort("probe_failed", detail)
                    return
                except (ConnectionClosed, OSError, RuntimeError) as exc:
                    # RuntimeError: asyncio refuses writes on a closing transport.
                    item.future.set_exception(SessionClosed(str(exc)))
                    return
                item.future.set_result(None)
                self._current = None
        finally:
            self._fail_pending()

    async def _write(self, item: _Outgoing) -> None:
        is_text = isinstance(item.raw, str)
        if is_text and self.side.config.write_deadline_s is not None:
            # Armed before the write, as the real coordinator sets its
            # deadline before writing; never cleared afterwards.
            self.conn.write_deadline = time.monotonic() + self.side.config.write_deadline_s
        if item.bound is not None:
            await asyncio.wait_for(self.conn.send(item.raw), item.bound)
        else:
            await self.conn.send(item.raw)
        now = time.monotonic()
        if is_text:
            self.last_text_write = now
        self.side.log.add(
            FrameRecord(
                now, self.provider_id, self.session_id, "out", item.type, item.message, item.raw
            )
        )

    def _fail_pending(self) -> None:
        error = SessionClosed(f"session {self.session_id} of {self.provider_id} closed")
        items = [self._current] if self._current is not None else []
        self._current = None
        while not self._outbox.empty():
            items.append(self._outbox.get_nowait())
        for item in items:
            if not item.future.done():
                item.future.set_exception(error)

    # ------------------------------------------------------------------
    # Timers and faults

    async def _watchdog(self) -> None:
        limit = self.side.config.inactivity_s
        if limit is None:
            return
        while True:
            if self.conn.stalled:
                await self.unstalled.wait()
                continue
            idle = time.monotonic() - self.last_liveness
            if idle >= limit:
                self.abort("inactivity", f"no well-formed text frame for {idle:.3f}s")
                return
            await asyncio.sleep(limit - idle)

    def _pong_failed(self) -> None:
        since = (
            "never"
            if self.last_text_write is None
            else (f"{time.monotonic() - self.last_text_write:.3f}s")
        )
        self.abort(
            "write_deadline_pong",
            f"client ping after write deadline (last text write {since} ago, "
            f"deadline {self.side.config.write_deadline_s}s)",
        )

    def abort(self, cause: str, detail: str = "") -> None:
        """Drop the TCP connection without a close handshake."""
        if self.drop_cause is None:
            self.drop_cause = cause
            self.drop_detail = detail
        self.closed = True
        self.conn.transport.abort()

    def stall(self, stalled: bool) -> None:
        """Stop (or resume) reading from and writing to this provider."""
        if stalled == self.conn.stalled:
            return
        self.conn.set_stalled(stalled)
        if stalled:
            self.unstalled.clear()
        else:
            # The stub was the one hung: do not blame the provider for the
            # silence it could not deliver.
            self.last_liveness = time.monotonic()
            self.unstalled.set()

    def cancel_tasks(self) -> None:
        self.closed = True
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()


class WebSocketSide:
    """The provider endpoint: handshake, sessions, routing to providers."""

    def __init__(
        self,
        config: StubConfig,
        pool: Pool,
        bus: EventBus,
        faults: Faults,
        log: FrameLog,
        changes: Changes,
    ) -> None:
        self.config = config
        self.pool = pool
        self.bus = bus
        self.faults = faults
        self.log = log
        self.changes = changes
        self.sessions: dict[str, ProviderSession] = {}
        self.flights: dict[str, Flight] = {}
        self.port = 0
        self.stopping = False
        self._tokens: set[str] = set(config.tokens)
        self._session_ids = itertools.count(1)
        self._server: Server | None = None
        self._servers: list[Server] = []
        self._removals: dict[str, asyncio.TimerHandle] = {}
        self._relisten: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------
    # Listener

    async def start(self) -> None:
        sock = self._listen_socket(self.config.ws_port)
        self.port = sock.getsockname()[1]
        await self._serve(sock)
        logger.info("provider endpoint listening host=%s port=%d", self.config.host, self.port)

    def _listen_socket(self, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.config.so_rcvbuf is not None:
                # Set before listen() so accepted sockets inherit it and the
                # window advertised in the handshake is already small.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.config.so_rcvbuf)
            if self.config.so_sndbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.config.so_sndbuf)
            sock.bind((self.config.host, port))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _serve(self, sock: socket.socket) -> None:
        self._server = await serve(
            self._handler,
            sock=sock,
            process_request=self._process_request,
            compression=None,
            ping_interval=None,
            max_size=self.config.max_frame_bytes,
            open_timeout=self.config.hello_timeout_s,
            close_timeout=self.config.close_timeout_s,
            create_connection=StubConnection,
        )
        self._servers.append(self._server)

    def refuse(self, seconds: float, mode: RefuseMode) -> None:
        """Refuse new connections for ``seconds`` (see :class:`Faults`)."""
        loop = asyncio.get_running_loop()
        self.faults.refuse_until = time.monotonic() + seconds
        self.faults.refuse_mode = mode
        logger.warning("refusing connections seconds=%.3f mode=%s", seconds, mode)
        if mode != "unlisten":
            return
        if self._relisten is not None:
            self._relisten.cancel()
        elif self._server is not None:
            # Only the listening socket: open sessions are unaffected.
            self._server.server.close()
        self._relisten = loop.call_later(seconds, self._spawn_listen_again)

    def _spawn_listen_again(self) -> None:
        self._relisten = None
        if not self.stopping:
            self._spawn(self._listen_again())

    async def _listen_again(self) -> None:
        await self._serve(self._listen_socket(self.port))
        logger.info("provider endpoint listening again port=%d", self.port)
        self.changes.notify()

    @property
    def listening(self) -> bool:
        return self._server is not None and self._relisten is None and self._server.is_serving()

    async def stop(self) -> None:
        self.stopping = True
        if self._relisten is not None:
            self._relisten.cancel()
            self._relisten = None
        for handle in self._removals.values():
            handle.cancel()
        self._removals.clear()
        for session in list(self.sessions.values()):
            if session.drop_cause is None:
                session.drop_cause = "stub_shutdown"
            # A stalled session would never read the closing handshake.
            session.stall(False)
        for server in self._servers:
            server.close(close_connections=True, code=1001, reason="coordinator shutting down")
        for server in self._servers:
            await server.wait_closed()
        for task in list(self._background):
            task.cancel()
        for flight in list(self.flights.values()):
            self._fail_flight(flight, "stub_shutdown", "coordinator stopped")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------
    # Handshake

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        now = time.monotonic()
        if self.faults.refusing(now):
            retry = max(1, math.ceil(self.faults.refuse_until - now))
            response = conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "refusing connections\n")
            response.headers["Retry-After"] = str(retry)
            self.log.reject(RejectRecord(now, 503, "refusing connections", None, _peer(conn)))
            logger.info("refused handshake remote=%s retry_after=%d", _peer(conn), retry)
            return response
        if urlsplit(request.path).path != WS_PATH:
            return conn.respond(
                HTTPStatus.NOT_FOUND, f"not found; providers connect to {WS_PATH}\n"
            )
        return None

    def _token_ok(self, headers: Headers) -> bool:
        if not self._tokens:
            return True
        value = headers.get("Authorization", "")
        scheme, _, token = value.partition(" ")
        return scheme.lower() == "bearer" and token.strip() in self._tokens

    async def _reject(
        self, conn: ServerConnection, code: int, reason: str, provider_id: str | None = None
    ) -> None:
        reason = close_reason(reason)
        self.log.reject(RejectRecord(time.monotonic(), code, reason, provider_id, _peer(conn)))
        logger.warning(
            "closing connection code=%d reason=%r provider_id=%s remote=%s",
            code,
            reason,
            provider_id,
            _peer(conn),
        )
        await conn.close(code, reason)

    async def _handler(self, conn: ServerConnection) -> None:
        assert isinstance(conn, StubConnection)
        if self.faults.take_accept_then_close():
            await self._reject(conn, self.faults.accept_close_code, self.faults.accept_close_reason)
            return
        if not self._token_ok(conn.request.headers):
            await self._reject(conn, 4005, "invalid provider token")
            return
        try:
            first = await asyncio.wait_for(conn.recv(), self.config.hello_timeout_s)
        except TimeoutError:
            await self._reject(conn, 4000, f"no hello within {self.config.hello_timeout_s}s")
            return
        except ConnectionClosed as exc:
            logger.info("connection closed before hello remote=%s: %s", _peer(conn), exc)
            return
        hello = await self._check_hello(conn, first)
        if hello is None:
            return
        session = self._register(conn, hello, first)
        closed: ConnectionClosed | None = None
        try:
            closed = await self._receive(session)
        finally:
            self._end_session(session, closed)

    async def _check_hello(self, conn: ServerConnection, first: str | bytes) -> Hello | None:
        if isinstance(first, bytes):
            await self._reject(conn, 4000, "first message must be a hello text frame")
            return None
        msg = decode_provider_frame(first)
        if isinstance(msg, Invalid):
            if msg.type == "hello":
                await self._reject(conn, 4001, msg.message)
            else:
                got = msg.type or "no type"
                await self._reject(conn, 4000, f"first message must be hello, got {got}")
            return None
        if not isinstance(msg, Hello):
            await self._reject(conn, 4000, f"first message must be hello, got {message_type(msg)}")
            return None
        raw = msgspec.json.decode(first)
        for name in HELLO_WIRE_REQUIRED:
            if name not in raw:
                await self._reject(
                    conn, 4001, f"Object missing required field `{name}`", msg.provider_id
                )
                return None
        if msg.version != PROTOCOL_VERSION:
            await self._reject(
                conn, 4004, f"unsupported protocol version {msg.version}", msg.provider_id
            )
            return None
        return msg

    def _register(self, conn: StubConnection, hello: Hello, raw: str | bytes) -> ProviderSession:
        now = time.monotonic()
        session_id = next(self._session_ids)
        token = None
        if self.config.issue_provider_token:
            token = "ptok_" + secrets.token_urlsafe(24)
            if self.config.tokens:
                self._tokens.add(token)
        record, _replaced, events = self.pool.register(hello, session_id, now, assigned_token=token)
        session = ProviderSession(self, conn, session_id, hello, now)
        old = self.sessions.get(hello.provider_id)
        self.sessions[hello.provider_id] = session
        removal = self._removals.pop(hello.provider_id, None)
        if removal is not None:
            removal.cancel()
        self.log.add(FrameRecord(now, hello.provider_id, session_id, "in", "hello", hello, raw))
        logger.info(
            "provider registered provider_id=%s session_id=%d model_id=%s max_concurrency=%d "
            "state=%s remote=%s",
            hello.provider_id,
            session_id,
            hello.model_id,
            hello.max_concurrency,
            record.state,
            _peer(conn),
        )
        if old is not None:
            self._fail_flights(old, "provider_dropped", "session replaced")
            old.abort("replaced", f"superseded by session {session_id}")
        self.bus.publish_all(events)
        session.start()
        session.send(
            HelloAck(
                coordinator_version=PROTOCOL_VERSION,
                assigned_id=hello.provider_id,
                heartbeat_interval_s=self.config.heartbeat_interval_s,
                tier=self.config.tier,
                assigned_provider_token=token,
            )
        )
        if not record.warmed:
            session.add_task(
                asyncio.create_task(
                    self._warm_up(session), name=f"warm-up {hello.provider_id}#{session_id}"
                )
            )
        return session

    # ------------------------------------------------------------------
    # Receiving

    async def _receive(self, session: ProviderSession) -> ConnectionClosed | None:
        conn = session.conn
        pid, sid = session.provider_id, session.session_id
        while True:
            if conn.stalled:
                await session.unstalled.wait()
            try:
                data = await conn.recv()
            except ConnectionClosed as exc:
                return exc
            now = time.monotonic()
            if isinstance(data, bytes):
                self.log.add(FrameRecord(now, pid, sid, "in", "<binary>", None, data))
                logger.debug("binary frame ignored provider_id=%s bytes=%d", pid, len(data))
                continue
            msg = decode_provider_frame(data)
            if isinstance(msg, Invalid):
                self.log.add(FrameRecord(now, pid, sid, "in", msg.type or "<invalid>", msg, data))
                self.pool.record_invalid(pid, sid)
                logger.warning(
                    "undecodable frame provider_id=%s type=%r code=%s error=%s",
                    pid,
                    msg.type,
                    msg.code,
                    msg.message,
                )
                if msg.code == "unknown_message_type":
                    # Well-formed JSON, just a type we do not know: still a
                    # sign of life.
                    session.last_liveness = now
                    self.pool.touch(pid, sid, now)
                continue
            session.last_liveness = now
            self.pool.touch(pid, sid, now)
            self.log.add(FrameRecord(now, pid, sid, "in", message_type(msg), msg, data))
            self._dispatch(session, msg, now)

    def _dispatch(self, session: ProviderSession, msg: Any, now: float) -> None:
        pid, sid = session.provider_id, session.session_id
        if isinstance(msg, Heartbeat):
            gap, events = self.pool.heartbeat(pid, sid, msg, now)
            self.bus.publish_all(events)
            wake = self.config.wake_gap_s
            if gap is not None and wake is not None and gap > wake:
                logger.warning("heartbeat gap provider_id=%s gap_s=%.3f: sending warm_up", pid, gap)
                self.bus.publish({"type": "wake_gap", "provider_id": pid, "gap_s": round(gap, 3)})
                session.send(WarmUp())
        elif isinstance(msg, StateUpdate):
            logger.info(
                "state_update provider_id=%s state=%s reason=%s", pid, msg.state, msg.reason
            )
            self.bus.publish_all(self.pool.state_update(pid, sid, msg, now))
            if msg.state == "ready":
                session.reported_ready.set()
        elif isinstance(msg, InferenceResponseChunk | InferenceResponseEnd):
            self._on_response(session, msg)
        elif isinstance(msg, PreflightAck):
            self.pool.record_preflight_ack(pid, sid, msg)
            logger.info(
                "preflight_ack provider_id=%s request_id=%s accepted=%s reason=%s",
                pid,
                msg.request_id,
                msg.accepted,
                msg.reason,
            )
        elif isinstance(msg, DrainStatus):
            logger.info(
                "drain_status provider_id=%s phase=%s inflight=%d",
                pid,
                msg.phase,
                msg.inflight_requests,
            )
            self.bus.publish_all(self.pool.record_drain_status(pid, sid, msg))
        elif isinstance(msg, Nak):
            self.pool.record_nak(pid, sid, msg)
            logger.warning(
                "nak provider_id=%s in_reply_to=%s code=%s message=%s",
                pid,
                msg.in_reply_to,
                msg.error.code,
                msg.error.message,
            )
        elif isinstance(msg, Hello):
            logger.warning("second hello ignored provider_id=%s session_id=%d", pid, sid)
        self.changes.notify()

    def _on_response(
        self, session: ProviderSession, msg: InferenceResponseChunk | InferenceResponseEnd
    ) -> None:
        flight = self.flights.get(msg.request_id)
        if flight is None or flight.session is not session:
            logger.warning(
                "response for unknown request provider_id=%s request_id=%s type=%s",
                session.provider_id,
                msg.request_id,
                message_type(msg),
            )
            return
        if isinstance(msg, InferenceResponseChunk):
            if msg.seq != flight.next_seq:
                flight.seq_gaps += 1
                self.pool.seq_gaps += 1
                logger.warning(
                    "chunk seq gap provider_id=%s request_id=%s expected=%d got=%d",
                    session.provider_id,
                    msg.request_id,
                    flight.next_seq,
                    msg.seq,
                )
            flight.next_seq = msg.seq + 1
            flight.queue.put_nowait(msg)
            return
        if msg.chunks_sent != flight.next_seq:
            logger.warning(
                "end frame chunks_sent mismatch provider_id=%s request_id=%s chunks_sent=%d "
                "seen=%d",
                session.provider_id,
                msg.request_id,
                msg.chunks_sent,
                flight.next_seq,
            )
        flight.end = msg
        flight.queue.put_nowait(msg)
        logger.info(
            "request finished provider_id=%s request_id=%s kind=%s status=%s completion_tokens=%d",
            session.provider_id,
            msg.request_id,
            flight.kind,
            msg.status,
            msg.usage.completion_tokens,
        )
        self._finish(flight, msg.status)

    def _end_session(self, session: ProviderSession, closed: ConnectionClosed | None) -> None:
        session.cancel_tasks()
        if session.drop_cause is not None:
            cause, detail = session.drop_cause, session.drop_detail
        else:
            cause, detail = _close_cause(closed)
        now = time.monotonic()
        _drop, events = self.pool.drop(session.provider_id, session.session_id, cause, now, detail)
        logger.warning(
            "provider dropped provider_id=%s session_id=%d cause=%s detail=%s",
            session.provider_id,
            session.session_id,
            cause,
            detail,
        )
        current = self.sessions.get(session.provider_id) is session
        if current:
            del self.sessions[session.provider_id]
        self._fail_flights(session, "provider_dropped", cause)
        self.bus.publish_all(events)
        if current and not self.stopping:
            self._removals[session.provider_id] = asyncio.get_running_loop().call_later(
                self.config.grace_s, self._remove, session.provider_id, session.session_id
            )
        self.changes.notify()

    def _remove(self, provider_id: str, session_id: int) -> None:
        self._removals.pop(provider_id, None)
        events = self.pool.remove(provider_id, session_id, "grace_expired", time.monotonic())
        if events:
            logger.info(
                "provider removed provider_id=%s session_id=%d cause=grace_expired",
                provider_id,
                session_id,
            )
        self.bus.publish_all(events)
        self.changes.notify()

    # ------------------------------------------------------------------
    # Requests

    def dispatch(
        self,
        body: str,
        *,
        stream: bool,
        model: str | None = None,
        kind: RequestKind = "buyer",
        session: ProviderSession | None = None,
        request_id: str | None = None,
    ) -> Flight:
        """Route a request and queue its ``inference_request``.

        Without ``session`` the pool picks the least-loaded ready provider
        (raises :class:`NoProviderAvailable`). The write is bounded by
        ``probe_timeout_s``; its failure, like any loss of the session,
        arrives on the flight's queue as :class:`Gone`.
        """
        if session is None:
            record = self.pool.pick(model)
            if record is None or record.provider_id not in self.sessions:
                raise NoProviderAvailable("no ready provider with a free slot")
            session = self.sessions[record.provider_id]
        prefix = "req" if kind == "buyer" else "warmup"
        request_id = request_id or f"{prefix}_{secrets.token_hex(12)}"
        flight = Flight(
            request_id=request_id,
            provider_id=session.provider_id,
            session=session,
            kind=kind,
            stream=stream,
            created=time.monotonic(),
        )
        self.flights[request_id] = flight
        self.bus.publish_all(
            self.pool.begin_request(
                session.provider_id, session.session_id, request_id, kind, stream
            )
        )
        logger.info(
            "request routed request_id=%s provider_id=%s kind=%s stream=%s",
            request_id,
            session.provider_id,
            kind,
            stream,
        )
        written = session.send(
            InferenceRequest(request_id=request_id, stream=stream, body=body),
            bound=self.config.probe_timeout_s,
        )
        written.add_done_callback(lambda fut: self._on_request_written(flight, fut))
        return flight

    def _on_request_written(self, flight: Flight, written: asyncio.Future[None]) -> None:
        error = SessionClosed("cancelled") if written.cancelled() else written.exception()
        if error is None:
            return
        cause = "probe_failed" if isinstance(error, ProbeFailed) else "provider_dropped"
        self._fail_flight(flight, cause, str(error))

    def cancel(self, request_id: str, reason: str) -> bool:
        """Send ``cancel_request`` for a request in flight (once).

        The request keeps its slot until the provider's end frame, at most
        ``cancel_grace_s``. Returns whether a cancel was sent.
        """
        flight = self.flights.get(request_id)
        if flight is None or flight.finished or flight.cancel_reason is not None:
            return False
        flight.cancel_reason = reason
        self.pool.cancels_sent[reason] += 1
        flight.session.send(CancelRequest(request_id=request_id, reason=reason))
        logger.info(
            "cancel_request sent request_id=%s provider_id=%s reason=%s",
            request_id,
            flight.provider_id,
            reason,
        )
        flight.grace_handle = asyncio.get_running_loop().call_later(
            self.config.cancel_grace_s, self._cancel_unanswered, flight
        )
        self.changes.notify()
        return True

    def _cancel_unanswered(self, flight: Flight) -> None:
        logger.warning(
            "no end frame after cancel request_id=%s provider_id=%s: releasing slot",
            flight.request_id,
            flight.provider_id,
        )
        self._fail_flight(flight, "cancel_unanswered", "no end frame after cancel_request")

    def _fail_flight(self, flight: Flight, cause: str, detail: str) -> None:
        if flight.finished:
            return
        flight.failure = Gone(cause, detail)
        flight.queue.put_nowait(flight.failure)
        logger.warning(
            "request failed request_id=%s provider_id=%s cause=%s detail=%s",
            flight.request_id,
            flight.provider_id,
            cause,
            detail,
        )
        self._finish(flight, cause)

    def _fail_flights(self, session: ProviderSession, cause: str, detail: str) -> None:
        for flight in list(self.flights.values()):
            if flight.session is session:
                self._fail_flight(flight, cause, detail)

    def _finish(self, flight: Flight, status: str) -> None:
        if flight.finished:
            return
        flight.finished = True
        if flight.grace_handle is not None:
            flight.grace_handle.cancel()
        self.flights.pop(flight.request_id, None)
        self.bus.publish_all(
            self.pool.finish_request(
                flight.provider_id,
                flight.session.session_id,
                flight.request_id,
                flight.kind,
                status,
            )
        )
        self.changes.notify()

    async def _warm_up(self, session: ProviderSession) -> None:
        pid, sid = session.provider_id, session.session_id
        while not session.closed:
            session.reported_ready.clear()
            flight = self.dispatch(WARMUP_BODY, stream=False, kind="warmup", session=session)
            outcome = await flight.wait_end(self.config.warmup_timeout_s)
            if isinstance(outcome, Gone):
                return
            if (
                isinstance(outcome, InferenceResponseEnd)
                and outcome.status == "complete"
                and outcome.usage.completion_tokens > 0
            ):
                logger.info("warm-up passed provider_id=%s session_id=%d", pid, sid)
                self.pool.warmups["passed"] += 1
                self.bus.publish_all(self.pool.warmed_up(pid, sid, time.monotonic()))
                self.changes.notify()
                return
            if outcome is None:
                self.cancel(flight.request_id, "timeout")
                why = f"no end frame within {self.config.warmup_timeout_s}s"
            else:
                why = (
                    f"status={outcome.status} completion_tokens="
                    f"{outcome.usage.completion_tokens} error={outcome.error}"
                )
            logger.warning(
                "warm-up failed provider_id=%s session_id=%d %s; retry in %.3fs "
                "or when it reports ready",
                pid,
                sid,
                why,
                self.config.warmup_retry_s,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(session.reported_ready.wait(), self.config.warmup_retry_s)

    # ------------------------------------------------------------------
    # Control

    def session(self, provider_id: str) -> ProviderSession:
        """The provider's current session; :class:`KeyError` if not connected."""
        try:
            return self.sessions[provider_id]
        except KeyError:
            raise KeyError(f"provider {provider_id!r} is not connected") from None

    def send_drain(self, provider_id: str) -> asyncio.Future[None]:
        logger.info("sending drain provider_id=%s", provider_id)
        return self.session(provider_id).send(Drain())

    def send_warm_up(self, provider_id: str) -> asyncio.Future[None]:
        logger.info("sending warm_up provider_id=%s", provider_id)
        return self.session(provider_id).send(WarmUp())

    def send_preflight(
        self, provider_id: str, estimated_tokens: int, request_id: str | None = None
    ) -> tuple[str, asyncio.Future[None]]:
        request_id = request_id or f"preflight_{secrets.token_hex(8)}"
        logger.info(
            "sending preflight provider_id=%s request_id=%s estimated_tokens=%d",
            provider_id,
            request_id,
            estimated_tokens,
        )
        written = self.session(provider_id).send(
            Preflight(request_id=request_id, estimated_tokens=estimated_tokens)
        )
        return request_id, written


def _peer(conn: ServerConnection) -> str:
    try:
        address = conn.remote_address
    except Exception:
        return "?"
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def _close_cause(closed: ConnectionClosed | None) -> tuple[str, str]:
    if closed is None:
        return "connection_lost", ""
    if closed.rcvd is not None:
        return "provider_closed", f"code={closed.rcvd.code} reason={closed.rcvd.reason!r}"
    if closed.sent is not None:
        code = closed.sent.code
        detail = f"code={code} reason={closed.sent.reason!r}"
        if code == 1009:
            return "frame_too_big", detail
        if code in (1002, 1007):
            return "protocol_error", detail
        return "stub_closed", detail
    return "connection_lost", str(closed)
