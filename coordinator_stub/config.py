"""Configuration of the coordinator stub.

Every timer, limit and hostile behaviour of the stub is one field of
:class:`StubConfig`. Defaults reproduce the real coordinator (see
``PROTOCOL.md``); tests shrink the timers instead of sleeping through them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from provider.coordinator.messages import MAX_FRAME_BYTES

#: Path of the provider WebSocket endpoint; every other path gets HTTP 404.
WS_PATH = "/ws/provider"


@dataclass(frozen=True, kw_only=True)
class StubConfig:
    """Settings of a :class:`~coordinator_stub.app.CoordinatorStub`.

    Times are in seconds and are floats so that tests can shrink them. A
    hostile timer set to ``None`` is disabled; every hostile timer is on by
    default, with the real coordinator's value.

    Listeners:
        host: Interface both listeners bind; loopback by default.
        ws_port: Provider WebSocket port (path ``/ws/provider``); 0 picks a
            free port.
        http_port: Buyer API port; 0 picks a free port.
        tls_cert, tls_key: PEM files (certificate chain, private key). With
            both, the provider endpoint speaks TLS only (``wss://``); the
            buyer API stays plain HTTP. ``None`` (default): plain ``ws://``.

    Authentication:
        tokens: Accepted provider tokens (``Authorization: Bearer``). Empty
            means any token, or none, is accepted. A rejected token is
            accepted at the HTTP level, then closed with code 4005.
        issue_provider_token: Put a freshly generated
            ``assigned_provider_token`` in every ``hello_ack`` (and accept it
            from then on, when ``tokens`` is not empty).

    Handshake:
        hello_timeout_s: How long a new connection may take to send its
            ``hello`` before it is closed with 4000.
        heartbeat_interval_s: ``hello_ack.heartbeat_interval_s`` (an int on
            the wire, 1..3600).
        tier: ``hello_ack.tier``.

    Warm-up and wake:
        warmup_gate: Keep a newly registered provider ``degraded`` until the
            stub's own 2-token ``inference_request`` completes with
            ``completion_tokens > 0``. ``False`` trusts the provider at once.
        warmup_timeout_s: How long to wait for the warm-up end frame before
            cancelling it (reason ``timeout``) and retrying.
        warmup_retry_s: Pause between failed warm-up attempts.
        wake_gap_s: Send ``warm_up`` when heartbeats resume after a gap
            longer than this; ``None`` never sends it.

    Hostile timers (the real coordinator's):
        write_deadline_s: A TEXT frame written by the stub arms a deadline of
            now + this, never cleared. A client PING arriving after the
            deadline makes the automatic PONG "fail": the connection is
            aborted (cause ``write_deadline_pong``). ``None`` disables.
        inactivity_s: Drop a provider (cause ``inactivity``) when no
            well-formed TEXT frame arrived for this long. Binary and control
            frames never count. ``None`` disables.
        grace_s: After a drop the provider stays ``unavailable`` this long,
            then is removed from the pool (cause ``grace_expired``).
        probe_timeout_s: Bound on writing each routed ``inference_request``
            (the real coordinator's 500 ms write-path probe). A write that
            does not finish in time drops the session (cause
            ``probe_failed``). ``None`` disables.

    Limits and sockets:
        max_frame_bytes: Largest frame accepted from a provider; larger
            frames close the connection with 1009.
        so_rcvbuf: ``SO_RCVBUF`` of the WebSocket listening socket (inherited
            by accepted sockets), so tests can make a stalled reader push
            back on the provider quickly. ``None`` keeps the OS default.
        so_sndbuf: ``SO_SNDBUF`` of accepted provider sockets, so tests can
            make a provider that stops reading block the stub's writes (and
            fail the write probe) quickly. ``None`` keeps the OS default
            (which autotunes up to megabytes).
        close_timeout_s: How long a closing handshake may take before the
            TCP connection is dropped.
        frame_log_size: Frames kept per provider and direction for
            observation (oldest discarded first).

    Buyer API:
        keepalive_s: Wall-clock interval of ``: keepalive`` SSE comments on a
            streaming response (committing 200 at the first one). Never used
            on non-streaming responses. ``None`` disables.
        request_timeout_s: Deadline of a buyer request; past it the stub
            sends ``cancel_request`` (reason ``timeout``) and answers 504 if
            nothing was committed yet.
        cancel_grace_s: After a ``cancel_request``, how long the request
            keeps its provider slot while waiting for the end frame.
        events_queue_size: Bound of each ``/v1/events`` subscriber's queue;
            a full subscriber loses events instead of slowing the stub.
    """

    # Listeners
    host: str = "127.0.0.1"
    ws_port: int = 0
    http_port: int = 0
    tls_cert: str | None = None
    tls_key: str | None = None
    # Authentication
    tokens: tuple[str, ...] = ()
    issue_provider_token: bool = False
    # Handshake
    hello_timeout_s: float = 10.0
    heartbeat_interval_s: int = 30
    tier: str = "standard"
    # Warm-up and wake
    warmup_gate: bool = True
    warmup_timeout_s: float = 60.0
    warmup_retry_s: float = 10.0
    wake_gap_s: float | None = 120.0
    # Hostile timers
    write_deadline_s: float | None = 10.0
    inactivity_s: float | None = 90.0
    grace_s: float = 30.0
    probe_timeout_s: float | None = 0.5
    # Limits and sockets
    max_frame_bytes: int = MAX_FRAME_BYTES
    so_rcvbuf: int | None = None
    so_sndbuf: int | None = None
    close_timeout_s: float = 2.0
    frame_log_size: int = 10_000
    # Buyer API
    keepalive_s: float | None = 5.0
    request_timeout_s: float = 300.0
    cancel_grace_s: float = 30.0
    events_queue_size: int = 256

    def __post_init__(self) -> None:
        # Accept any iterable of tokens (a list from argparse, say) but keep
        # the config hashable and immutable.
        tokens: Iterable[str] = self.tokens
        if isinstance(tokens, str):
            raise TypeError("tokens must be a sequence of strings, not a string")
        object.__setattr__(self, "tokens", tuple(tokens))
        if not 1 <= self.heartbeat_interval_s <= 3600:
            raise ValueError("heartbeat_interval_s must be within 1..3600 (an int on the wire)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        for name in ("ws_port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be within 0..65535")
        positive = (
            "hello_timeout_s",
            "warmup_timeout_s",
            "request_timeout_s",
            "close_timeout_s",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        optional_positive = (
            "wake_gap_s",
            "write_deadline_s",
            "inactivity_s",
            "probe_timeout_s",
            "keepalive_s",
        )
        for name in optional_positive:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 or None (disabled)")
        for name in ("grace_s", "warmup_retry_s", "cancel_grace_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.events_queue_size < 1:
            raise ValueError("events_queue_size must be >= 1")
        if self.frame_log_size < 1:
            raise ValueError("frame_log_size must be >= 1")
        if self.max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be >= 1")

    def replace(self, **changes: Any) -> StubConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)
