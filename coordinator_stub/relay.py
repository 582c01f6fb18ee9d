"""Requests to providers: routing, the relay of their answers, cancel, warm-up, rekey.

Requests to a provider are :class:`Flight` objects: the provider's chunk and
end frames, or a :class:`Gone` marker when the session is lost, arrive on the
flight's queue, so a waiting buyer can never hang on a dead provider.

Response frames follow the coordinator's ``relay.go``: an undecodable frame
or one for an unknown request is dropped (the request times out); on a
session with a tier-2 leg every chunk and end frame must be encrypted, and
a frame that fails to open, replays a sequence number, names an unknown
request or comes in plaintext closes the session (TCP close, no close
frame: Go's ``conn.Close()``) and fails its requests.

When settlement is on, buyer requests carry ``settlement`` metadata
(:mod:`coordinator_stub.settlement`) and each end frame's receipt is verified
against what the stub relayed to the buyer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from . import messages
from . import settlement as billing
from .catalog import Catalog
from .config import StubConfig
from .events import EventBus
from .frames import (
    FrameError,
    ResponseChunk,
    ResponseEnd,
    parse_chunk,
    parse_chunk_plaintext_envelope,
    parse_end,
    parse_rekey_confirmation,
    parse_rekey_response,
    parse_response_envelope,
)
from .observe import Changes
from .pool import Pool, ProviderRecord, RequestKind
from .rules import contains_control_char
from .session import ProbeFailed, ProviderSession, SessionClosed
from .tier2 import AAD, CoordinatorKey, Epoch, Tier2Error, decode_aad, parse_x25519_public, seal

logger = logging.getLogger(__name__)


#: Body of the stub's own warm-up request (the real coordinator's gate).
WARMUP_BODY = json.dumps(
    {
        "messages": [{"role": "user", "content": "Reply with ok."}],
        "max_tokens": 2,
        "stream": False,
    },
    separators=(",", ":"),
)

#: How long a finished request's id is remembered for late encrypted frames.
RETIRED_TTL_S = 300.0

#: The buyer API's account (the stub has no buyer accounts).
ACCOUNT_ID = "coordinator-stub-buyer"


class NoProviderAvailable(Exception):
    """No routable provider (ready, free slot, admitted for routing)."""


class SettlementRequired(Exception):
    """Settlement ``enforce`` and the request's route snapshot cannot be built."""


@dataclass(frozen=True)
class Gone:
    """End of a flight without an end frame (session lost, probe failed...)."""

    cause: str
    detail: str = ""


FlightItem = ResponseChunk | ResponseEnd | Gone


@dataclass
class SettlementContext:
    """What the receipt of one request is verified against."""

    snapshot: billing.RouteSnapshot
    digest: str
    receipt_key: bytes
    metadata: dict[str, Any]


@dataclass
class ReceiptOutcome:
    """The verdict on a request's receipt (``missing`` when none came)."""

    outcome: str
    reason: str
    result: billing.VerifyResult | None = None


@dataclass(eq=False)
class Flight:
    """One request sent to a provider and what came back for it.

    ``queue`` yields the provider's chunks, then exactly one
    :class:`~coordinator_stub.frames.ResponseEnd` or :class:`Gone`.
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
    end: ResponseEnd | None = None
    failure: Gone | None = None
    finished: bool = False
    cancel_reason: str | None = None
    grace_handle: asyncio.TimerHandle | None = None
    start_unix_ms: int = 0
    settlement: SettlementContext | None = None
    receipt: ReceiptOutcome | None = None
    tracker: billing.OutputTracker = field(default_factory=billing.OutputTracker)
    body_parts: list[str] = field(default_factory=list)

    async def wait_end(self, timeout: float) -> ResponseEnd | Gone | None:
        """Consume the queue up to the end; ``None`` if ``timeout`` passes first."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    item = await self.queue.get()
                    if isinstance(item, ResponseEnd | Gone):
                        return item
        except TimeoutError:
            return None


