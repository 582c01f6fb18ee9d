"""Requests to providers: routing, the relay of their answers, cancel and warm-up.

Requests to a provider are :class:`Flight` objects: the provider's chunk and
end frames, or a :class:`Gone` marker when the session is lost, arrive on the
flight's queue, so a waiting buyer can never hang on a dead provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field

import msgspec

from provider.coordinator.messages import (
    CancelRequest,
    InferenceRequest,
    InferenceResponseChunk,
    InferenceResponseEnd,
    message_type,
)

from .config import StubConfig
from .events import EventBus
from .observe import Changes
from .pool import Pool, RequestKind
from .session import ProbeFailed, ProviderSession, SessionClosed

logger = logging.getLogger(__name__)


#: Body of the stub's own warm-up request (the real coordinator's gate).
WARMUP_BODY = msgspec.json.encode(
    {
        "messages": [{"role": "user", "content": "Reply with ok."}],
        "max_tokens": 2,
        "stream": False,
    }
).decode()


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
    :class:`~provider.coordinator.messages.InferenceResponseEnd` or :class:`Gone`.
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


class Relay:
    """Every request in flight to a provider, by request_id.

    ``sessions`` is the live map of connected providers (owned by the
    endpoint), read to route a request.
    """

    def __init__(
        self,
        config: StubConfig,
        pool: Pool,
        bus: EventBus,
        changes: Changes,
        sessions: dict[str, ProviderSession],
    ) -> None:
        self.config = config
        self.pool = pool
        self.bus = bus
        self.changes = changes
        self.sessions = sessions
        self.flights: dict[str, Flight] = {}

    def on_response(
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

    def fail_flights(self, session: ProviderSession, cause: str, detail: str) -> None:
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

    async def warm_up(self, session: ProviderSession) -> None:
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
