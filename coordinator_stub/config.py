"""Configuration of the coordinator stub.

Every timer, limit and hostile behaviour of the stub is one field of
:class:`StubConfig`. Defaults reproduce the real coordinator (see
``PROTOCOL.md``); tests shrink the timers instead of sleeping through them.

A *profile* sets the admission gates: ``dev`` (the default) is permissive,
``production`` turns on the gates of the shipped ``dist/coordinator.yaml``
(see :data:`PROFILES`). A gate left at ``None`` takes the profile's value; a
gate given explicitly wins over the profile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

#: Path of the provider WebSocket endpoint; every other path gets HTTP 404.
WS_PATH = "/ws/provider"

#: Largest frame the coordinator reads (4 MiB).
MAX_FRAME_BYTES: Final = 4 * 1024 * 1024

Profile = Literal["dev", "production"]
SettlementMode = Literal["off", "observe", "enforce"]

#: The gates each profile sets (fields left at ``None``).
PROFILES: Final[dict[str, dict[str, Any]]] = {
    "dev": {
        "required_binary_version": "",
        "recommended_binary_version": "",
        "require_provider_tokens": False,
        "allow_tokenless_provisional_bootstrap": False,
        "require_referral": False,
        "require_hash_verified": False,
        "require_encrypted_leg": False,
        "settlement_mode": "observe",
        "warmup_gate": True,
    },
    # dist/coordinator.yaml: version floor, tokens required with tokenless
    # self-mint, referrals required for bootstrap, require_hash_verified,
    # the encrypted leg, verified-model settlement enforce, no warm-up gate.
    "production": {
        "required_binary_version": "1.8.33",
        "recommended_binary_version": "1.8.123",
        "require_provider_tokens": True,
        "allow_tokenless_provisional_bootstrap": True,
        "require_referral": True,
        "require_hash_verified": True,
        "require_encrypted_leg": True,
        "settlement_mode": "enforce",
        "warmup_gate": False,
    },
}


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

    Profile:
        profile: ``"dev"`` or ``"production"``; supplies every gate below
            left at ``None`` (see :data:`PROFILES`).

    Authentication:
        tokens: Operator provider tokens (``Authorization: Bearer``), valid
            for any provider id. When empty and tokens are not required, any
            token, or none, is accepted. A refused token is accepted at the
            HTTP level, then closed with 4005 ``invalid_token``.
        issue_provider_token: Put a freshly generated
            ``assigned_provider_token`` in every ``hello_ack`` (and accept it
            from then on, when ``tokens`` is not empty).
        require_provider_tokens: Tokens are required even when ``tokens`` is
            empty (minted tokens then count).
        allow_tokenless_provisional_bootstrap: A tokenless connection may
            self-mint a token (``auth_state`` ``self_minted``, not routable)
            or run the v2 credential bootstrap.
        referral_codes: Referral codes accepted by credential bootstrap.
        require_referral: Credential bootstrap needs a referral code.
        accepted_compatibility_set_ids: Accepted ``compatibility_set_id``
            values; non-empty makes the policy ``configured`` (the id is then
            required).
        bridge_compatibility_set_ids: First-hop bridge sets: admitted
            without the version floor, ``update_bridge``, never routed.

    Admission:
        required_binary_version: Binary floor (4004 below it); ``""`` none.
        recommended_binary_version: Advisory version in the ack.
        catalog_models: ``model_id -> model directory, .gguf file or
            sha256``: the rows of the signed autotune catalog the stub
            serves (``/v1/autotune-candidates``) and admits against. Empty:
            no catalog.
        catalog_key_file: Ed25519 seed (32 bytes raw or base64) signing the
            catalog; ``None`` generates a key at start.
        catalog_key_id: Key id of the catalog signature.
        require_hash_verified: Only route providers whose model hash equals
            their catalog row's.
        require_encrypted_leg: Refuse v1 (4013) and require the v2 leg.

    Encrypted leg:
        rekey_after_requests: Requests per key epoch before a rekey.
        rekey_after_seconds: Age of a key epoch before a rekey.

    Settlement:
        settlement_mode: ``off``, ``observe`` or ``enforce``: requests to a
            provider with a receipt key and a verified hash carry
            ``settlement`` metadata and their receipts are verified;
            ``enforce`` refuses a buyer request (500 ``route_snapshot_failed``)
            when the metadata cannot be built.
        pending_deadline_seconds: Receipt deadline after the terminal state
            (1..900).

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
    # Profile
    profile: Profile = "dev"
    # Authentication
    tokens: tuple[str, ...] = ()
    issue_provider_token: bool = False
    require_provider_tokens: bool | None = None
    allow_tokenless_provisional_bootstrap: bool | None = None
    referral_codes: tuple[str, ...] = ()
    require_referral: bool | None = None
    accepted_compatibility_set_ids: tuple[str, ...] = ()
    bridge_compatibility_set_ids: tuple[str, ...] = ()
    # Admission
    required_binary_version: str | None = None
    recommended_binary_version: str | None = None
    catalog_models: tuple[tuple[str, str], ...] = ()
    catalog_key_file: str | None = None
    catalog_key_id: str = "coordinator-stub-autotune-v1"
    require_hash_verified: bool | None = None
    require_encrypted_leg: bool | None = None
    # Encrypted leg
    rekey_after_requests: int = 10_000
    rekey_after_seconds: float = 3600.0
    # Settlement
    settlement_mode: SettlementMode | None = None
    pending_deadline_seconds: int = 300
    # Handshake
    hello_timeout_s: float = 10.0
    heartbeat_interval_s: int = 30
    tier: str = "standard"
    # Warm-up and wake
    warmup_gate: bool | None = None
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
    #: Gates that took the profile's value (re-resolved by :meth:`replace`).
    _from_profile: frozenset[str] = field(
        default=frozenset(), init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        # Accept any iterable of strings (a list from argparse, say) but keep
        # the config hashable and immutable.
        for name in (
            "tokens",
            "referral_codes",
            "accepted_compatibility_set_ids",
            "bridge_compatibility_set_ids",
        ):
            values: Iterable[str] = getattr(self, name)
            if isinstance(values, str):
                raise TypeError(f"{name} must be a sequence of strings, not a string")
            object.__setattr__(self, name, tuple(values))
        models: Any = self.catalog_models
        if isinstance(models, Mapping):
            models = tuple(models.items())
        object.__setattr__(self, "catalog_models", tuple((str(k), str(v)) for k, v in models))
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {sorted(PROFILES)}, not {self.profile!r}")
        defaulted = set()
        for name, value in PROFILES[self.profile].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
                defaulted.add(name)
        object.__setattr__(self, "_from_profile", frozenset(defaulted))
        if self.settlement_mode not in ("off", "observe", "enforce"):
            raise ValueError("settlement_mode must be off, observe or enforce")
        if not 1 <= self.pending_deadline_seconds <= 900:
            raise ValueError("pending_deadline_seconds must be within 1..900")
        if self.rekey_after_requests < 1 or self.rekey_after_seconds <= 0:
            raise ValueError("rekey_after_requests and rekey_after_seconds must be > 0")
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

    @property
    def catalog_model_map(self) -> dict[str, str]:
        """``catalog_models`` as a dict."""
        return dict(self.catalog_models)

    def replace(self, **changes: Any) -> StubConfig:
        """A copy with ``changes`` applied (validated again).

        Gates that came from the profile come from the (possibly new)
        profile again, so ``replace(profile="production")`` turns them on.
        """
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        for name in self._from_profile:
            values[name] = None
        values.update(changes)
        return StubConfig(**values)
