"""The provider agent: model, state and the connection, for the life of the process.

:class:`Agent` loads the model while it connects (heartbeats say ``loading``
meanwhile), keeps one :class:`~provider.coordinator.session.Session` at a time and
reconnects forever with the policy of :mod:`provider.coordinator.reconnect`. The state
machine, metrics window and counters live here, across connections; jobs
live in the session they arrived on.

:meth:`Agent.run` returns the process exit code: 0 after a drain asked by a
signal, or a final refusal (4004/4009: restarting would only be refused
again, so launchd must not restart us; the refusal is kept in
``last-refusal.json`` for ``status`` and ``doctor``). A drain asked by the
coordinator is not an exit: the agent drains, waits
:data:`COORDINATOR_DRAIN_RECONNECT_S` and connects again.

Before connecting it knows what registration needs: the model's identity
hash (:mod:`provider.host.model_identity`, cached on disk) and, unless
``catalog_feed_url = "off"``, the catalog admission fields from the
coordinator's signed feed (:mod:`provider.coordinator.catalog`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tenacity
from msgspec import UNSET

from provider import __version__, telemetry
from provider.config import Config, model_id_from, persist_keys
from provider.coordinator.admission import MAX_CONCURRENCY_CEILING
from provider.coordinator.catalog import (
    PRODUCTION_PUBLIC_KEYS,
    CatalogAdmission,
    CatalogError,
    default_feed_url,
    fetch_admission,
)
from provider.coordinator.jobs import Job, Outcome
from provider.coordinator.keys import KeyStore, b64
from provider.coordinator.messages import (
    AuthRequestInitial,
    AuthResponse,
    DiagnosticStatus,
    HardwareSummary,
    Heartbeat,
    Hello,
    HelloAck,
    MetricsSnapshot,
    StateUpdate,
    Tier2Capabilities,
)
from provider.coordinator.receipts import public_key_bytes
from provider.coordinator.reconnect import (
    BackoffPolicy,
    ConnectionLost,
    FatalRefusal,
    is_retryable,
    wait_backoff,
)
from provider.coordinator.safety import observed_at, safety_telemetry
from provider.coordinator.session import Session
from provider.coordinator.state import StateMachine, Status
from provider.coordinator.window import MetricsWindow
from provider.engine import Engine, EngineTimings
from provider.host import guard, hardware
from provider.host.hardware import HardwareFacts
from provider.host.model_identity import ModelIdentity, ModelIdentityError, model_identity
from provider.host.monitor import HostMonitor, Reader
from provider.host.restarts import STATE_FILE, record_start
from provider.host.sensors import HostReader, HostSample
from provider.logs import MIN_SECRET_LENGTH, add_secret

log = logging.getLogger("mlx_provider.agent")

#: After a drain the coordinator asked for: wait this long, then connect again.
COORDINATOR_DRAIN_RECONNECT_S = 10.0
#: The catalog feed is fetched again before a connection when older than this.
CATALOG_TTL_S = 600.0
#: Where a final refusal (4004, 4009) is kept for ``status`` and ``doctor``.
REFUSAL_FILE = "last-refusal.json"


class Agent:
    """Owns everything that outlives one connection.

    ``hooks``, if given, has ``job_started()`` and ``job_finished()``, called
    as jobs come and go (the sleep assertion uses them). ``host_reader`` reads
    the machine (default: :class:`~provider.host.sensors.HostReader` on this
    machine's real sources); the agent samples it in the background and
    holds back for the machine's owner as :mod:`provider.host.guard` says.
    """

    def __init__(
        self,
        config: Config,
        engine: Engine,
        *,
        config_path: Path | None = None,
        hooks: Any = None,
        host_reader: Reader | None = None,
    ) -> None:
        assert config.coordinator_url and config.provider_id and config.model
        self.config = config
        self.config_path = config_path
        self.engine = engine
        self.token = config.provider_token
        self.binary_version = config.advertised_binary_version or __version__
        self.stable_after_s = config.stable_after_s
        self.request_timeout_s = config.request_timeout_s
        self.model_id = config.model_id or model_id_from(config.model)
        self.keys = KeyStore()
        self.identity: ModelIdentity | None = None
        self.identity_error: str | None = None
        self.catalog: CatalogAdmission | None = None
        self.catalog_error: str | None = None
        self._catalog_at = -CATALOG_TTL_S
        #: The last accepted registration's verdict (v2 auth_response / v1 hello_ack).
        self.admission: dict[str, Any] = {}
        if config.max_concurrency > MAX_CONCURRENCY_CEILING:
            log.warning(
                "max_concurrency %d is above the coordinator's ceiling of %d; it will "
                "route at most %d requests at once",
                config.max_concurrency,
                MAX_CONCURRENCY_CEILING,
                MAX_CONCURRENCY_CEILING,
            )
        self.hooks = hooks
        self.service_instance_id = uuid.uuid4().hex
        self.hostname = socket.gethostname().encode()[:253].decode(errors="ignore")
        self.ram_gb = hardware.total_ram_gb()
        # Set by the host monitor, which reads the machine off the event loop.
        self.hardware: HardwareSummary | None = None
        self.host = HostMonitor(
            host_reader or HostReader(),
            interval_s=config.host_sample_interval_s,
            on_hardware=self._hardware_read,
            on_sample=self.host_sampled,
        )
        self.guard_policy = guard.GuardPolicy(
            pause_on_battery=config.pause_on_battery, recover_after_s=config.host_recover_s
        )
        self.holds = guard.Holds()
        self.restart_count = (
            record_start(config_path.parent / STATE_FILE, config.provider_id)
            if config_path is not None
            else 0
        )
        self.policy = BackoffPolicy(
            config.backoff_initial_s, config.backoff_max_s, config.backoff_jitter
        )

        self.state = StateMachine(slots_total=config.max_concurrency)
        self.state_since = datetime.now(UTC)
        self.window = MetricsWindow(interval_s=30.0, started=time.monotonic())
        self.session: Session | None = None
        self.assigned_id: str | None = None
        self.drain_requested = asyncio.Event()
        self._wake = asyncio.Event()
        self.started_at = time.time()
        self.last_heartbeat_sent: float | None = None
        self.connected_since: float | None = None
        self.reconnects: list[dict[str, Any]] = []
        self.totals = {
            "requests": 0,
            "complete": 0,
            "cancelled": 0,
            "errors": 0,
            "tokens_generated": 0,
        }
        self.exit_reason = ""
        self.state.degrade("loading_model")
        telemetry.engine_memory.source = self.engine.memory_status

    # Lifetime --------------------------------------------------------------

    async def run(self) -> int:
        """Serve until drained or finally refused; returns the exit code."""
        load = asyncio.create_task(self._load_model(), name="load_model")
        host = asyncio.create_task(self.host.run(), name="host_monitor")
        try:
            await self._compute_identity()
            return await self._connect_forever()
        except FatalRefusal as exc:
            log.critical("%s; not retrying, fix it and restart", exc)
            self.exit_reason = str(exc)
            self._record_refusal(exc)
            return 0
        finally:
            load.cancel()
            host.cancel()
            await asyncio.gather(load, host, return_exceptions=True)
            telemetry.unwatch_engine(self.model_id)
            await self.engine.close()

    @property
    def model_hash(self) -> str | None:
        """The served model's identity hash, once known."""
        return self.identity.hash if self.identity else None

    async def _compute_identity(self) -> None:
        """Hash the model as published (once; cached on disk) for registration."""
        log.info("computing the model identity (the first time reads every file)")
        try:
            self.identity = await asyncio.to_thread(
                model_identity, self.config.model or "", cache_dir=self.keys.directory
            )
        except (ModelIdentityError, OSError) as exc:
            self.identity_error = str(exc)
            log.warning("no model identity: %s", exc)
            return
        log.info(
            "model identity %s", self.identity.hash, extra={"algorithm": self.identity.algorithm}
        )

    async def _refresh_catalog(self) -> None:
        """Fetch the catalog admission fields when stale; keep the last ones on failure."""
        feed = self.config.catalog_feed_url
        if feed == "off" or (self.config.protocol == "v1" and feed is None):
            return
        if time.monotonic() - self._catalog_at < CATALOG_TTL_S:
            return
        assert self.config.coordinator_url is not None
        url = feed or default_feed_url(self.config.coordinator_url)
        keys = self.config.catalog_public_keys or PRODUCTION_PUBLIC_KEYS
        try:
            self.catalog = await fetch_admission(url, self.model_id, keys)
        except CatalogError as exc:
            self.catalog_error = str(exc)
            log.warning("no catalog admission: %s", exc)
            return
        self._catalog_at = time.monotonic()
        self.catalog_error = None
        row = self.catalog
        if row.model_sha256 and self.model_hash and row.model_sha256 != self.model_hash:
            log.warning(
                "this model's hash %s differs from the catalog row %s (%s): the coordinator "
                "will accept the connection but never route to it",
                self.model_hash,
                row.row_key,
                row.model_sha256,
            )
        log.info(
            "catalog admission: release %s, row %s",
            row.release_id,
            row.row_key,
            extra={"signer": row.signer_key_id},
        )

    def _record_refusal(self, exc: FatalRefusal) -> None:
        """Keep a final refusal where ``status`` and ``doctor`` find it after we exit."""
        record = {
            "close_code": exc.close_code,
            "reason": exc.reason,
            "fix": exc.fix,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "binary_version": self.binary_version,
        }
        try:
            _write_json(self.keys.directory / REFUSAL_FILE, record)
        except OSError as exc2:
            log.warning("could not record the refusal: %s", exc2)

    def _clear_refusal(self) -> None:
        (self.keys.directory / REFUSAL_FILE).unlink(missing_ok=True)

    async def _load_model(self) -> None:
        try:
            info = await self.engine.load()
        except Exception as exc:
            log.exception("model load failed: %s", exc)
            self.set_degraded("model_load_failed")
            return
        finally:
            self.clear_degraded("loading_model")
        telemetry.watch_engine(self.model_id, self.engine.timings)
        log.info(
            "model loaded",
            extra={
                "model_id": info.model_id,
                "load_ms": info.model_load_time_ms,
                "tps_estimate": info.throughput_tps_estimate,
            },
        )

    async def _connect_forever(self) -> int:
        while True:
            retrying = tenacity.AsyncRetrying(
                wait=wait_backoff(self.policy),
                retry=tenacity.retry_if_exception(is_retryable),
                sleep=self._backoff_sleep,
                before_sleep=self._before_sleep,
                reraise=True,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        if self.drain_requested.is_set():
                            return 0
                        if not await self._serve_once():
                            return 0
                # The coordinator drained us: reconnect after a pause (a signal cuts it).
                self._publish(self.state.end_drain())
                log.info("reconnecting in %.0f s after the drain", COORDINATOR_DRAIN_RECONNECT_S)
                await self._backoff_sleep(COORDINATOR_DRAIN_RECONNECT_S)
                if self.drain_requested.is_set():
                    return 0
            except ConnectionLost:
                # A stable session was lost: reconnect at once with a fresh backoff.
                if self.drain_requested.is_set():
                    return 0

    async def _serve_once(self) -> bool:
        """One connection; True when it ended with a drain the coordinator asked for."""
        await self._refresh_catalog()
        session = Session(self)
        self.session = session
        try:
            await session.run()
            if session.drained_by == "coordinator" and not self.drain_requested.is_set():
                return True
            self.exit_reason = "drained"
            return False
        except ConnectionLost as exc:
            telemetry.reconnects.labels(cause=exc.cause).inc()
            self.reconnects.append({"cause": exc.cause, "detail": exc.detail, "at": time.time()})
            del self.reconnects[:-50]
            log.warning(
                "connection lost: %s",
                exc,
                extra={"cause": exc.cause, "close_code": exc.close_code, "stable": exc.stable},
            )
            raise
        finally:
            self.session = None

    async def _backoff_sleep(self, seconds: float) -> None:
        # Woken early by a drain (exit) or a wake from sleep (connect now).
        self._wake.clear()
        waits = [asyncio.ensure_future(e.wait()) for e in (self.drain_requested, self._wake)]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when="FIRST_COMPLETED")
        finally:
            for w in waits:
                w.cancel()

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        delay = state.next_action.sleep if state.next_action else 0.0
        log.info("reconnecting in %.2f s (attempt %d)", delay, state.attempt_number)

    def request_drain(self, source: str) -> None:
        """Stop taking work, finish what runs, then exit 0 (idempotent)."""
        if self.drain_requested.is_set():
            return
        log.info("drain requested", extra={"source": source})
        self.drain_requested.set()
        self._publish(self.state.start_drain())

    def coordinator_drain(self) -> None:
        """The coordinator asked the session to drain; we reconnect afterwards."""
        self._publish(self.state.start_drain())

    def wake_detected(self, gap_s: float) -> None:
        """The machine slept: reconnect now rather than wait for the watchdog."""
        log.warning("wake from sleep detected (%.0f s gap); reconnecting", gap_s)
        self._wake.set()
        if self.session is not None:
            self.session.abort("wake")

    # Session callbacks -----------------------------------------------------

    def session_registered(self, session: Session, ack: HelloAck | AuthResponse) -> None:
        self.assigned_id = ack.assigned_id
        self.connected_since = time.time()
        interval = ack.heartbeat_interval_s or 30
        self.window.interval_s = float(interval)
        self.admission = {
            "protocol": self.config.protocol,
            "auth_state": ack.auth_state or None,
            "tier": ack.tier or None,
            "required_binary_version": ack.required_binary_version or None,
        }
        if isinstance(ack, AuthResponse):
            self.admission["catalog_compatible"] = ack.catalog_compatible
            self.admission["encrypted_leg"] = True
        log.info(
            "registered",
            extra={
                "assigned_id": ack.assigned_id,
                "heartbeat_interval_s": interval,
                "protocol": self.config.protocol,
                "auth_state": ack.auth_state,
            },
        )
        self._clear_refusal()
        # v2: this state_update is what commits the receipt key.
        self._publish(self.state.registered(), force=True)
        self._post_diagnostic()

    def session_ended(self, session: Session) -> None:
        self.connected_since = None
        self._publish(self.state.disconnected("connection_lost"))

    def adopt_token(self, token: str) -> None:
        if token == self.token:
            return
        if len(token) < MIN_SECRET_LENGTH:
            # Too short to redact from the logs; not adopted, never logged.
            log.warning(
                "ignoring the provider token assigned by the coordinator: %d characters, "
                "fewer than %d",
                len(token),
                MIN_SECRET_LENGTH,
            )
            return
        add_secret(token)  # before anything could log it
        if self.config_path is not None:
            persist_keys(self.config_path, {"provider_token": token})
        self.token = token
        log.info("adopted the provider token assigned by the coordinator")

    def heartbeat_sent(self, when: float) -> None:
        self.last_heartbeat_sent = when
        self.window.maybe_roll(time.monotonic())

    # Jobs ----------------------------------------------------------------

    def job_started(self, job: Job) -> None:
        self.totals["requests"] += 1
        telemetry.jobs_in_flight.inc()
        self._publish(self.state.job_started())
        if self.hooks is not None:
            self.hooks.job_started()

    def job_finished(self, job: Job, outcome: Outcome, *, started: bool) -> None:
        telemetry.jobs.labels(status=outcome.status).inc()
        extra = {"request_id": job.request_id, "status": outcome.status, "chunks": job.chunks_sent}
        log.info("job ended", extra=extra | {"completion_tokens": job.completion_tokens})
        if not started:
            return
        telemetry.jobs_in_flight.dec()
        telemetry.tokens_generated.inc(job.completion_tokens)
        self.totals["tokens_generated"] += job.completion_tokens
        key = {"complete": "complete", "cancelled": "cancelled"}.get(outcome.status, "errors")
        self.totals[key] += 1
        end = job.finished_at or time.monotonic()
        if job.first_token_at is not None:
            telemetry.ttft_seconds.observe(job.first_token_at - job.received)
        if outcome.status == "complete":
            decode_s = end - (job.first_token_at or end)
            if decode_s > 0 and job.completion_tokens > 1:
                telemetry.decode_tps.observe((job.completion_tokens - 1) / decode_s)
            self.window.record(
                latency_ms=(end - job.received) * 1000,
                tokens=job.completion_tokens,
                decode_s=decode_s,
            )
        self._publish(self.state.job_finished())
        if self.hooks is not None:
            self.hooks.job_finished()

    # The host ----------------------------------------------------------------

    def _hardware_read(self, facts: HardwareFacts) -> None:
        def within(value: Any, top: float) -> Any:
            return value if value is not None and 0 <= value <= top else None

        # Out-of-range values would make the coordinator drop the whole summary.
        summary = HardwareSummary(
            chip=facts.chip,
            bandwidth_gb_per_s=within(facts.bandwidth_gb_per_s, 10_000),
            network_power_kw=within(facts.network_power_kw, 10.0),
            gpu_cores_total=within(facts.gpu_cores, 4096),
            cpu_cores_total=within(facts.cpu_cores, 1024),
        )
        self.hardware = summary if summary != HardwareSummary() else None

    def host_sampled(self, sample: HostSample) -> None:
        """Hold back for the machine's owner, or come back, after a new reading.

        The state machine takes every change first (slot limit, degraded
        reasons), then one ``state_update`` says where it ended.
        """
        if not self.config.host_guard:
            return
        before = self.holds
        self.holds = after = guard.step(self.guard_policy, before, sample, time.monotonic())
        if dict(after.active) == dict(before.active):
            return
        facts = {
            "memory_pressure": sample.memory_pressure,
            "thermal_state": sample.thermal_state,
            "power_source": sample.power_source,
        }
        for reason in after.active.keys() - before.active.keys():
            slots = after.active[reason]
            log.warning("holding back for the owner: %s (%d slots)", reason, slots, extra=facts)
        for reason in before.active.keys() - after.active.keys():
            log.info("no longer holding back: %s", reason, extra=facts)
        changes = [self.state.limit_slots(after.slot_limit, after.limiting_reason)]
        changes += [self.state.degrade(r) for r in after.pauses if r not in before.pauses]
        changes += [self.state.recover(r) for r in before.pauses if r not in after.pauses]
        self._publish(next((c for c in reversed(changes) if c is not None), None), force=True)
        self._post_diagnostic()

    def _post_diagnostic(self) -> None:
        """Tell the coordinator's operators what state we are in and why."""
        session = self.session
        if session is None or session.registered_at is None or session.sender is None:
            return
        if not (self.config.provider_id and self.assigned_id):
            return
        status, sample = self.state.status(), self.host.latest
        reason = status.reason
        if self.holds.active:
            held = ", ".join(f"{r} ({n} slots)" for r, n in self.holds.active.items())
            reason = f"{reason}; holding back for the host: {held}"
        rss = sample.rss_bytes if sample is not None else None
        session.sender.post(
            DiagnosticStatus(
                provider_id=self.config.provider_id,
                assigned_id=self.assigned_id,
                status=status.state,
                model_id=self.model_id,
                model_loaded=self.engine.info is not None,
                reason=reason[:1000],
                observed_at=observed_at(datetime.now(UTC)),
                binary_version=self.binary_version,
                uptime_s=int(time.time() - self.started_at),
                requests_total=self.totals["requests"],
                requests_in_flight=self.state.in_flight,
                errors_total=self.totals["errors"],
                restart_count=self.restart_count,
                memory_rss_mb=rss // 2**20 if rss is not None else None,
                memory_pressure=sample.memory_pressure if sample else None,
                thermal_state=sample.thermal_state if sample else None,
                thermally_throttled=sample.thermally_throttled if sample else None,
            )
        )

    def host_status(self) -> dict[str, Any]:
        """The machine as the status page shows it."""
        facts, sample = self.host.hardware, self.host.latest
        return {
            "chip": facts.chip if facts else None,
            "cpu_cores": facts.cpu_cores if facts else None,
            "gpu_cores": facts.gpu_cores if facts else None,
            "memory_pressure": sample.memory_pressure if sample else None,
            "thermal_state": sample.thermal_state if sample else None,
            "thermally_throttled": sample.thermally_throttled if sample else None,
            "power_source": sample.power_source if sample else None,
            "cpu_pct": sample.cpu_pct if sample else None,
            "gpu_pct": sample.gpu_pct if sample else None,
            "observed_at_unix": sample.observed_at if sample else None,
            "guard": self.config.host_guard,
            "holding_back": [
                {"reason": reason, "slot_limit": limit}
                for reason, limit in self.holds.active.items()
            ],
            "slots_offered": self.state.slots_offered,
            "restart_count": self.restart_count,
        }

    # State -----------------------------------------------------------------

    def set_degraded(self, reason: str) -> None:
        self._publish(self.state.degrade(reason))

    def clear_degraded(self, reason: str) -> None:
        self._publish(self.state.recover(reason))

    def _publish(self, change: Status | None, *, force: bool = False) -> None:
        if change is not None:
            self.state_since = datetime.now(UTC)
            log.info("state %s (%s)", change.state, change.reason)
        session = self.session
        if (change is None and not force) or session is None or session.registered_at is None:
            return
        assert session.sender is not None
        status = self.state.status()
        session.sender.post(
            StateUpdate(
                state=status.state,
                reason=status.reason,
                since=self.state_since.isoformat(timespec="milliseconds"),
                metrics_snapshot=MetricsSnapshot(
                    slots_free=status.slots_free,
                    slots_total=status.slots_total,
                    **_window_fields(self.window),
                ),
            )
        )

    # Messages --------------------------------------------------------------

    def throughput_estimate(self) -> float:
        info = self.engine.info
        return info.throughput_tps_estimate if info else 0.0

    def _model_fields(self) -> dict[str, Any]:
        """Model facts for hello and heartbeats; zeros until the model has loaded."""
        info = self.engine.info
        return {
            "model_id": self.model_id,
            "model_params_b": info.model_params_b if info else 0.0,
            "ram_gb": self.ram_gb,
            "max_context_tokens": (
                info.max_context_tokens if info else self.config.max_context_tokens
            )
            or 0,
            "max_concurrency": self.config.max_concurrency,
            "throughput_tps_estimate": info.throughput_tps_estimate if info else 0.0,
        }

    def _admission_fields(self) -> dict[str, Any]:
        """Model identity, catalog and compatibility set: only what is known."""
        fields: dict[str, Any] = {}
        if self.identity is not None:
            fields["model_hash"] = self.identity.hash
            fields["model_hash_algorithm"] = self.identity.algorithm
        if self.catalog is not None:
            fields.update(self.catalog.fields())
        if self.config.compatibility_set_id:
            fields["compatibility_set_id"] = self.config.compatibility_set_id
        if self.config.referral_code:
            fields["referral_code"] = self.config.referral_code
        return fields

    def hello_message(self) -> Hello:
        info = self.engine.info
        assert self.config.provider_id is not None
        return Hello(
            provider_id=self.config.provider_id,
            hostname=self.hostname,
            binary_version=self.binary_version,
            attestation=None,
            model_load_time_ms=info.model_load_time_ms if info else None,
            supported_models=[self.model_id],
            **self._model_fields(),
            **self._admission_fields(),
        )

    def auth_initial(self, ecdh_public_key: str, *, bootstrap: bool) -> AuthRequestInitial:
        """The v2 ``auth_request`` (initial) for this connection's X25519 key."""
        info = self.engine.info
        assert self.config.provider_id is not None
        admission: dict[str, Any] = {}
        if self.config.admission_identity:
            current, _ = self.keys.admission_keys()
            admission["provider_admission_public_key"] = b64(public_key_bytes(current))
        fields = self._model_fields()
        # The coordinator's auth_request wants a positive concurrency, like hello.
        return AuthRequestInitial(
            provider_id=self.config.provider_id,
            hostname=self.hostname,
            binary_version=self.binary_version,
            provider_ecdh_public_key=ecdh_public_key,
            tier2_capabilities=Tier2Capabilities(),
            provider_receipt_public_key=b64(self.keys.receipt_public()),
            supported_models=[self.model_id],
            model_load_time_ms=info.model_load_time_ms if info else UNSET,
            credential_bootstrap=True if bootstrap else UNSET,
            **admission,
            **fields,
            **self._admission_fields(),
        )

    def heartbeat_message(self) -> Heartbeat:
        status = self.state.status()
        heartbeat = Heartbeat(
            status=status.state,
            slots_free=status.slots_free,
            slots_total=status.slots_total,
            loading=self.engine.loading,
            hardware_summary=self.hardware,
            service_instance_id=self.service_instance_id,
            model_hash=self.identity.hash if self.identity else UNSET,
            model_hash_algorithm=self.identity.algorithm if self.identity else UNSET,
            **self._model_fields(),
            **_window_fields(self.window),
        )
        heartbeat.safety_telemetry = self._safety_telemetry(heartbeat)
        return heartbeat

    def _safety_telemetry(self, heartbeat: Heartbeat) -> Any:
        # The host's facts come from the monitor's latest sample: no I/O here
        # but the process's RSS before the first sample (a file read).
        sample = self.host.latest
        rss = sample.rss_bytes if sample is not None else None
        compatibility_set_id = getattr(self, "compatibility_set_id", None) or getattr(
            self.config, "compatibility_set_id", None
        )
        return safety_telemetry(
            heartbeat,
            provider_id=self.config.provider_id,
            reading=sample,
            model_loaded=self.engine.info is not None,
            requests_in_flight=self.state.in_flight,
            rss_bytes=rss if rss is not None else hardware.rss_bytes(),
            restart_count=self.restart_count,
            uptime_s=time.time() - self.started_at,
            assigned_id=self.assigned_id,
            binary_version=self.binary_version,
            compatibility_set_id=compatibility_set_id,
        )

    def status(self) -> dict[str, Any]:
        """What ``GET /status`` shows; never the token."""
        info = self.engine.info
        session = self.session
        connection = "disconnected"
        if session is not None:
            connection = "connected" if session.registered_at is not None else "connecting"
        status = self.state.status()
        return {
            "connection": connection,
            "state": status.state,
            "state_reason": status.reason,
            "provider_id": self.config.provider_id,
            "assigned_id": self.assigned_id,
            "coordinator_url": self.config.coordinator_url,
            "last_heartbeat_sent_unix": self.last_heartbeat_sent,
            "jobs_in_flight": self.state.in_flight,
            "slots_free": status.slots_free,
            "slots_total": status.slots_total,
            "totals": dict(self.totals),
            "model": {
                "id": self.model_id,
                "params_b": info.model_params_b if info else None,
                "loading": self.engine.loading,
                "max_context_tokens": info.max_context_tokens if info else None,
                "throughput_tps_estimate": info.throughput_tps_estimate if info else None,
                **_pace_fields(self.engine.timings()),
            },
            "memory": {"rss_bytes": hardware.rss_bytes(), **_memory_fields(self.engine)},
            "host": self.host_status(),
            "reconnects": len(self.reconnects),
            "last_disconnect": self.reconnects[-1] if self.reconnects else None,
            "uptime_s": round(time.time() - self.started_at, 3),
            "admission": self.admission_status(),
        }

    def admission_status(self) -> dict[str, Any]:
        """What a coordinator's admission and routing gates see of this provider."""
        catalog = self.catalog
        hash_matches = None
        if catalog is not None and catalog.model_sha256 and self.model_hash:
            hash_matches = catalog.model_sha256 == self.model_hash
        return {
            "protocol": self.config.protocol,
            "binary_version": self.binary_version,
            "model_id": self.model_id,
            "compatibility_set_id": self.config.compatibility_set_id,
            "token": "set" if self.token else "none (bootstrap or self-mint)",
            "registration": self.admission or None,
            "model_hash": self.model_hash,
            "model_hash_error": self.identity_error,
            "catalog": {
                "release_id": catalog.release_id,
                "row": catalog.row_key,
                "model_sha256": catalog.model_sha256,
                "hash_matches": hash_matches,
            }
            if catalog
            else None,
            "catalog_error": self.catalog_error,
            "routable_model_hash": hash_matches is not False,
        }

    def is_healthy(self) -> bool:
        return self.session is not None and self.state.state in ("ready", "busy")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _pace_fields(t: EngineTimings) -> dict[str, Any]:
    """The engine's inter-token latency and prefill slice, as the status document shows them."""
    return {
        "inter_token_latency_ms": {
            "p50": _ms(t.inter_token_p50_s),
            "p99": _ms(t.inter_token_p99_s),
            "max": _ms(t.inter_token_max_s),
            "samples": t.inter_token_samples,
        },
        "prefill_slice": {
            # None: no time slicing, chunks are a fixed prefill_step_size.
            "budget_ms": _ms(t.prefill_slice_s),
            "tokens": t.prefill_chunk_tokens,
            "tokens_per_s": None
            if t.prefill_tokens_per_s is None
            else round(t.prefill_tokens_per_s, 1),
        },
    }


def _window_fields(window: MetricsWindow) -> dict[str, Any]:
    v = window.values()
    return {
        "requests_served_since_last": v.requests_served_since_last,
        "avg_latency_ms_since_last": v.avg_latency_ms_since_last,
        "throughput_tps_since_last": v.throughput_tps_since_last,
    }


def _memory_fields(engine: Engine) -> dict[str, Any]:
    """KV memory and prefix cache figures for ``status``."""
    memory = engine.memory_status()
    if memory is None:
        return {}
    return {
        "kv_budget_bytes": memory.budget_bytes,
        "kv_reserved_bytes": memory.reserved_bytes,
        "kv_bytes_per_token": round(memory.kv_bytes_per_token, 1),
        "requests_waiting_for_memory": memory.waiting_for_memory,
        "prompt_cache": {
            "bytes": memory.prompt_cache_bytes,
            "max_bytes": memory.prompt_cache_max_bytes,
            "entries": memory.prompt_cache_entries,
            "lookups": memory.prompt_cache_lookups,
            "hits": memory.prompt_cache_hits,
            "hit_rate": round(memory.hit_rate, 4),
            "cached_tokens": memory.cached_tokens,
            "token_hit_rate": round(memory.token_hit_rate, 4),
        },
    }


def _write_json(path: Path, value: Any) -> None:
    """Write ``value`` to ``path`` atomically, mode 0600."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
