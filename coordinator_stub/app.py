"""The coordinator stub: both listeners, the pool, faults and observation.

Typical use in a test::

    async with CoordinatorStub(write_deadline_s=0.5, inactivity_s=1.5) as stub:
        provider = await start_provider(stub.ws_url)
        await stub.wait_provider_state("p1", "ready")
        ...
        drop = await stub.wait_drop("p1", cause="write_deadline_pong")
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .buyer_api import BuyerAPI
from .catalog import Catalog, CatalogKey
from .config import WS_PATH, StubConfig
from .credentials import Credentials
from .endpoint import WebSocketSide
from .events import EventBus
from .faults import Faults, RefuseMode
from .frames import PreflightAck
from .observe import Changes, Direction, FrameLog, FrameRecord, RejectRecord
from .pool import DropRecord, Pool, ProviderRecord, RemovalRecord
from .relay import Flight
from .session import ProviderSession

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class CoordinatorStub:
    """A stand-in for the real coordinator, for tests, demos and benchmarks.

    Args:
        config: Settings; defaults to :class:`StubConfig` ``()``.
        **overrides: Fields of :class:`StubConfig` replacing those of
            ``config``, e.g. ``CoordinatorStub(inactivity_s=1.5)``.

    Use ``async with CoordinatorStub(...) as stub:`` or :meth:`start` /
    :meth:`stop`. Ports default to 0 (free ports); read :attr:`ws_url` and
    :attr:`http_url` after starting.
    """

    def __init__(self, config: StubConfig | None = None, **overrides: Any) -> None:
        config = config or StubConfig()
        if overrides:
            config = config.replace(**overrides)
        self.config = config
        self.faults = Faults()
        self.changes = Changes()
        assert config.warmup_gate is not None
        self.pool = Pool(
            warmup_gate=config.warmup_gate,
            require_hash_verified=bool(config.require_hash_verified),
            require_encrypted_leg=bool(config.require_encrypted_leg),
        )
        self.credentials = Credentials.create(
            config.tokens,
            require_tokens=bool(config.require_provider_tokens),
            allow_tokenless=bool(config.allow_tokenless_provisional_bootstrap),
            referral_codes=config.referral_codes,
            require_referral=bool(config.require_referral),
        )
        #: The key signing the autotune catalog feed (generated or loaded).
        self.catalog_key = (
            CatalogKey.load(config.catalog_key_file, config.catalog_key_id)
            if config.catalog_key_file
            else CatalogKey.generate(config.catalog_key_id)
        )
        #: The catalog the stub serves and admits against (``None``: no ``catalog_models``).
        self.catalog = (
            Catalog.create(config.catalog_model_map, self.catalog_key)
            if config.catalog_models
            else None
        )
        self.bus = EventBus(config.events_queue_size)
        self.bus.add_listener(lambda _event: self.changes.notify())
        self.log = FrameLog(config.frame_log_size, self.changes)
        self.ws = WebSocketSide(
            config,
            self.pool,
            self.bus,
            self.faults,
            self.log,
            self.changes,
            self.credentials,
            self.catalog,
        )
        self.http = BuyerAPI(
            config, self.pool, self.ws, self.ws.relay, self.bus, self.status, self.catalog
        )
        self._started = False

    # ------------------------------------------------------------------
    # Lifecycle

    async def start(self) -> None:
        """Start both listeners (WebSocket first)."""
        if self._started:
            raise RuntimeError("CoordinatorStub already started")
        self._started = True
        await self.ws.start()
        try:
            await self.http.start()
        except BaseException:
            await self.ws.stop()
            raise
        logger.info(
            "coordinator stub ready ws=%s http=%s profile=%s catalog_key_id=%s "
            "catalog_public_key=%s",
            self.ws_url,
            self.http_url,
            self.config.profile,
            self.catalog_key_id,
            self.catalog_public_key,
        )

    async def stop(self) -> None:
        """Close provider sessions (1001), fail requests in flight, stop listening."""
        if not self._started:
            return
        self._started = False
        self.bus.close()
        await self.ws.stop()
        await self.http.stop()
        logger.info("coordinator stub stopped")

    async def __aenter__(self) -> CoordinatorStub:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def ws_port(self) -> int:
        return self.ws.port

    @property
    def http_port(self) -> int:
        return self.http.port

    @property
    def ws_url(self) -> str:
        """``ws://HOST:PORT/ws/provider`` (``wss://`` with TLS)."""
        return f"{self.ws.scheme}://{_url_host(self.config.host)}:{self.ws.port}{WS_PATH}"

    @property
    def http_url(self) -> str:
        """``http://HOST:PORT`` (the OpenAI base URL is this + ``/v1``)."""
        return f"http://{_url_host(self.config.host)}:{self.http.port}"

    @property
    def catalog_key_id(self) -> str:
        """Key id of the autotune feed signature (what a provider is configured to trust)."""
        return self.catalog_key.key_id

    @property
    def catalog_public_key(self) -> str:
        """Standard base64 of the raw Ed25519 public key signing the feed."""
        return self.catalog_key.public_key_b64

    @property
    def catalog_url(self) -> str:
        """``GET`` URL of the signed autotune feed (``+ ".sig"`` for its signature)."""
        return f"{self.http_url}/v1/autotune-candidates"

    def catalog_fields(self, model_id: str) -> dict[str, str] | None:
        """The five ``catalog_*`` handshake values a provider of ``model_id`` must send."""
        return None if self.catalog is None else self.catalog.handshake_fields(model_id)

    @property
    def bootstraps(self) -> list[str]:
        """Provider ids that completed a credential bootstrap, in order."""
        return list(self.ws.bootstraps)

    # ------------------------------------------------------------------
    # Observation

    def provider(self, provider_id: str) -> ProviderRecord | None:
        """The pool record of ``provider_id`` (live object), or ``None``."""
        return self.pool.get(provider_id)

    def providers(self) -> dict[str, ProviderRecord]:
        return dict(self.pool.providers)

    def state(self, provider_id: str) -> str | None:
        """Effective state of ``provider_id``; ``None`` if not in the pool."""
        record = self.pool.get(provider_id)
        return None if record is None else record.state

    def session(self, provider_id: str) -> ProviderSession | None:
        """The provider's current connection, or ``None``."""
        return self.ws.sessions.get(provider_id)

    def frames_received(
        self, provider_id: str | None = None, type: str | None = None
    ) -> list[FrameRecord]:
        """Frames received from ``provider_id`` (all providers if ``None``), oldest first."""
        return self._frames(provider_id, "in", type)

    def frames_sent(
        self, provider_id: str | None = None, type: str | None = None
    ) -> list[FrameRecord]:
        """Frames written to ``provider_id`` (each duplicate included), oldest first."""
        return self._frames(provider_id, "out", type)

    def _frames(
        self, provider_id: str | None, direction: Direction, type: str | None
    ) -> list[FrameRecord]:
        frames = self.log.frames(provider_id, direction)
        return frames if type is None else [f for f in frames if f.type == type]

    @property
    def drops(self) -> list[DropRecord]:
        """Every lost session, in order: provider_id, session_id, cause, time, detail."""
        return list(self.pool.drops)

    @property
    def removals(self) -> list[RemovalRecord]:
        return list(self.pool.removals)

    @property
    def rejections(self) -> list[RejectRecord]:
        """Connections closed or refused before registering (4000/4001/4004/4005/503...)."""
        return list(self.log.rejections)

    @property
    def in_flight(self) -> dict[str, Flight]:
        """Requests sent to providers and not finished, by request_id."""
        return dict(self.ws.relay.flights)

    def status(self) -> dict[str, Any]:
        """The ``/v1/status`` document."""
        snapshot = self.pool.snapshot(time.monotonic())
        snapshot["event_subscribers"] = self.bus.stats()
        snapshot["rejections"] = [
            {"code": r.code, "reason": r.reason, "provider_id": r.provider_id}
            for r in self.log.rejections
        ]
        snapshot["listening"] = self.ws.listening
        snapshot["profile"] = self.config.profile
        snapshot["catalog"] = {
            "key_id": self.catalog_key_id,
            "public_key": self.catalog_public_key,
            "url": self.catalog_url,
            "release_id": None if self.catalog is None else self.catalog.release_id,
            "candidate_sha256": None if self.catalog is None else self.catalog.feed.sha256,
        }
        snapshot["settlement_mode"] = self.config.settlement_mode
        snapshot["rekeys"] = dict(self.ws.relay.rekeys)
        return snapshot

    async def wait_for(
        self, predicate: Callable[[], T], timeout: float = 5.0, what: str = "condition"
    ) -> T:
        """Await the first truthy ``predicate()`` (re-checked on every stub change).

        Changes are: frames in or out, pool events, drops, rejections. Raises
        :class:`TimeoutError` after ``timeout`` seconds.
        """
        return await self.changes.wait_for(predicate, timeout, what)

    async def wait_provider_state(
        self, provider_id: str, state: str, *, timeout: float = 5.0
    ) -> ProviderRecord:
        """Await ``provider_id`` being in ``state``; returns its record."""

        def check() -> ProviderRecord | None:
            record = self.pool.get(provider_id)
            return record if record is not None and record.state == state else None

        return await self.wait_for(check, timeout, f"{provider_id} in state {state}")

    async def wait_connected(self, provider_id: str, *, timeout: float = 5.0) -> ProviderRecord:
        """Await a registered, connected session of ``provider_id``."""

        def check() -> ProviderRecord | None:
            record = self.pool.get(provider_id)
            return record if record is not None and record.connected else None

        return await self.wait_for(check, timeout, f"{provider_id} connected")

    async def wait_frame(
        self,
        provider_id: str,
        type: str,
        *,
        where: Callable[[FrameRecord], bool] | None = None,
        since: float | None = None,
        timeout: float = 5.0,
    ) -> FrameRecord:
        """Await a frame of ``type`` received from ``provider_id``.

        Frames already received count unless ``since`` (a monotonic time)
        excludes them; ``where`` filters further. Returns the first match.
        """
        return await self._wait_frame(provider_id, "in", type, where, since, timeout)

    async def wait_sent(
        self,
        provider_id: str,
        type: str,
        *,
        where: Callable[[FrameRecord], bool] | None = None,
        since: float | None = None,
        timeout: float = 5.0,
    ) -> FrameRecord:
        """Like :meth:`wait_frame`, for frames the stub wrote to the provider."""
        return await self._wait_frame(provider_id, "out", type, where, since, timeout)

    async def _wait_frame(
        self,
        provider_id: str,
        direction: Direction,
        type: str,
        where: Callable[[FrameRecord], bool] | None,
        since: float | None,
        timeout: float,
    ) -> FrameRecord:
        def check() -> FrameRecord | None:
            for frame in self.log.frames(provider_id, direction):
                if frame.type != type or (since is not None and frame.time < since):
                    continue
                if where is None or where(frame):
                    return frame
            return None

        verb = "from" if direction == "in" else "to"
        return await self.wait_for(check, timeout, f"{type} frame {verb} {provider_id}")

    async def wait_drop(
        self,
        provider_id: str,
        cause: str | None = None,
        *,
        since: float | None = None,
        timeout: float = 5.0,
    ) -> DropRecord:
        """Await a drop of ``provider_id`` (with ``cause``, if given)."""

        def check() -> DropRecord | None:
            for drop in self.pool.drops:
                if drop.provider_id != provider_id:
                    continue
                if cause is not None and drop.cause != cause:
                    continue
                if since is not None and drop.time < since:
                    continue
                return drop
            return None

        what = f"drop of {provider_id}" + (f" with cause {cause}" if cause else "")
        return await self.wait_for(check, timeout, what)

    async def wait_removed(self, provider_id: str, *, timeout: float = 5.0) -> RemovalRecord:
        """Await ``provider_id`` being removed from the pool after its grace."""

        def check() -> RemovalRecord | None:
            if provider_id in self.pool.providers:
                return None
            for removal in reversed(self.pool.removals):
                if removal.provider_id == provider_id:
                    return removal
            return None

        return await self.wait_for(check, timeout, f"removal of {provider_id}")

    async def wait_rejection(
        self, code: int | None = None, *, since: float | None = None, timeout: float = 5.0
    ) -> RejectRecord:
        """Await a rejected connection (close code or HTTP status ``code``)."""

        def check() -> RejectRecord | None:
            for rejection in self.log.rejections:
                if code is not None and rejection.code != code:
                    continue
                if since is not None and rejection.time < since:
                    continue
                return rejection
            return None

        return await self.wait_for(check, timeout, f"rejection {code}")

    # ------------------------------------------------------------------
    # Protocol actions

    async def drain(self, provider_id: str) -> None:
        """Send ``drain`` and wait until it is written (``KeyError`` if not connected).

        ``drain_status`` answers land in ``provider(pid).drain_status``.
        """
        await self.ws.send_drain(provider_id)

    async def warm_up(self, provider_id: str) -> None:
        """Send ``warm_up`` and wait until it is written."""
        await self.ws.send_warm_up(provider_id)

    async def preflight(
        self,
        provider_id: str,
        estimated_tokens: int = 0,
        *,
        request_id: str | None = None,
        timeout: float = 5.0,
    ) -> PreflightAck:
        """Send ``preflight`` and await the matching ``preflight_ack``."""
        request_id, written = self.ws.send_preflight(provider_id, estimated_tokens, request_id)
        await written
        frame = await self.wait_frame(
            provider_id,
            "preflight_ack",
            where=lambda f: getattr(f.message, "request_id", None) == request_id,
            timeout=timeout,
        )
        return frame.message  # type: ignore[no-any-return]

    async def rekey(self, provider_id: str) -> bool:
        """Run an in-band AEAD rekey on the provider's tier-2 session now.

        Waits for the session to be idle; returns whether the rekey committed
        (a failure closes the session). ``KeyError`` if not connected,
        ``ValueError`` without a tier-2 leg or ``in_band_aead_rekey_v1``.
        """
        session = self.ws.session(provider_id)
        if session.epoch is None or not session.epoch.in_band_rekey:
            raise ValueError(f"{provider_id} has no tier-2 session with in-band rekey")
        return await self.ws.relay.rekey(session, "request_threshold", force=True)

    async def cancel(self, request_id: str, reason: str = "cancelled_by_test") -> bool:
        """Send ``cancel_request`` for a request in flight; whether one was sent."""
        return self.ws.relay.cancel(request_id, reason)

    async def send_request(
        self,
        provider_id: str,
        body: str,
        *,
        stream: bool = False,
        request_id: str | None = None,
    ) -> Flight:
        """Send an ``inference_request`` to ``provider_id`` as the relay sends a buyer's.

        Bypasses routing (the provider may be busy, draining or loading) but
        nothing else: on a tier-2 session the body is sealed with the next
        c2p sequence number, settlement metadata is attached when the
        provider qualifies, and the answer is checked like any other. The
        returned :class:`Flight` yields the chunks and the end. ``KeyError``
        if not connected.
        """
        session = self.ws.session(provider_id)
        return await self.ws.relay.dispatch(
            body, stream=stream, session=session, request_id=request_id
        )

    async def send_raw(self, provider_id: str, data: str | bytes) -> None:
        """Write any frame (TEXT for ``str``, BINARY for ``bytes``) to the provider."""
        await self.ws.session(provider_id).send_raw(data)

    # ------------------------------------------------------------------
    # Faults

    def drop(self, provider_id: str, cause: str = "fault_drop") -> bool:
        """Abort the provider's connection (no close frame). Whether it was connected."""
        session = self.ws.sessions.get(provider_id)
        if session is None:
            return False
        logger.warning("fault: dropping provider_id=%s cause=%s", provider_id, cause)
        session.abort(cause, "fault injected")
        return True

    def stall_reads(self, provider_id: str, stalled: bool = True) -> None:
        """Stop (or resume) reading from and writing to the provider's socket.

        Applies to the provider's current session, like a hung coordinator:
        no frames are read (the socket's receive buffer fills, see
        ``so_rcvbuf``), frames to send wait, and the inactivity timer is
        suspended. ``KeyError`` if not connected.
        """
        logger.warning("fault: stall_reads provider_id=%s stalled=%s", provider_id, stalled)
        self.ws.session(provider_id).stall(stalled)

    def delay_frames(self, seconds: float) -> None:
        """Delay every frame sent to providers by ``seconds`` (0 turns it off)."""
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        logger.warning("fault: delay_frames seconds=%.3f", seconds)
        self.faults.delay_s = seconds

    def duplicate_frames(self, enabled: bool = True) -> None:
        """Write every frame sent to providers twice."""
        logger.warning("fault: duplicate_frames enabled=%s", enabled)
        self.faults.duplicate = enabled

    def refuse_connections(self, seconds: float, *, mode: RefuseMode = "http_503") -> None:
        """Refuse new provider connections for ``seconds``.

        ``mode="http_503"`` answers the upgrade with HTTP 503 and
        ``Retry-After``; ``mode="unlisten"`` closes the listening socket
        (ECONNREFUSED) and listens on the same port again afterwards. Open
        sessions are not affected. 0 seconds ends a 503 refusal.
        """
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        self.ws.refuse(seconds, mode)

    def accept_then_close(
        self,
        count: int | bool = True,
        *,
        code: int = 1013,
        reason: str = "try again later",
    ) -> None:
        """Accept WebSockets, then close them at once with ``code``.

        ``True``: every connection until turned off; an int: the next
        ``count`` connections; ``False``/0: off. Each shows up in
        :attr:`rejections`.
        """
        logger.warning("fault: accept_then_close count=%s code=%d", count, code)
        self.faults.accept_then_close = count
        self.faults.accept_close_code = code
        self.faults.accept_close_reason = reason

    def reset_faults(self) -> None:
        """Turn every stub-wide fault off and un-stall every session."""
        self.faults.reset()
        for session in list(self.ws.sessions.values()):
            session.stall(False)
