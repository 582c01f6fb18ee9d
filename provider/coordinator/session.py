"""One connection to the coordinator, from handshake to close.

:meth:`Session.run` connects (Bearer auth, no redirects, no proxy unless
configured, no WebSocket pings unless configured), registers (``hello`` ->
``hello_ack``), then runs these tasks until one of them ends:

- receive: receives frames and puts them on an unbounded queue, nothing else,
  so nothing a handler does can stop the next receive;
- handler: takes frames off the queue in order, decodes them at the edge and
  dispatches; anything that takes time (inference, drain, warm-up) becomes a
  task of its own;
- writer: the one serialised path for every outbound frame (:mod:`sender`),
  each write bounded in time;
- heartbeat and watchdog (:mod:`heartbeat`);
- drain: waits for a drain request and carries it out.

It returns normally only after a completed drain; every other end is a
:class:`~provider.coordinator.reconnect.ConnectionLost` (or :class:`FatalRefusal`) for
the agent's reconnect loop. On the way out, in-flight jobs are cancelled and
their slots freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Coroutine
from typing import Any, Protocol, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from provider.config import Config
from provider.coordinator.heartbeat import (
    heartbeat_loop,
    heartbeat_tick,
    watchdog_loop,
    watchdog_timeout,
)
from provider.coordinator.jobs import Job, JobTable, Outcome, end_frame, relay
from provider.coordinator.messages import (
    MAX_FRAME_BYTES,
    CancelRequest,
    Drain,
    DrainStatus,
    Heartbeat,
    Hello,
    HelloAck,
    InferenceRequest,
    Invalid,
    Nak,
    NakError,
    Preflight,
    PreflightAck,
    WarmUp,
    decode_coordinator_frame,
    message_type,
)
from provider.coordinator.reconnect import (
    CLOSE_REASONS,
    FATAL_CLOSE_CODES,
    ConnectionLost,
    FatalRefusal,
)
from provider.coordinator.sender import Sender
from provider.coordinator.sockopts import harden
from provider.coordinator.state import StateMachine
from provider.engine import Engine
from provider.openai.request import BadRequest, ChatCompletionRequest, decode_chat_request

log = logging.getLogger("mlx_provider.coordinator.session")
T = TypeVar("T")

HANDSHAKE_TIMEOUT_S = 10.0


class NoRedirectConnect(connect):
    """websockets' connect, minus redirects: the token must not follow a Location."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        if isinstance(exc, InvalidStatus) and 300 <= exc.response.status_code < 400:
            where = exc.response.headers.get("Location", "?")
            return InvalidHandshake(f"coordinator redirected to {where}; redirects are refused")
        return exc


class SessionOwner(Protocol):
    """What a session needs from whoever owns it across connections (the agent).

    The session reads these and calls back through them; it never imports
    the agent.
    """

    config: Config
    engine: Engine
    state: StateMachine
    token: str | None
    binary_version: str
    model_id: str
    stable_after_s: float
    request_timeout_s: float
    drain_requested: asyncio.Event

    def hello_message(self) -> Hello: ...
    def heartbeat_message(self) -> Heartbeat: ...
    def heartbeat_sent(self, when: float) -> None: ...
    def adopt_token(self, token: str) -> None: ...
    def session_registered(self, session: Session, ack: HelloAck) -> None: ...
    def session_ended(self, session: Session) -> None: ...
    def job_started(self, job: Job) -> None: ...
    def job_finished(self, job: Job, outcome: Outcome, *, started: bool) -> None: ...
    def request_drain(self, source: str) -> None: ...
    def set_degraded(self, reason: str) -> None: ...
    def clear_degraded(self, reason: str) -> None: ...
    def throughput_estimate(self) -> float: ...