@dataclass
class FrameOutcome:
    """What the relay made of a provider frame (for the frame log)."""

    message: Any = None
    error: str | None = None
    action: str | None = None


@dataclass
class RekeyState:
    """An in-band rekey handshake in progress on one session."""

    rekey_id: str
    key: CoordinatorKey
    old_kid: str
    expires_at: str
    expires: float
    response: asyncio.Future[str]
    committed: asyncio.Future[str]


def unix_ms() -> int:
    return time.time_ns() // 1_000_000


def rfc3339_nano(when: dt.datetime) -> str:
    """Go's ``time.RFC3339Nano`` of a UTC time (trailing zeros trimmed)."""
    base = when.strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{when.microsecond:06d}000".rstrip("0")
    return base + (f".{fraction}" if fraction else "") + "Z"


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
        catalog: Catalog | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.bus = bus
        self.changes = changes
        self.sessions = sessions
        self.catalog = catalog
        self.flights: dict[str, Flight] = {}
        self._retired: dict[tuple[int, str], tuple[bool, float]] = {}
        self._rekey_locks: dict[int, asyncio.Lock] = {}
        self.rekeys: dict[str, int] = {"committed": 0, "failed": 0, "closed": 0}

    # ------------------------------------------------------------------
    # Provider frames

    def on_chunk(self, session: ProviderSession, payload: str) -> FrameOutcome:
        """An ``inference_response_chunk`` (``handleInferenceChunk``)."""
        try:
            envelope = parse_response_envelope(payload, "encryptedInferenceResponseChunk")
        except FrameError as exc:
            return FrameOutcome(error=str(exc), action="dropped")
        if contains_control_char(envelope.request_id):
            return FrameOutcome(error="request_id contains control characters", action="dropped")
        if envelope.encrypted:
            return self._encrypted(session, envelope, "inference_response_chunk")
        if session.epoch is not None:
            self._close_tier2(
                session, envelope.request_id, "tier2 encrypted response chunk required"
            )
            return FrameOutcome(error="plaintext chunk on a tier-2 session", action="closed")
        try:
            chunk = parse_chunk(payload)
        except FrameError as exc:
            return FrameOutcome(error=str(exc), action="dropped")
        return self._deliver_chunk(session, chunk, count_seq=True)

    def on_end(self, session: ProviderSession, payload: str) -> FrameOutcome:
        """An ``inference_response_end`` (``handleInferenceEnd``)."""
        try:
            envelope = parse_response_envelope(payload, "encryptedInferenceResponseEnd")
        except FrameError as exc:
            return FrameOutcome(error=str(exc), action="dropped")
        if contains_control_char(envelope.request_id):
            return FrameOutcome(error="request_id contains control characters", action="dropped")
        if envelope.encrypted:
            return self._encrypted(session, envelope, "inference_response_end")
        if session.epoch is not None:
            self._close_tier2(session, envelope.request_id, "tier2 encrypted response end required")
            return FrameOutcome(error="plaintext end on a tier-2 session", action="closed")
        try:
            end = parse_end(payload)
        except FrameError as exc:
            return FrameOutcome(error=str(exc), action="dropped")
        return self._deliver_end(session, end)

    def _encrypted(self, session: ProviderSession, envelope: Any, kind: str) -> FrameOutcome:
        epoch = session.epoch
        if epoch is None:
            # Go tries to open it and fails: the same close as a bad tag.
            reason = "encrypted frame without a tier-2 session"
            self._close_tier2(session, envelope.request_id, reason)
            return FrameOutcome(error=reason, action="closed")
        try:
            aad, _ = decode_aad(envelope.enc.aad)
        except Tier2Error as exc:
            self._close_tier2(session, envelope.request_id, str(exc))
            return FrameOutcome(error=str(exc), action="closed")
        request_id = aad.request_id or envelope.request_id
        if contains_control_char(request_id):
            return FrameOutcome(
                error="AAD request_id contains control characters", action="dropped"
            )
        flight = self.flights.get(request_id)
        if flight is None or flight.session is not session:
            retired = self._retired.get((session.session_id, request_id))
            if retired is None or time.monotonic() - retired[1] > RETIRED_TTL_S:
                reason = f"unknown encrypted {kind} request_id"
                self._close_tier2(session, request_id, reason)
                return FrameOutcome(error=reason, action="closed")
            stream = retired[0]
        else:
            stream = flight.stream
        expected = AAD(
            kind, "p2c", request_id, stream, session.provider_id, session.assigned_id, aad.seq
        )
        try:
            plaintext = epoch.open_p2c(expected, True, envelope.enc)
        except Tier2Error as exc:
            self._close_tier2(session, request_id, str(exc))
            return FrameOutcome(error=str(exc), action="closed")
        if flight is None or flight.session is not session:
            logger.warning(
                "late encrypted %s for retired request dropped provider_id=%s request_id=%s",
                kind,
                session.provider_id,
                request_id,
            )
            return FrameOutcome(error="late frame for a retired request", action="dropped")
        if kind == "inference_response_end":
            try:
                end = parse_end(plaintext, encrypted=True)
            except FrameError as exc:
                self._close_tier2(session, request_id, str(exc))
                return FrameOutcome(error=str(exc), action="closed")
            # The AAD's request id is the one that counts.
            end = _with_request_id(end, request_id)
            return self._deliver_end(session, end)
        if epoch.response_chunk_plaintext_envelope:
            try:
                chunk = parse_chunk_plaintext_envelope(plaintext, request_id)
            except FrameError as exc:
                self._close_tier2(session, request_id, str(exc))
                return FrameOutcome(error=str(exc), action="closed")
            return self._deliver_chunk(session, chunk, count_seq=True)
        # Legacy: the plaintext is the data, the AEAD sequence is the seq.
        chunk = ResponseChunk(
            request_id=request_id,
            seq=aad.seq,
            data=plaintext.decode("utf-8", "replace"),
            encrypted=True,
        )
        return self._deliver_chunk(session, chunk, count_seq=False)

    def _deliver_chunk(
        self, session: ProviderSession, chunk: ResponseChunk, *, count_seq: bool
    ) -> FrameOutcome:
        if contains_control_char(chunk.request_id):
            return FrameOutcome(chunk, "request_id contains control characters", "dropped")
        flight = self.flights.get(chunk.request_id)
        if flight is None or flight.session is not session:
            logger.warning(
                "unknown inference_response_chunk request_id provider_id=%s request_id=%s",
                session.provider_id,
                chunk.request_id,
            )
            return FrameOutcome(chunk, "unknown request_id", "dropped")
        if count_seq:
            if chunk.seq != flight.next_seq:
                flight.seq_gaps += 1
                self.pool.seq_gaps += 1
                logger.warning(
                    "chunk seq gap provider_id=%s request_id=%s expected=%d got=%d",
                    session.provider_id,
                    chunk.request_id,
                    flight.next_seq,
                    chunk.seq,
                )
            flight.next_seq = chunk.seq + 1
        else:
            flight.next_seq += 1
        if flight.settlement is not None:
            if flight.stream:
                flight.tracker.feed(chunk.data)
            else:
                flight.body_parts.append(chunk.data)
        flight.queue.put_nowait(chunk)
        return FrameOutcome(chunk)

    def _deliver_end(self, session: ProviderSession, end: ResponseEnd) -> FrameOutcome:
        if contains_control_char(end.request_id):
            return FrameOutcome(end, "request_id contains control characters", "dropped")
        flight = self.flights.get(end.request_id)
        if flight is None or flight.session is not session:
            logger.warning(
                "unknown inference_response_end request_id provider_id=%s request_id=%s",
                session.provider_id,
                end.request_id,
            )
            return FrameOutcome(end, "unknown request_id", "dropped")
        if end.chunks_sent != flight.next_seq:
            logger.warning(
                "end frame chunks_sent mismatch provider_id=%s request_id=%s chunks_sent=%d "
                "seen=%d",
                session.provider_id,
                end.request_id,
                end.chunks_sent,
                flight.next_seq,
            )
        flight.end = end
        if flight.settlement is not None:
            flight.receipt = self._verify_receipt(flight, end)
        flight.queue.put_nowait(end)
        logger.info(
            "request finished provider_id=%s request_id=%s kind=%s status=%s completion_tokens=%s",
            session.provider_id,
            end.request_id,
            flight.kind,
            end.status,
            end.usage.completion_tokens,
        )
        self._finish(flight, end.status)
        self._after_request(session)
        return FrameOutcome(end)

    def on_nak_request(self, session: ProviderSession, request_id: str, cause: str) -> bool:
        """Fail the request a nak names (``duplicate_request_id`` or the http-only fallback)."""
        flight = self.flights.get(request_id)
        if flight is None or flight.session is not session:
            return False
        self._fail_flight(flight, cause, f"provider nak for {request_id}")
        self._after_request(session)
        return True

    def close_tier2_for_nak(self, session: ProviderSession, request_id: str, code: str) -> None:
        """A ``tier2_*`` nak: fail the request (or all of them) and close the session."""
        self._close_tier2(session, request_id, code)

    def _close_tier2(self, session: ProviderSession, request_id: str, reason: str) -> None:
        """``closeProviderForTier2AEADFailure``: fail, mark unavailable, TCP close."""
        logger.warning(
            "tier2 encrypted leg closed provider_id=%s request_id=%s reason=%s",
            session.provider_id,
            request_id or "unknown",
            reason,
        )
        flight = self.flights.get(request_id)
        if flight is not None and flight.session is session:
            self._fail_flight(flight, "tier2_session_closed", reason)
        else:
            self.fail_flights(session, "tier2_session_closed", reason)
        session.close_transport("tier2_session_closed", reason)

    # ------------------------------------------------------------------
    # Settlement

    def _settlement_for(
        self,
        record: ProviderRecord,
        session: ProviderSession,
        request_id: str,
        body: str,
        start_ms: int,
    ) -> SettlementContext | None:
        """The route snapshot of a buyer request (``recordRouteSnapshot``)."""
        mode = self.config.settlement_mode
        if mode == "off":
            return None

        def skip(reason: str) -> None:
            if mode == "enforce":
                raise SettlementRequired(
                    f"verified model settlement enforce requires route snapshot: {reason}"
                )
            return None

        if record.receipt_key is None:
            return skip("missing provider receipt key")
        reported = record.model_hash.strip()
        if not billing.HEX64.fullmatch(reported):
            return skip("invalid provider model hash")
        if self.catalog is None:
            return skip("missing catalog material")
        expected = self.catalog.feed.expected_model_hash(record.model_id)
        if expected is None:
            return skip("missing catalog material")
        if record.hash_status != "verified" or expected != reported:
            return skip("model hash not verified")
        try:
            prompt = billing.prompt_hash(body)
        except billing.SettlementError as exc:
            raise SettlementRequired(f"prompt hash: {exc}") from None
        key_id = billing.receipt_key_id(record.receipt_key)
        snapshot = billing.RouteSnapshot(
            account_scope=billing.account_scope(ACCOUNT_ID),
            request_id=request_id,
            attempt_n=0,
            provider_id=record.provider_id,
            provider_session_id=session.assigned_id or None,
            provider_generation_id=None,
            paid_entrypoint=billing.PAID_ENTRYPOINT,
            provider_receipt_key_id=key_id,
            provider_receipt_key_source=billing.KEY_SOURCE_AUTH_SESSION,
            model_id=record.model_id,
            provider_reported_model_hash=reported,
            expected_catalog_model_hash=expected,
            catalog_id=self.catalog.release_id,
            catalog_body_digest=self.catalog.feed.sha256,
            catalog_signature_key_id=self.catalog.signer_key_id,
            catalog_signature_pubkey_fingerprint=self.catalog.key.fingerprint,
            catalog_expires_at_unix_ms=self.catalog.expires_at_unix_ms,
            spec008_hash_status="verified",
            route_snapshot_policy_version=billing.ROUTE_SNAPSHOT_POLICY_VERSION,
            route_snapshot_mode=mode,
            route_decision_ts_unix_ms=unix_ms(),
            request_start_ts_unix_ms=start_ms,
            pending_deadline_seconds=self.config.pending_deadline_seconds,
            prompt_hash_basis=billing.PROMPT_HASH_BASIS,
            prompt_hash=prompt,
        )
        try:
            digest = snapshot.digest()
        except billing.SettlementError as exc:
            raise SettlementRequired(str(exc)) from None
        return SettlementContext(
            snapshot, digest, record.receipt_key, billing.metadata(snapshot, digest)
        )

    def _terminal_state(self, flight: Flight, end: ResponseEnd) -> str:
        if end.status == "complete":
            return billing.NORMAL_DONE
        if flight.cancel_reason == "buyer_disconnected":
            return billing.BUYER_CANCEL
        if flight.cancel_reason == "timeout" or end.status == "provider_timeout":
            return billing.GATEWAY_TIMEOUT
        return billing.PROVIDER_ERROR

    def _verify_receipt(self, flight: Flight, end: ResponseEnd) -> ReceiptOutcome:
        ctx = flight.settlement
        assert ctx is not None
        pid = flight.provider_id
        if not end.receipt:
            self.pool.record_receipt(pid, "missing", "missing_receipt")
            logger.warning(
                "settlement receipt missing provider_id=%s request_id=%s", pid, flight.request_id
            )
            return ReceiptOutcome("missing", "missing_receipt")
        terminal = self._terminal_state(flight, end)
        ts = end.terminal_state_ts_unix_ms
        if flight.stream:
            output = (
                flight.tracker.output(terminal, ts)
                if flight.tracker.error is None
                else billing.unavailable_output(terminal, ts)
            )
        else:
            output = billing.output_from_chat_response(
                "".join(flight.body_parts), terminal, ts
            ) or billing.unavailable_output(terminal, ts)
        output_hash, available = "", output.available
        if available:
            try:
                output_hash = output.digest()
            except billing.SettlementError:
                available = False
        delivered = output.output_prefix_end_byte - output.output_prefix_start_byte
        usage = billing.ledger_usage(
            terminal, delivered, end.usage.prompt_tokens or 0, end.usage.completion_tokens or 0
        )
        snapshot = ctx.snapshot
        result = billing.verify_receipt(
            billing.VerifyInput(
                header=end.receipt,
                provider_receipt_pubkey=ctx.receipt_key,
                route_snapshot=snapshot,
                account_scope=snapshot.account_scope,
                request_id=snapshot.request_id,
                attempt_n=snapshot.attempt_n,
                provider_id=snapshot.provider_id,
                provider_receipt_key_id=snapshot.provider_receipt_key_id,
                terminal_state=terminal,
                terminal_state_ts_unix_ms=ts,
                output_hash=output_hash,
                output_prefix_start_byte=output.output_prefix_start_byte,
                output_prefix_end_byte=output.output_prefix_end_byte,
                expected_usage=usage,
                receipt_received_unix_ms=unix_ms(),
                canonical_hashes_available=available,
            )
        )
        if result.ok:
            self.pool.record_receipt(pid, "verified")
            logger.info(
                "settlement receipt verified provider_id=%s request_id=%s outcome=%s",
                pid,
                flight.request_id,
                result.outcome,
            )
        else:
            self.pool.record_receipt(pid, "failed", result.reason)
            logger.warning(
                "settlement receipt failed provider_id=%s request_id=%s reason=%s",
                pid,
                flight.request_id,
                result.reason,
            )
        return ReceiptOutcome(result.outcome, result.reason, result)

    # ------------------------------------------------------------------
    # Dispatch

    async def dispatch(
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

        Without ``session`` the pool picks the least-loaded routable provider
        (raises :class:`NoProviderAvailable`). On a tier-2 session a due
        rekey runs first (in band), or the session is closed so the provider
        reconnects with fresh keys. The write is bounded by
        ``probe_timeout_s``; its failure, like any loss of the session,
        arrives on the flight's queue as :class:`Gone`.
        """
        start_ms = unix_ms()
        explicit = session is not None
        for _ in range(8):
            if session is None:
                record = self.pool.pick(model)
                if record is None or record.provider_id not in self.sessions:
                    raise NoProviderAvailable("no ready provider with a free slot")
                session = self.sessions[record.provider_id]
            if session.http_only:
                raise NoProviderAvailable(f"{session.provider_id} takes no WebSocket requests")
            if await self._rekey_before_dispatch(session):
                break
            if explicit:
                raise NoProviderAvailable(f"{session.provider_id} closed for rekey")
            session = None
        else:
            raise NoProviderAvailable("no ready provider with a free slot")
        record = self.pool.get(session.provider_id)
        prefix = "req" if kind == "buyer" else "warmup"
        request_id = request_id or f"{prefix}-{uuid.uuid4()}"
        context = None
        if kind == "buyer" and record is not None:
            context = self._settlement_for(record, session, request_id, body, start_ms)
        flight = Flight(
            request_id=request_id,
            provider_id=session.provider_id,
            session=session,
            kind=kind,
            stream=stream,
            created=time.monotonic(),
            start_unix_ms=start_ms,
            settlement=context,
        )
        metadata = None if context is None else context.metadata
        if session.epoch is not None:
            plaintext = messages.inference_request_plaintext(body).encode()
            aad = AAD(
                "inference_request",
                "c2p",
                request_id,
                stream,
                session.provider_id,
                session.assigned_id,
                0,
            )
            enc = session.epoch.seal_c2p(aad, plaintext)
            session.epoch.requests_dispatched += 1
            frame = messages.encrypted_inference_request(request_id, stream, enc, body, metadata)
        else:
            frame = messages.inference_request(request_id, stream, body, metadata)
        self.flights[request_id] = flight
        self.bus.publish_all(
            self.pool.begin_request(
                session.provider_id, session.session_id, request_id, kind, stream
            )
        )
        logger.info(
            "request routed request_id=%s provider_id=%s kind=%s stream=%s encrypted=%s "
            "settlement=%s",
            request_id,
            session.provider_id,
            kind,
            stream,
            session.epoch is not None,
            context is not None,
        )
        written = session.send(frame, bound=self.config.probe_timeout_s)
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
        flight.session.send(messages.cancel_request(request_id, reason))
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
        self._after_request(flight.session)

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

    def fail_all(self, cause: str, detail: str) -> None:
        for flight in list(self.flights.values()):
            self._fail_flight(flight, cause, detail)

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
        now = time.monotonic()
        self._retired[(flight.session.session_id, flight.request_id)] = (flight.stream, now)
        if len(self._retired) > 4096:
            for key, (_, when) in list(self._retired.items()):
                if now - when > RETIRED_TTL_S:
                    del self._retired[key]
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

    def active(self, session: ProviderSession) -> list[Flight]:
        return [f for f in self.flights.values() if f.session is session]

    async def warm_up(self, session: ProviderSession) -> None:
        pid, sid = session.provider_id, session.session_id
        while not session.closed:
            session.reported_ready.clear()
            try:
                flight = await self.dispatch(
                    WARMUP_BODY, stream=False, kind="warmup", session=session
                )
            except NoProviderAvailable:
                return
            outcome = await flight.wait_end(self.config.warmup_timeout_s)
            if isinstance(outcome, Gone):
                return
            if (
                isinstance(outcome, ResponseEnd)
                and outcome.status == "complete"
                and (outcome.usage.completion_tokens or 0) > 0
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
    # Rekey (section 7.2)

    def rekey_reason(self, session: ProviderSession) -> str | None:
        """``tier2RekeyReason``: why the session's key epoch is spent, if it is."""
        epoch = session.epoch
        if epoch is None:
            return None
        if epoch.requests_dispatched >= self.config.rekey_after_requests:
            return "request_threshold"
        if time.monotonic() - epoch.started_at >= self.config.rekey_after_seconds:
            return "age_threshold"
        return None

    async def _rekey_before_dispatch(self, session: ProviderSession) -> bool:
        """Whether ``session`` may take a request now (after a rekey if one is due)."""
        if session.rekey is not None:
            await self._wait_rekey(session)
            return not session.closed
        reason = self.rekey_reason(session)
        if reason is None:
            return True
        assert session.epoch is not None
        if session.epoch.in_band_rekey:
            return await self.rekey(session, reason)
        if self.active(session):
            return False
        self._close_for_rekey(session, reason)
        return False

    def _after_request(self, session: ProviderSession) -> None:
        """After an end, cancel or nak: rekey a spent epoch once the session is idle."""
        reason = self.rekey_reason(session)
        if reason is None or session.closed or self.active(session) or session.rekey is not None:
            return
        assert session.epoch is not None
        if session.epoch.in_band_rekey:
            task = asyncio.get_running_loop().create_task(self.rekey(session, reason))
            session.add_task(task)  # type: ignore[arg-type]
        else:
            self._close_for_rekey(session, reason)

    def _close_for_rekey(self, session: ProviderSession, reason: str) -> None:
        """``closeProviderForTier2Rekey``: the provider reconnects with fresh keys."""
        logger.info(
            "tier2 rekey by reconnect provider_id=%s reason=%s", session.provider_id, reason
        )
        self.rekeys["closed"] += 1
        session.close_transport("tier2_rekey", reason)

    async def _wait_rekey(self, session: ProviderSession) -> None:
        lock = self._rekey_locks.setdefault(session.session_id, asyncio.Lock())
        async with lock:
            pass

    async def rekey(
        self, session: ProviderSession, reason: str = "request_threshold", *, force: bool = False
    ) -> bool:
        """Run an in-band AEAD rekey on ``session``; whether it committed.

        Without ``force`` nothing happens unless the epoch is spent (another
        caller may have rekeyed it meanwhile). Waits until the session has no
        request in flight; new requests wait for the rekey. A failure closes
        the session (the provider reconnects).
        """
        lock = self._rekey_locks.setdefault(session.session_id, asyncio.Lock())
        async with lock:
            if session.closed or session.epoch is None:
                return False
            if not force and self.rekey_reason(session) is None:
                return True
            await self.changes.wait_for(
                lambda: not self.active(session) or session.closed,
                timeout=self.config.request_timeout_s,
                what="an idle session to rekey",
            )
            if session.closed:
                return False
            try:
                await self._rekey(session, reason)
            except (Tier2Error, FrameError, TimeoutError, SessionClosed) as exc:
                session.rekey = None
                self.rekeys["failed"] += 1
                logger.warning("tier2 rekey failed provider_id=%s: %s", session.provider_id, exc)
                self.fail_flights(session, "tier2_rekey_failed", str(exc))
                session.close_transport("tier2_rekey_failed", str(exc))
                return False
            self.rekeys["committed"] += 1
            return True

    async def _rekey(self, session: ProviderSession, reason: str) -> None:
        epoch = session.epoch
        assert epoch is not None
        loop = asyncio.get_running_loop()
        timeout = self.config.hello_timeout_s
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=timeout)
        state = RekeyState(
            rekey_id=str(uuid.uuid4()),
            key=CoordinatorKey(),
            old_kid=epoch.kid,
            expires_at=rfc3339_nano(expires),
            expires=time.monotonic() + timeout,
            response=loop.create_future(),
            committed=loop.create_future(),
        )
        session.rekey = state
        logger.info(
            "tier2 rekey start provider_id=%s rekey_id=%s reason=%s",
            session.provider_id,
            state.rekey_id,
            reason,
        )
        await session.send(
            messages.rekey_request(
                rekey_id=state.rekey_id,
                assigned_id=session.assigned_id,
                reason="age_threshold" if reason == "age_threshold" else "request_threshold",
                old_kid=state.old_kid,
                coordinator_ecdh_public_key=state.key.public_b64url,
                expires_at=state.expires_at,
                response_chunk_plaintext_envelope=epoch.response_chunk_plaintext_envelope,
            )
        )
        payload = await asyncio.wait_for(state.response, timeout)
        response = parse_rekey_response(payload)
        if (
            response.type != "aead_rekey_response"
            or response.version != 1
            or response.rekey_id != state.rekey_id
            or response.assigned_id != session.assigned_id
            or response.old_kid != state.old_kid
            or not response.new_kid
            or response.new_kid == state.old_kid
        ):
            raise Tier2Error("aead_rekey_response does not match the request")
        if time.monotonic() > state.expires:
            raise Tier2Error("aead_rekey_response after expiry")
        provider_public = parse_x25519_public(response.provider_ecdh_public_key)
        keys = state.key.derive(provider_public, session.provider_id, session.assigned_id)
        if keys.kid != response.new_kid:
            raise Tier2Error("aead_rekey_response new_kid does not match the derived kid")
        proof = messages.rekey_proof(
            rekey_id=state.rekey_id,
            provider_id=session.provider_id,
            assigned_id=session.assigned_id,
            old_kid=state.old_kid,
            new_kid=keys.kid,
            provider_ecdh_public_key=response.provider_ecdh_public_key,
            coordinator_ecdh_public_key=state.key.public_b64url,
            expires_at=state.expires_at,
        )
        commit_aad = AAD(
            "aead_rekey_commit",
            "c2p",
            state.rekey_id,
            False,
            session.provider_id,
            session.assigned_id,
            0,
        )
        enc = seal(keys.c2p_key, keys.c2p_nonce_base, keys.kid, commit_aad, proof)
        await session.send(
            messages.rekey_commit(
                rekey_id=state.rekey_id,
                assigned_id=session.assigned_id,
                old_kid=state.old_kid,
                new_kid=keys.kid,
                enc=enc,
            )
        )
        payload = await asyncio.wait_for(
            state.committed, max(0.0, state.expires - time.monotonic()) + 1.0
        )
        confirmation = parse_rekey_confirmation(payload)
        if (
            confirmation.type != "aead_rekey_committed"
            or confirmation.version != 1
            or not confirmation.encrypted
            or confirmation.rekey_id != state.rekey_id
            or confirmation.assigned_id != session.assigned_id
            or confirmation.old_kid != state.old_kid
            or confirmation.new_kid != keys.kid
        ):
            raise Tier2Error("aead_rekey_committed does not match the commit")
        new_epoch = Epoch(
            keys=keys,
            response_chunk_plaintext_envelope=epoch.response_chunk_plaintext_envelope,
            in_band_rekey=epoch.in_band_rekey,
            started_at=time.monotonic(),
        )
        committed_aad = AAD(
            "aead_rekey_committed",
            "p2c",
            state.rekey_id,
            False,
            session.provider_id,
            session.assigned_id,
            0,
        )
        opened = new_epoch.open_p2c(committed_aad, True, confirmation.enc)
        if opened != proof:
            raise Tier2Error("aead_rekey_committed proof mismatch")
        new_epoch.c2p_counter = 1
        session.epoch = new_epoch
        session.rekey = None
        self.pool.record_rekey(session.provider_id, session.session_id)
        logger.info(
            "tier2 rekey committed provider_id=%s rekey_id=%s new_kid=%s",
            session.provider_id,
            state.rekey_id,
            keys.kid,
        )
        self.changes.notify()

    def on_rekey_frame(self, session: ProviderSession, kind: str, payload: str) -> FrameOutcome:
        """``aead_rekey_response`` / ``aead_rekey_committed`` for the rekey in progress."""
        state: RekeyState | None = session.rekey
        if state is None:
            return FrameOutcome(error="no rekey in progress", action="dropped")
        future = state.response if kind == "aead_rekey_response" else state.committed
        if future.done():
            return FrameOutcome(error="duplicate rekey frame", action="dropped")
        future.set_result(payload)
        return FrameOutcome()


def _with_request_id(end: ResponseEnd, request_id: str) -> ResponseEnd:
    if end.request_id == request_id:
        return end
    return dataclasses.replace(end, request_id=request_id)
