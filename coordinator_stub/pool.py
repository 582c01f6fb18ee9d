"""Provider pool: the coordinator's view of its providers, as plain state.

Nothing here does I/O or reads a clock: every mutation takes ``now`` (a
:func:`time.monotonic` reading) and returns the pool events it caused, as
dicts ready for :class:`~coordinator_stub.events.EventBus`. The WebSocket and
HTTP sides call it; tests can drive it directly.

A provider's *effective* state combines what it reports with what the stub
knows:

* ``unavailable`` when its session is gone (disconnect grace) or when it
  reported ``unavailable`` itself (recovery from that is a fresh
  registration, so later reports are refused until it reconnects);
* ``draining`` when it reports draining;
* ``degraded`` until it passed the warm-up gate;
* otherwise the state it reports (``ready``, ``busy`` or ``degraded``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from .frames import DrainStatus, Heartbeat, Nak, PreflightAck, Registration, StateUpdate

logger = logging.getLogger(__name__)

Event = dict[str, Any]
RequestKind = Literal["buyer", "warmup"]
ProviderState = str

#: ``auth_state`` values that are never routed (FR-C9).
UNROUTABLE_AUTH_STATES = frozenset({"self_minted", "bearerless_duplicate"})
#: Catalog admission modes that are never routed.
UNROUTABLE_CATALOG_MODES = frozenset({"legacy", "legacy_bridge", "update_bridge"})
#: Model hash statuses (``verifyProviderModelIdentity``).
HASH_VERIFIED = "verified"


def hash_predicate_failure(status: str, require_verified: bool) -> bool:
    """``IsHashPredicateFailure``: a mismatch or invalid hash always fails."""
    if status in ("mismatch", "invalid"):
        return True
    return require_verified and status != HASH_VERIFIED


@dataclass
class ReceiptStats:
    """Settlement receipts of one provider (kept across its sessions)."""

    verified: int = 0
    failed: int = 0
    missing: int = 0
    last_failure_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "verified": self.verified,
            "failed": self.failed,
            "missing": self.missing,
            "last_failure_reason": self.last_failure_reason,
        }


@dataclass(frozen=True)
class DropRecord:
    """One lost session: which provider, why, and when (monotonic)."""

    provider_id: str
    session_id: int
    cause: str
    time: float
    detail: str = ""


@dataclass(frozen=True)
class RemovalRecord:
    """A provider taken out of the pool (after its disconnect grace)."""

    provider_id: str
    session_id: int
    cause: str
    time: float


@dataclass
class ProviderRecord:
    """Everything the pool knows about one provider_id.

    ``slots_free``/``slots_total`` are the provider's last report (hello,
    heartbeat or state_update); ``in_flight`` is the stub's own count of
    requests it routed there and has not seen finish, which is what routing
    trusts between reports.
    """

    provider_id: str
    session_id: int
    registration: Registration
    registered_at: float
    last_liveness: float
    slots_total: int
    slots_free: int
    state: ProviderState = "degraded"
    reported_state: ProviderState = "ready"
    warmed: bool = False
    connected: bool = True
    locked_unavailable: bool = False
    last_heartbeat: float | None = None
    heartbeats: int = 0
    in_flight: dict[str, RequestKind] = field(default_factory=dict)
    requests_served: int = 0
    dropped_at: float | None = None
    drop_cause: str | None = None
    assigned_token: str | None = None
    invalid_frames: int = 0
    refused_state_updates: int = 0
    naks: list[Nak] = field(default_factory=list)
    drain_status: list[DrainStatus] = field(default_factory=list)
    preflight_acks: dict[str, PreflightAck] = field(default_factory=dict)
    last_heartbeat_msg: Heartbeat | None = None
    #: 1 (``hello``) or 2 (``auth_request``).
    protocol: int = 1
    #: The session UUID the coordinator assigned (``assigned_id``).
    assigned_id: str = ""
    #: ``bearer_validated``, ``self_minted``, ``bearerless_duplicate`` or ``""``.
    auth_state: str = ""
    #: Catalog admission: ``not_required``, ``legacy``, ``compatible``, ``update_bridge``.
    catalog_mode: str = "not_required"
    #: ``verified``, ``mismatch``, ``invalid``, ``uncatalogued``, ``catalog_unavailable``.
    hash_status: str = "catalog_unavailable"
    expected_model_hash: str = ""
    model_hash: str = ""
    model_hash_algorithm: str = ""
    receipt_key: bytes | None = None
    receipt_key_pending: bool = False
    #: An ``unknown_message_type`` nak took the session off WebSocket routing.
    http_forwarding_only: bool = False
    #: The session has a tier-2 encrypted leg.
    encrypted: bool = False
    fenced: str | None = None
    rekeys: int = 0
    diagnostics: list[Any] = field(default_factory=list)
    idle_prewarm_events: list[Any] = field(default_factory=list)

    @property
    def hello(self) -> Registration:
        """The registration (``hello`` or initial ``auth_request``)."""
        return self.registration

    @property
    def model_id(self) -> str:
        return self.registration.model_id

    @property
    def models(self) -> tuple[str, ...]:
        """The model ids this provider serves (``model_id`` first)."""
        supported = self.registration.supported_models or ()
        extra = [m for m in supported if m != self.registration.model_id]
        return (self.registration.model_id, *extra)

    @property
    def buyer_in_flight(self) -> int:
        return sum(1 for kind in self.in_flight.values() if kind == "buyer")

    def capacity_left(self) -> int:
        """Slots the stub may still fill, by its own accounting."""
        return max(0, self.slots_total - len(self.in_flight))

    def to_json(self, now: float) -> dict[str, Any]:
        """The record as shown by ``/v1/status`` and ``snapshot`` events."""
        return {
            "provider_id": self.provider_id,
            "session_id": self.session_id,
            "state": self.state,
            "reported_state": self.reported_state,
            "warmed": self.warmed,
            "connected": self.connected,
            "model_id": self.model_id,
            "models": list(self.models),
            "slots_free": self.slots_free,
            "slots_total": self.slots_total,
            "in_flight": len(self.in_flight),
            "last_heartbeat_age_s": (
                None if self.last_heartbeat is None else round(now - self.last_heartbeat, 3)
            ),
            "heartbeats": self.heartbeats,
            "requests_served": self.requests_served,
            "drop_cause": self.drop_cause,
            "invalid_frames": self.invalid_frames,
            "naks": len(self.naks),
            "drain_phase": self.drain_status[-1].phase if self.drain_status else None,
            "protocol": self.protocol,
            "assigned_id": self.assigned_id,
            "auth_state": self.auth_state,
            "catalog_mode": self.catalog_mode,
            "hash_status": self.hash_status,
            "encrypted_leg": self.encrypted,
            "receipt_key_pending": self.receipt_key_pending,
            "http_forwarding_only": self.http_forwarding_only,
        }


class Pool:
    """The provider pool (no I/O).

    Args:
        warmup_gate: Whether new registrations start un-warmed (``degraded``
            until :meth:`warmed_up`).
        require_hash_verified: Route only providers whose model hash is
            ``verified`` against the catalog.
        require_encrypted_leg: Route only sessions with a tier-2 leg.
    """

    def __init__(
        self,
        *,
        warmup_gate: bool = True,
        require_hash_verified: bool = False,
        require_encrypted_leg: bool = False,
    ) -> None:
        self.warmup_gate = warmup_gate
        self.require_hash_verified = require_hash_verified
        self.require_encrypted_leg = require_encrypted_leg
        self.receipts: dict[str, ReceiptStats] = {}
        #: Receipt keys committed by a post-auth state_update, by provider id.
        self.committed_receipt_keys: dict[str, bytes] = {}
        self.providers: dict[str, ProviderRecord] = {}
        self.drops: list[DropRecord] = []
        self.removals: list[RemovalRecord] = []
        self.requests_routed = 0
        self.requests_finished: Counter[str] = Counter()
        self.warmups: Counter[str] = Counter()
        self.cancels_sent: Counter[str] = Counter()
        self.seq_gaps = 0

    # ------------------------------------------------------------------
    # Registration and liveness

    def register(
        self,
        hello: Registration,
        session_id: int,
        now: float,
        *,
        assigned_token: str | None = None,
        **admission: Any,
    ) -> tuple[ProviderRecord, int | None, list[Event]]:
        """Register ``hello`` as a fresh session.

        ``admission`` sets the record's admission facts (``protocol``,
        ``assigned_id``, ``auth_state``, ``catalog_mode``, ``hash_status``,
        ``expected_model_hash``, ``receipt_key``, ``encrypted``...).

        Returns the record, the session id it replaces (a reconnect of the
        same provider_id, or ``None``) and the events. Re-registration resets
        everything a session owns (warm-up, reported state, in-flight): the
        old session's requests are the caller's to fail.
        """
        old = self.providers.get(hello.provider_id)
        replaced = old.session_id if old is not None and old.connected else None
        record = ProviderRecord(
            provider_id=hello.provider_id,
            session_id=session_id,
            registration=hello,
            registered_at=now,
            last_liveness=now,
            slots_total=hello.max_concurrency,
            slots_free=hello.max_concurrency,
            warmed=not self.warmup_gate,
            assigned_token=assigned_token,
            model_hash=hello.model_hash,
            model_hash_algorithm=hello.model_hash_algorithm,
            **admission,
        )
        if old is not None:
            record.requests_served = old.requests_served
        record.state = self._effective(record)
        self.providers[hello.provider_id] = record
        events: list[Event] = [
            {
                "type": "provider_joined",
                "provider_id": hello.provider_id,
                "session_id": session_id,
                "model_id": hello.model_id,
                "state": record.state,
                "reconnect": old is not None,
            }
        ]
        if old is not None and old.state != record.state:
            events.append(self._state_event(record, old.state, "re-registered"))
        return record, replaced, events

    def heartbeat(
        self, provider_id: str, session_id: int, hb: Heartbeat, now: float
    ) -> tuple[float | None, list[Event]]:
        """Apply a heartbeat. Returns (gap since the previous one, events)."""
        record = self._live(provider_id, session_id)
        if record is None:
            return None, []
        gap = None if record.last_heartbeat is None else now - record.last_heartbeat
        record.last_heartbeat = now
        record.heartbeats += 1
        record.last_heartbeat_msg = hb
        record.slots_free = hb.slots_free
        record.slots_total = hb.slots_total
        if hb.model_hash_present:
            record.model_hash = hb.model_hash
        if hb.model_hash_algorithm_present:
            record.model_hash_algorithm = hb.model_hash_algorithm
        return gap, self._report(record, hb.status, "heartbeat")

    def state_update(
        self, provider_id: str, session_id: int, update: StateUpdate, now: float
    ) -> list[Event]:
        """Apply a provider-originated state_update."""
        record = self._live(provider_id, session_id)
        if record is None:
            return []
        if record.receipt_key_pending and record.receipt_key is not None:
            # The first post-auth state_update commits a new receipt key.
            record.receipt_key_pending = False
            self.committed_receipt_keys[provider_id] = record.receipt_key
        snapshot = update.metrics_snapshot
        if snapshot.slots_free is not None:
            record.slots_free = snapshot.slots_free
        if snapshot.slots_total is not None:
            record.slots_total = snapshot.slots_total
        return self._report(record, update.state, update.reason or "state_update")

    def touch(self, provider_id: str, session_id: int, now: float) -> None:
        """Record liveness (a well-formed text frame)."""
        record = self._live(provider_id, session_id)
        if record is not None:
            record.last_liveness = now

    def warmed_up(self, provider_id: str, session_id: int, now: float) -> list[Event]:
        """The warm-up gate passed for this session."""
        record = self._live(provider_id, session_id)
        if record is None or record.warmed:
            return []
        record.warmed = True
        return self._refresh(record, "warm-up passed")

    def drop(
        self, provider_id: str, session_id: int, cause: str, now: float, detail: str = ""
    ) -> tuple[DropRecord, list[Event]]:
        """A session ended. Always logged; changes state only if current.

        The provider becomes ``unavailable`` (disconnect grace); its in-flight
        requests are cleared (the caller fails them).
        """
        drop = DropRecord(provider_id, session_id, cause, now, detail)
        self.drops.append(drop)
        events: list[Event] = [
            {
                "type": "provider_dropped",
                "provider_id": provider_id,
                "session_id": session_id,
                "cause": cause,
                "detail": detail,
            }
        ]
        record = self.providers.get(provider_id)
        if record is None or record.session_id != session_id or not record.connected:
            return drop, events
        record.connected = False
        record.dropped_at = now
        record.drop_cause = cause
        record.in_flight.clear()
        events.extend(self._refresh(record, f"dropped: {cause}"))
        return drop, events

    def remove(self, provider_id: str, session_id: int, cause: str, now: float) -> list[Event]:
        """Remove a dropped provider, unless it re-registered meanwhile."""
        record = self.providers.get(provider_id)
        if record is None or record.session_id != session_id or record.connected:
            return []
        del self.providers[provider_id]
        self.removals.append(RemovalRecord(provider_id, session_id, cause, now))
        return [
            {
                "type": "provider_removed",
                "provider_id": provider_id,
                "session_id": session_id,
                "cause": cause,
            }
        ]

    # ------------------------------------------------------------------
    # Records of provider frames

    def record_invalid(self, provider_id: str, session_id: int) -> None:
        """A frame the coordinator did not act on (undecodable, unknown or refused)."""
        record = self._live(provider_id, session_id)
        if record is not None:
            record.invalid_frames += 1

    def mark_http_forwarding_only(self, provider_id: str, session_id: int) -> list[Event]:
        record = self._live(provider_id, session_id)
        if record is None or record.http_forwarding_only:
            return []
        record.http_forwarding_only = True
        return [{"type": "routing_changed", "provider_id": provider_id, "reason": "http_only"}]

    def record_receipt(self, provider_id: str, outcome: str, reason: str | None = None) -> None:
        """Count a receipt: ``verified``, ``failed`` (with ``reason``) or ``missing``."""
        stats = self.receipts.setdefault(provider_id, ReceiptStats())
        if outcome == "verified":
            stats.verified += 1
        elif outcome == "missing":
            stats.missing += 1
            stats.last_failure_reason = reason or "missing_receipt"
        else:
            stats.failed += 1
            stats.last_failure_reason = reason

    def record_nak(self, provider_id: str, session_id: int, nak: Nak) -> None:
        record = self._live(provider_id, session_id)
        if record is not None:
            record.naks.append(nak)

    def record_drain_status(
        self, provider_id: str, session_id: int, status: DrainStatus
    ) -> list[Event]:
        record = self._live(provider_id, session_id)
        if record is None:
            return []
        record.drain_status.append(status)
        events: list[Event] = [
            {
                "type": "drain_status",
                "provider_id": provider_id,
                "phase": status.phase,
                "inflight_requests": status.inflight_requests,
            }
        ]
        if status.phase == "starting":
            events.extend(self._report(record, "draining", "drain_status starting"))
        return events

    def receipt_key_pending(self, provider_id: str, key: bytes | None) -> bool:
        """A registration's receipt key is pending unless it is the committed one."""
        return key is not None and self.committed_receipt_keys.get(provider_id) != key

    def record_rekey(self, provider_id: str, session_id: int) -> None:
        record = self._live(provider_id, session_id)
        if record is not None:
            record.rekeys += 1

    def record_preflight_ack(self, provider_id: str, session_id: int, ack: PreflightAck) -> None:
        record = self._live(provider_id, session_id)
        if record is not None:
            record.preflight_acks[ack.request_id] = ack

    # ------------------------------------------------------------------
    # Routing and request accounting

    def not_routable_reasons(self, record: ProviderRecord) -> list[str]:
        """Why ``RoutingEligible`` excludes ``record`` (empty: routable).

        Reasons: ``disconnected``, ``auth_state:<state>``, ``catalog:<mode>``,
        ``receipt_key_pending``, ``http_forwarding_only``,
        ``hash:<status>``, ``encrypted_leg_required``, ``fenced``,
        ``state:<state>``, ``no_free_slots``.
        """
        reasons = []
        if not record.connected:
            reasons.append("disconnected")
        if record.auth_state in UNROUTABLE_AUTH_STATES:
            reasons.append(f"auth_state:{record.auth_state}")
        if record.catalog_mode in UNROUTABLE_CATALOG_MODES:
            reasons.append(f"catalog:{record.catalog_mode}")
        if record.receipt_key_pending:
            reasons.append("receipt_key_pending")
        if record.http_forwarding_only:
            reasons.append("http_forwarding_only")
        if hash_predicate_failure(record.hash_status, self.require_hash_verified):
            reasons.append(f"hash:{record.hash_status}")
        if self.require_encrypted_leg and not record.encrypted:
            reasons.append("encrypted_leg_required")
        if record.fenced is not None:
            reasons.append("fenced")
        if record.state != "ready":
            reasons.append(f"state:{record.state}")
        if record.slots_free <= 0 or record.capacity_left() <= 0:
            reasons.append("no_free_slots")
        return reasons

    def routable(self, record: ProviderRecord) -> bool:
        return not self.not_routable_reasons(record)

    def pick(self, model: str | None = None) -> ProviderRecord | None:
        """The least-loaded routable provider, or ``None``.

        Providers serving ``model`` are preferred; when none does, any
        routable provider is used (buyers name models loosely, and the stub
        is not a model router).
        """
        candidates = [r for r in self.providers.values() if self.routable(r)]
        if model:
            matching = [r for r in candidates if model in r.models]
            candidates = matching or candidates
        if not candidates:
            return None
        return min(
            candidates,
            key=lambda r: (len(r.in_flight) / max(1, r.slots_total), -r.capacity_left()),
        )

    def begin_request(
        self, provider_id: str, session_id: int, request_id: str, kind: RequestKind, stream: bool
    ) -> list[Event]:
        record = self._live(provider_id, session_id)
        if record is None:
            return []
        record.in_flight[request_id] = kind
        if kind == "buyer":
            self.requests_routed += 1
        else:
            self.warmups["sent"] += 1
        return [
            {
                "type": "request_routed",
                "request_id": request_id,
                "provider_id": provider_id,
                "kind": kind,
                "stream": stream,
            }
        ]

    def finish_request(
        self,
        provider_id: str,
        session_id: int,
        request_id: str,
        kind: RequestKind,
        status: str,
    ) -> list[Event]:
        """Account a finished request (idempotence is the caller's)."""
        record = self.providers.get(provider_id)
        if record is not None and record.session_id == session_id:
            record.in_flight.pop(request_id, None)
            if kind == "buyer" and status == "complete":
                record.requests_served += 1
        if kind == "buyer":
            self.requests_finished[status] += 1
        else:
            self.warmups[status] += 1
        return [
            {
                "type": "request_finished",
                "request_id": request_id,
                "provider_id": provider_id,
                "kind": kind,
                "status": status,
            }
        ]

    # ------------------------------------------------------------------
    # Views

    def get(self, provider_id: str) -> ProviderRecord | None:
        return self.providers.get(provider_id)

    def counters(self) -> dict[str, Any]:
        return {
            "requests_routed": self.requests_routed,
            "requests_finished": dict(self.requests_finished),
            "warmups": dict(self.warmups),
            "cancels_sent": dict(self.cancels_sent),
            "seq_gaps": self.seq_gaps,
            "drops": len(self.drops),
            "removals": len(self.removals),
        }

    def provider_json(self, record: ProviderRecord, now: float) -> dict[str, Any]:
        """One provider as ``/v1/status`` shows it, with ``routable`` and receipts."""
        data = record.to_json(now)
        reasons = self.not_routable_reasons(record)
        data["routable"] = not reasons
        data["not_routable_reasons"] = reasons
        data["receipts"] = self.receipts.get(record.provider_id, ReceiptStats()).to_json()
        return data

    def snapshot(self, now: float) -> dict[str, Any]:
        """Providers, drops, removals and counters, as JSON-ready data."""
        return {
            "providers": [self.provider_json(r, now) for r in self.providers.values()],
            "drops": [
                {
                    "provider_id": d.provider_id,
                    "session_id": d.session_id,
                    "cause": d.cause,
                    "detail": d.detail,
                    "age_s": round(now - d.time, 3),
                }
                for d in self.drops
            ],
            "removals": [
                {
                    "provider_id": r.provider_id,
                    "session_id": r.session_id,
                    "cause": r.cause,
                    "age_s": round(now - r.time, 3),
                }
                for r in self.removals
            ],
            "counters": self.counters(),
        }

    # ------------------------------------------------------------------
    # Internals

    def _live(self, provider_id: str, session_id: int) -> ProviderRecord | None:
        # Frames from a replaced or dropped session must not touch the
        # record that now belongs to a newer session.
        record = self.providers.get(provider_id)
        if record is None or record.session_id != session_id or not record.connected:
            return None
        return record

    def _report(self, record: ProviderRecord, state: ProviderState, reason: str) -> list[Event]:
        if record.locked_unavailable and state != "unavailable":
            if record.reported_state != state:
                record.refused_state_updates += 1
                logger.warning(
                    "refused state change provider_id=%s from=unavailable to=%s "
                    "(recovery from unavailable is a fresh registration)",
                    record.provider_id,
                    state,
                )
            return []
        if state == "unavailable":
            record.locked_unavailable = True
        record.reported_state = state
        return self._refresh(record, reason)

    def _effective(self, record: ProviderRecord) -> ProviderState:
        if not record.connected or record.locked_unavailable:
            return "unavailable"
        if record.reported_state == "draining":
            return "draining"
        if not record.warmed:
            return "degraded"
        return record.reported_state

    def _refresh(self, record: ProviderRecord, reason: str) -> list[Event]:
        new = self._effective(record)
        if new == record.state:
            return []
        old, record.state = record.state, new
        return [self._state_event(record, old, reason)]

    @staticmethod
    def _state_event(record: ProviderRecord, old: str, reason: str) -> Event:
        return {
            "type": "state_changed",
            "provider_id": record.provider_id,
            "session_id": record.session_id,
            "from": old,
            "to": record.state,
            "reason": reason,
        }