class Session:
    """One connection; ``owner`` (a :class:`SessionOwner`) outlives it."""

    def __init__(self, owner: SessionOwner) -> None:
        self.owner = owner
        self.config = owner.config
        self.ws: ClientConnection | None = None
        self.sender: Sender | None = None
        self.inbox: asyncio.Queue[tuple[float, str | bytes]] = asyncio.Queue()
        self.jobs = JobTable()
        self.registered_at: float | None = None
        self.last_inbound = time.monotonic()
        self.frames_received = 0
        #: Longest time a frame waited on the queue before its handler ran.
        self.max_queue_wait_s = 0.0
        self.heartbeat_interval_s = 30
        self._abort_cause: str | None = None
        self._warm_up_task: asyncio.Task[None] | None = None
        self._drain_started = False

    # Connection ----------------------------------------------------------

    async def _connect(self) -> ClientConnection:
        cfg = self.config
        pings = 20.0 if cfg.ws_pings else None
        try:
            return await NoRedirectConnect(
                cfg.coordinator_url,
                additional_headers={"Authorization": f"Bearer {self.owner.token or ''}"},
                user_agent_header=f"mlx-provider/{self.owner.binary_version}",
                proxy=cfg.proxy,
                ping_interval=pings,
                ping_timeout=pings,
                compression=None,
                max_size=MAX_FRAME_BYTES,
                open_timeout=HANDSHAKE_TIMEOUT_S,
                close_timeout=cfg.send_timeout_s,
            )
        except InvalidStatus as exc:
            raise ConnectionLost("refused", f"HTTP {exc.response.status_code}") from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise ConnectionLost("refused", f"{type(exc).__name__}: {exc}") from None

    def abort(self, cause: str) -> None:
        """Drop the connection at once (no close handshake); run() raises ConnectionLost."""
        self._abort_cause = self._abort_cause or cause
        if self.ws is not None:
            self.ws.transport.abort()

    async def _receive_loop(self) -> None:
        assert self.ws is not None
        try:
            async for raw in self.ws:
                self.last_inbound = time.monotonic()
                self.frames_received += 1
                self.inbox.put_nowait((self.last_inbound, raw))
        except ConnectionClosed:
            pass
        code, reason = self.ws.close_code, self.ws.close_reason or ""
        if self._abort_cause:
            raise ConnectionLost(self._abort_cause)
        if code in FATAL_CLOSE_CODES:
            raise FatalRefusal(code, reason)
        what = CLOSE_REASONS.get(code or 0, "")
        detail = f"code {code} {what} {reason}".strip() if code else "connection lost"
        raise ConnectionLost("closed", detail, close_code=code)

    async def _race(
        self, aw: Awaitable[T], background: list[asyncio.Task[Any]], timeout: float
    ) -> T:
        """Await ``aw`` unless a background task fails first or time runs out."""
        fut = asyncio.ensure_future(aw)
        try:
            done, _ = await asyncio.wait(
                [fut, *background], timeout=timeout, return_when="FIRST_COMPLETED"
            )
            if fut in done:
                return fut.result()
            for task in done:
                task.result()  # raises the background task's error
            raise ConnectionLost("handshake_timeout", f"no hello_ack within {timeout:g} s")
        finally:
            fut.cancel()

    # Run -----------------------------------------------------------------

    async def run(self) -> None:
        self.ws = await self._connect()
        self.sender = Sender(self.ws, timeout=self.config.send_timeout_s, abort=self.abort)
        tasks: list[asyncio.Task[Any]] = []

        def start(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
            task = asyncio.create_task(coro, name=name)
            tasks.append(task)
            return task

        try:
            start(self._receive_loop(), "receive")
            start(self.sender.run(), "writer")
            await self._register(list(tasks))
            tick = heartbeat_tick(self.heartbeat_interval_s)
            harden(
                self.ws.transport.get_extra_info("socket"), unacked_timeout_s=watchdog_timeout(tick)
            )
            start(self._handle_loop(), "handler")
            start(
                heartbeat_loop(
                    self.sender,
                    self.owner.heartbeat_message,
                    tick=tick,
                    on_sent=self.owner.heartbeat_sent,
                ),
                "heartbeat",
            )
            start(
                watchdog_loop(
                    self._silence, lambda: self.abort("watchdog"), timeout=watchdog_timeout(tick)
                ),
                "watchdog",
            )
            drain = start(self._drain_when_asked(), "drain")
            done, _ = await asyncio.wait(tasks, return_when="FIRST_COMPLETED")
            if drain in done and drain.exception() is None:
                return
            for task in done:
                task.result()
            raise ConnectionLost("closed", "session task ended")
        except ConnectionLost as exc:
            stable = (
                self.registered_at is not None
                and time.monotonic() - self.registered_at >= self.owner.stable_after_s
            )
            raise ConnectionLost(
                self._abort_cause or exc.cause, exc.detail, stable=stable, close_code=exc.close_code
            ) from None
        except FatalRefusal:
            raise
        except Exception as exc:
            # A bug must cost a reconnect, never the process (launchd would
            # restart it, but without the in-memory state and with a delay).
            log.exception("session failed")
            raise ConnectionLost("internal_error", repr(exc)) from None
        finally:
            self.jobs.cancel_all("disconnect")
            if self._warm_up_task is not None:
                tasks.append(self._warm_up_task)
            for task in tasks:
                task.cancel()
            job_tasks = [j.task for j in self.jobs.running.values() if j.task is not None]
            for task in job_tasks:
                task.cancel()
            await asyncio.gather(*tasks, *job_tasks, return_exceptions=True)
            if self._abort_cause:
                self.ws.transport.abort()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await self.ws.close()
            self.owner.session_ended(self)

    def _silence(self) -> float:
        assert self.sender is not None
        return time.monotonic() - max(self.sender.last_ok, self.last_inbound)

    async def _register(self, background: list[asyncio.Task[Any]]) -> None:
        assert self.sender is not None
        await self._race(
            self.sender.send(self.owner.hello_message()), background, HANDSHAKE_TIMEOUT_S
        )
        _, raw = await self._race(self.inbox.get(), background, HANDSHAKE_TIMEOUT_S)
        ack = decode_coordinator_frame(raw)
        if not isinstance(ack, HelloAck):
            what = ack.message if isinstance(ack, Invalid) else message_type(ack)
            raise ConnectionLost("handshake_failed", f"expected hello_ack, got {what}")
        self.heartbeat_interval_s = ack.heartbeat_interval_s
        if ack.assigned_provider_token:
            # Persisted before use: a crash right after must not lose it.
            self.owner.adopt_token(ack.assigned_provider_token)
        if ack.required_binary_version:
            log.warning(
                "coordinator requires binary version %s (we are %s)",
                ack.required_binary_version,
                self.owner.binary_version,
            )
        self.registered_at = time.monotonic()
        self.owner.session_registered(self, ack)

    # Handler -------------------------------------------------------------

    async def _handle_loop(self) -> None:
        while True:
            received, raw = await self.inbox.get()
            self.max_queue_wait_s = max(self.max_queue_wait_s, time.monotonic() - received)
            msg = decode_coordinator_frame(raw)
            try:
                await self.dispatch(msg)
            except ConnectionLost:
                raise
            except Exception:
                # A bug in one handler must not end the session; the frame is logged.
                log.exception("handler failed for a %s frame", type(msg).__name__)

    async def dispatch(self, msg: Any) -> None:
        """Handle one decoded frame; quick: long work goes to its own task."""
        assert self.sender is not None
        match msg:
            case InferenceRequest():
                await self._on_inference_request(msg)
            case CancelRequest():
                await self._on_cancel(msg)
            case Preflight():
                await self.sender.send(self._preflight_ack(msg))
            case Drain():
                self.owner.request_drain("coordinator")
            case WarmUp():
                if self._warm_up_task is None or self._warm_up_task.done():
                    self._warm_up_task = asyncio.create_task(self._warm_up(), name="warm_up")
            case HelloAck():
                log.info("ignoring hello_ack after registration")
            case Invalid():
                # msg.type is already cut to MAX_TYPE_ECHO; the message may quote input.
                log.warning(
                    "nak %s: %s",
                    msg.code,
                    msg.message[:300],
                    extra={"in_reply_to": msg.type, "code": msg.code},
                )
                await self.sender.send(
                    Nak(
                        in_reply_to=msg.type or "unknown",
                        error=NakError(code=msg.code, message=msg.message[:500]),
                    )
                )

    def _refusal(self) -> Outcome | None:
        agent = self.owner
        if agent.state.draining:
            return Outcome(
                "error_queue_full", "provider is draining; retry on another provider", True
            )
        if agent.engine.info is None:
            return Outcome("error_model_not_loaded", "model is still loading; retry shortly", True)
        if agent.state.slots_free <= 0 and agent.state.in_flight < agent.state.slots_total:
            return Outcome(
                "error_queue_full",
                f"provider is holding back for its owner's machine "
                f"({agent.state.limit_reason or 'slot limit'}); retry on another provider",
                True,
            )
        if agent.state.slots_free <= 0:
            return Outcome(
                "error_queue_full",
                f"all {agent.state.slots_total} slots are busy; retry shortly",
                True,
            )
        return None

    async def _on_inference_request(self, msg: InferenceRequest) -> None:
        assert self.sender is not None
        if self.jobs.known(msg.request_id):
            log.warning("duplicate request", extra={"request_id": msg.request_id})
            await self.sender.send(
                Nak(
                    in_reply_to="inference_request",
                    error=NakError(
                        code="duplicate_request_id",
                        message=f"request_id {msg.request_id!r} was already received",
                    ),
                )
            )
            return
        job = Job(
            request_id=msg.request_id, stream=msg.stream, conversation_key=msg.conversation_key
        )
        outcome = self._refusal()
        request: ChatCompletionRequest | None = None
        if outcome is None:
            try:
                request = decode_chat_request(msg.body)
            except BadRequest as exc:
                outcome = Outcome("error_internal", f"invalid request body: {exc}")
        if outcome is not None or request is None:
            self._end(job, outcome or Outcome("error_internal", "invalid request"), started=False)
            return
        job.token_limit = request.token_limit() or self.config.default_max_tokens
        self.jobs.add(job)
        self.owner.job_started(job)
        log.info("job started", extra={"request_id": job.request_id, "stream": job.stream})
        job.task = asyncio.create_task(self._run_job(job, request), name=f"job:{job.request_id}")

    async def _run_job(self, job: Job, request: ChatCompletionRequest) -> None:
        assert self.sender is not None
        loop = asyncio.get_running_loop()
        deadline = loop.call_later(self.owner.request_timeout_s, job.request_cancel, "deadline")
        outcome: Outcome | None = None
        try:
            outcome = await relay(
                job,
                request,
                self.owner.engine,
                self.sender.send,
                model_id=self.owner.model_id,
                chunk_interval=self.config.chunk_interval_ms / 1000.0,
                post=self.sender.post,
            )
        except ConnectionLost:
            job.request_cancel("disconnect")
        except asyncio.CancelledError:
            job.request_cancel(job.cancel_reason or "disconnect")
            raise
        except Exception:
            log.exception("job failed", extra={"request_id": job.request_id})
            outcome = Outcome("error_internal", "internal error in the provider", True)
        finally:
            deadline.cancel()
            self._end(job, outcome or Outcome("cancelled", job.cancel_reason), started=True)

    def _end(self, job: Job, outcome: Outcome, *, started: bool) -> None:
        """The one place a request ends: end frame, slot, counters."""
        if not self.jobs.mark_ended(job.request_id):
            return
        if self.sender is not None:
            self.sender.post(end_frame(job, outcome))
        self.owner.job_finished(job, outcome, started=started)

    async def _on_cancel(self, msg: CancelRequest) -> None:
        assert self.sender is not None
        job = self.jobs.running.get(msg.request_id)
        extra = {"request_id": msg.request_id, "cancel_reason": msg.reason}
        if job is not None:
            log.info("cancel", extra=extra)
            job.request_cancel(f"cancel_request:{msg.reason}" if msg.reason else "cancel_request")
        elif self.jobs.ended(msg.request_id):
            log.info("cancel for a request that already ended; ignored", extra=extra)
        else:
            # Unknown id: answer anyway, so the coordinator can close its books.
            log.info("cancel for an unknown request", extra=extra)
            self._end(
                Job(request_id=msg.request_id, stream=False),
                Outcome("cancelled", "unknown request_id"),
                started=False,
            )

    def _preflight_ack(self, msg: Preflight) -> PreflightAck:
        agent = self.owner
        info = agent.engine.info
        max_ctx = info.max_context_tokens if info else 0
        reason = None
        if agent.state.draining:
            reason = "draining"
        elif info is None:
            reason = "model_not_loaded"
        elif msg.estimated_tokens > max_ctx:
            reason = "context_exceeds_capacity"
        elif agent.state.slots_free <= 0:
            reason = "queue_full"
        elif agent.state.state == "degraded":
            reason = "unhealthy"
        wait_ms = 0
        if reason in (None, "queue_full"):
            # Slots, memory and the prompts queued ahead, from what the engine measured.
            wait_ms = agent.engine.estimated_wait_ms(msg.estimated_tokens)
        return PreflightAck(
            request_id=msg.request_id,
            accepted=reason is None,
            estimated_wait_ms=wait_ms,
            reason=reason,
            max_context_tokens=max_ctx,
        )

    async def _warm_up(self) -> None:
        agent = self.owner
        agent.set_degraded("warming_up")
        try:
            if agent.engine.info is not None:  # else the load ends with a generation anyway
                await agent.engine.warm_up()
        except Exception:
            log.exception("warm-up generation failed")
        finally:
            agent.clear_degraded("warming_up")

    # Drain ---------------------------------------------------------------

    async def _drain_when_asked(self) -> None:
        await self.owner.drain_requested.wait()
        await self._drain()

    async def _drain(self) -> None:
        """Stop taking work, finish what runs, report, close. Returns when closed."""
        assert self.sender is not None and self.ws is not None
        timeout = self.config.drain_timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self.sender.send(self._drain_status("starting"))
        while self.jobs.running:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(1.0, remaining)):
                    await self.jobs.wait_idle()
            if self.jobs.running:
                await self.sender.send(self._drain_status("in_progress"))
        if self.jobs.running:
            log.warning("drain timed out; cancelling %d job(s)", len(self.jobs.running))
            tasks = [j.task for j in self.jobs.running.values() if j.task is not None]
            self.jobs.cancel_all("drain_timeout")
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.sender.send(self._drain_status("timeout_skipped"))
        else:
            await self.sender.send(self._drain_status("complete"))
        await self.ws.close(1000, "drained")

    def _drain_status(self, phase: str) -> DrainStatus:
        jobs = list(self.jobs.running.values())
        tps = max(1.0, self.owner.throughput_estimate())
        left = max((max(0, j.token_limit - j.completion_tokens) / tps for j in jobs), default=0.0)
        return DrainStatus(
            phase=phase,  # type: ignore[arg-type]
            inflight_requests=len(jobs),
            estimated_drain_seconds=round(min(left, self.config.drain_timeout_s), 3),
        )
