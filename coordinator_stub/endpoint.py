"""The provider endpoint ``/ws/provider``: listening, handshake, registration, frames in.

:class:`WebSocketSide` accepts connections (with the refusal faults), checks
the token and the first frame (:mod:`.frames`), registers the provider in the
pool, and reads its frames for as long as the session lives, handing chunk
and end frames to the :class:`~coordinator_stub.relay.Relay`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import secrets
import socket
import ssl
import time
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from provider.coordinator.messages import (
    PROTOCOL_VERSION,
    Drain,
    DrainStatus,
    Heartbeat,
    Hello,
    HelloAck,
    InferenceResponseChunk,
    InferenceResponseEnd,
    Invalid,
    Nak,
    Preflight,
    PreflightAck,
    StateUpdate,
    WarmUp,
    decode_provider_frame,
    message_type,
)

from .config import WS_PATH, StubConfig
from .events import EventBus
from .faults import Faults, RefuseMode
from .frames import Refusal, check_hello, close_reason
from .observe import Changes, FrameLog, FrameRecord, RejectRecord
from .pool import Pool
from .relay import Relay
from .session import ProviderSession, StubConnection

logger = logging.getLogger(__name__)


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
        self.relay = Relay(config, pool, bus, changes, self.sessions)
        self.port = 0
        self.stopping = False
        self._tokens: set[str] = set(config.tokens)
        self._session_ids = itertools.count(1)
        self._server: Server | None = None
        self._servers: list[Server] = []
        self._removals: dict[str, asyncio.TimerHandle] = {}
        self._relisten: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._ssl: ssl.SSLContext | None = None

    # ------------------------------------------------------------------
    # Listener

    @property
    def scheme(self) -> str:
        """``wss`` when the endpoint listens with TLS, else ``ws``."""
        return "wss" if self.config.tls_cert else "ws"

    def _tls_context(self) -> ssl.SSLContext | None:
        if self.config.tls_cert is None or self.config.tls_key is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        return context

    async def start(self) -> None:
        # Loaded once: a bad certificate or key fails the start, not a handshake.
        self._ssl = self._tls_context()
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
            ssl=self._ssl,
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
        for flight in list(self.relay.flights.values()):
            self.relay._fail_flight(flight, "stub_shutdown", "coordinator stopped")

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
        try:
            return check_hello(first)
        except Refusal as refusal:
            await self._reject(conn, refusal.code, refusal.reason, refusal.provider_id)
            return None

    def _register(self, conn: StubConnection, hello: Hello, raw: str | bytes) -> ProviderSession:
        now = time.monotonic()
        session_id = next(self._session_ids)
        token = None
        if self.config.issue_provider_token:
            token = "ptok_" + secrets.token_urlsafe(24)
            if self.config.tokens:
                self._tokens.add(token)
        record, _replaced, events = self.pool.register(hello, session_id, now, assigned_token=token)
        session = ProviderSession(
            conn, session_id, hello, now, config=self.config, faults=self.faults, log=self.log
        )
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
            self.relay.fail_flights(old, "provider_dropped", "session replaced")
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
                    self.relay.warm_up(session), name=f"warm-up {hello.provider_id}#{session_id}"
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
            self.relay.on_response(session, msg)
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
        self.relay.fail_flights(session, "provider_dropped", cause)
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
