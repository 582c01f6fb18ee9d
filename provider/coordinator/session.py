"""One connection to the coordinator, from handshake to close.

:meth:`Session.run` connects (Bearer auth only with a token, no redirects,
no proxy unless configured, no WebSocket pings unless configured), registers
(v2: ``auth_request`` initial -> ``auth_challenge`` -> ``auth_request`` proof
-> ``auth_response``; v1: ``hello`` -> ``hello_ack``), then runs these tasks
until one of them ends:

- receive: receives frames and puts them on an unbounded queue, nothing else,
  so nothing a handler does can stop the next receive;
- handler: takes frames off the queue in order, decodes them at the edge and
  dispatches; anything that takes time (inference, drain, warm-up, a rekey
  waiting for idle) becomes a task of its own;
- writer: the one serialised path for every outbound frame (:mod:`sender`),
  each write bounded in time;
- heartbeat and watchdog (:mod:`heartbeat`);
- drain: waits for a drain request (a signal, or the coordinator's ``drain``)
  and carries it out.

On the v2 encrypted leg (:mod:`tier2`) every ``inference_request`` is opened
and every chunk and end frame sealed, in the order they are queued for the
writer, so the sequence numbers go out in order. A frame that does not open
is refused with ``nak tier2_aead_decrypt_failed`` naming the request.

It returns normally only after a completed drain (:attr:`Session.drained_by`
says whose); every other end is a
:class:`~provider.coordinator.reconnect.ConnectionLost` (or
:class:`FatalRefusal`) for the agent's reconnect loop. On the way out,
in-flight jobs are cancelled and their slots freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Coroutine
from typing import Any, Protocol, TypeVar

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from provider.config import Config
from provider.coordinator import handshake, tier2
from provider.coordinator.admission import BOOTSTRAP_PROVIDER_ID
from provider.coordinator.heartbeat import (
    heartbeat_loop,
    heartbeat_tick,
    watchdog_loop,
    watchdog_timeout,
)
from provider.coordinator.jobs import Job, JobTable, Outcome, end_frame, relay
from provider.coordinator.keys import KeyStore, b64
from provider.coordinator.messages import (
    MAX_FRAME_BYTES,
    AeadRekeyCommit,
    AeadRekeyCommitted,
    AeadRekeyRequest,
    AeadRekeyResponse,
    AuthChallenge,
    AuthRequestInitial,
    AuthRequestProof,
    AuthResponse,
    CancelRequest,
    Drain,
    DrainStatus,
    EncryptedChunk,
    EncryptedEnd,
    Heartbeat,
    Hello,
    HelloAck,
    InferenceRequest,
    InferenceResponseChunk,
    InferenceResponseEnd,
    Invalid,
    Nak,
    NakError,
    Preflight,
    PreflightAck,
    RequestPlaintext,
    WarmUp,
    decode_coordinator_frame,
    encode,
    encode_text,
    message_type,
)
from provider.coordinator.receipts import (
    InvalidSettlement,
    build_receipt,
    parse_settlement,
    public_key_bytes,
)
from provider.coordinator.reconnect import (
    CLOSE_REASONS,
    FATAL_CLOSE_CODES,
    ConnectionLost,
    FatalRefusal,
    close_policy,
)
from provider.coordinator.sender import Sender
from provider.coordinator.sockopts import harden
from provider.coordinator.state import StateMachine
from provider.engine import Engine
from provider.openai.request import BadRequest, ChatCompletionRequest, decode_chat_request

log = logging.getLogger("mlx_provider.coordinator.session")
T = TypeVar("T")

HANDSHAKE_TIMEOUT_S = 10.0
#: After a self-minted token: close, wait this long, reconnect with Bearer.
TOKEN_UPGRADE_GRACE_S = 2.0
#: Admitted without a validated Bearer: the coordinator does not route to the session.
UNROUTED_AUTH_STATES = frozenset({"self_minted", "bearerless_duplicate"})
#: How often the leg's rekey thresholds are looked at without in-band rekey.
REKEY_CHECK_S = 5.0

_plaintext_decoder = msgspec.json.Decoder(RequestPlaintext)


# OpenSSL's X509_V_ERR_* codes that have a cause a provider owner can act on.
_CERT_EXPIRED = {9: "is not valid yet (is this machine's clock right?)", 10: "has expired"}
_CERT_WRONG_HOST = frozenset({62, 64})  # host name, IP address mismatch
_CERT_UNTRUSTED = frozenset({2, 18, 19, 20, 21})  # no trusted issuer, self-signed


def tls_failure(exc: ssl.SSLError, host: str) -> str:
    """One line naming why the TLS handshake with ``host`` failed, for logs and doctor.

    The connection is refused in every case: a ``wss://`` URL is never
    retried as ``ws://``.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        code, detail = exc.verify_code, exc.verify_message
        if code in _CERT_EXPIRED:
            cause = f"the coordinator's certificate {_CERT_EXPIRED[code]}"
        elif code in _CERT_WRONG_HOST:
            cause = f"the coordinator's certificate is not for {host} (check coordinator_url)"
        elif code in _CERT_UNTRUSTED:
            cause = (
                "the coordinator's certificate is not signed by a CA this machine trusts "
                "(python.org Python on macOS: run 'Install Certificates.command'; "
                "a private CA: point SSL_CERT_FILE at it)"
            )
        else:
            cause = "the coordinator's certificate failed verification"
        return f"TLS with {host} refused: {cause} ({detail})"
    reason = exc.reason or str(exc)
    if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
        return (
            f"TLS with {host} failed: the server did not answer in TLS ({reason}); "
            "is that port a wss:// endpoint?"
        )
    return f"TLS with {host} failed: {reason}"


class _Connection(ClientConnection):
    """websockets' client connection, remembering why the transport was lost."""

    lost_exc: BaseException | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_exc = exc
        super().connection_lost(exc)


def _timed_out_by_kernel(ws: ClientConnection | None) -> bool:
    exc = getattr(ws, "lost_exc", None)
    return isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT


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
    keys: KeyStore

    @property
    def model_hash(self) -> str | None: ...
    def hello_message(self) -> Hello: ...
    def auth_initial(self, ecdh_public_key: str, *, bootstrap: bool) -> AuthRequestInitial: ...
    def heartbeat_message(self) -> Heartbeat: ...
    def heartbeat_sent(self, when: float) -> None: ...
    def adopt_token(self, token: str) -> None: ...
    def session_registered(self, session: Session, ack: HelloAck | AuthResponse) -> None: ...
    def session_ended(self, session: Session) -> None: ...
    def job_started(self, job: Job) -> None: ...
    def job_finished(self, job: Job, outcome: Outcome, *, started: bool) -> None: ...
    def request_drain(self, source: str) -> None: ...
    def coordinator_drain(self) -> None: ...
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
        #: The v2 encrypted leg, once ``auth_response`` accepted it.
        self.leg: tier2.EncryptedLeg | None = None
        #: v2: the accepted ``auth_response`` (auth state, tier, catalog verdict).
        self.auth: AuthResponse | None = None
        #: Who the completed drain was for: ``signal`` (exit) or ``coordinator`` (reconnect).
        self.drained_by: str | None = None
        self._abort_cause: str | None = None
        self._abort_detail = ""
        #: The kernel's unacknowledged-data limit on this socket, once applied:
        #: "15 s (TCP_USER_TIMEOUT)".
        self._unacked_limit: str | None = None
        self._warm_up_task: asyncio.Task[None] | None = None
        self._coordinator_drain = asyncio.Event()
        self._rekey: tier2.PendingRekey | None = None
        self._rekey_task: asyncio.Task[None] | None = None

    # Connection ----------------------------------------------------------

    async def _connect(self) -> ClientConnection:
        cfg = self.config
        pings = 20.0 if cfg.ws_pings else None
        # No token, no header: an empty Bearer is refused with 4005.
        headers = {"Authorization": f"Bearer {self.owner.token}"} if self.owner.token else {}
        try:
            return await NoRedirectConnect(
                cfg.coordinator_url,
                additional_headers=headers,
                user_agent_header=f"mlx-provider/{self.owner.binary_version}",
                proxy=cfg.proxy,
                ping_interval=pings,
                ping_timeout=pings,
                compression=None,
                max_size=MAX_FRAME_BYTES,
                open_timeout=HANDSHAKE_TIMEOUT_S,
                close_timeout=cfg.send_timeout_s,
                create_connection=_Connection,
            )
        except InvalidStatus as exc:
            raise ConnectionLost("refused", f"HTTP {exc.response.status_code}") from None
        except ssl.SSLError as exc:
            host = urllib.parse.urlsplit(cfg.coordinator_url or "").hostname or "?"
            raise ConnectionLost("tls", tls_failure(exc, host)) from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise ConnectionLost("refused", f"{type(exc).__name__}: {exc}") from None

    def abort(self, cause: str, detail: str = "") -> None:
        """Drop the connection at once (no close handshake); run() raises ConnectionLost.

        The first cause wins; its ``detail`` is what the log says, whichever
        task notices the dropped connection first.
        """
        if self._abort_cause is None:
            self._abort_cause, self._abort_detail = cause, detail
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
            raise ConnectionLost(self._abort_cause, self._abort_detail)
        if code in FATAL_CLOSE_CODES:
            raise FatalRefusal(code, reason)
        what = CLOSE_REASONS.get(code or 0, "")
        detail = f"code {code} {what} {reason}".strip() if code else "connection lost"
        fix = close_policy(code, reason).fix
        if fix:
            detail += f"; {fix}"
        raise ConnectionLost("closed", detail, close_code=code, close_reason=reason)

    async def _race(
        self,
        aw: Awaitable[T],
        background: list[asyncio.Task[Any]],
        timeout: float,
        waiting_for: str = "hello_ack",
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
            raise ConnectionLost("handshake_timeout", f"no {waiting_for} within {timeout:g} s")
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
            if self.config.protocol == "v2":
                await self._register_v2(list(tasks))
            else:
                await self._register(list(tasks))
            tick = heartbeat_tick(self.heartbeat_interval_s)
            applied = harden(
                self.ws.transport.get_extra_info("socket"), unacked_timeout_s=watchdog_timeout(tick)
            )
            for option in ("TCP_USER_TIMEOUT", "TCP_RXT_CONNDROPTIME"):
                if option in applied:
                    self._unacked_limit = f"{watchdog_timeout(tick):g} s ({option})"
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
                    self._silence,
                    lambda detail: self.abort("watchdog", detail),
                    timeout=watchdog_timeout(tick),
                ),
                "watchdog",
            )
            if self.leg is not None and not self.leg.in_band_rekey:
                start(self._rekey_by_reconnect(), "rekey_watch")
            drain = start(self._drain_when_asked(), "drain")
            done, _ = await asyncio.wait(tasks, return_when="FIRST_COMPLETED")
            if drain in done and drain.exception() is None:
                return
            for task in done:
                task.result()
            raise ConnectionLost("closed", "session task ended")
        except ConnectionLost as exc:
            stable = exc.stable or (
                self.registered_at is not None
                and time.monotonic() - self.registered_at >= self.owner.stable_after_s
            )
            cause, detail = exc.cause, exc.detail
            if self._abort_cause is not None:
                cause, detail = self._abort_cause, self._abort_detail or exc.detail
            if self._abort_cause is None and _timed_out_by_kernel(self.ws):
                # Nothing we sent was acknowledged for that long: the path is
                # dead even though our sends completed (into the kernel).
                cause = "tcp_timeout"
                detail = "the kernel dropped the connection: data unacknowledged"
                if self._unacked_limit is not None:
                    detail += f" for {self._unacked_limit}"
            raise ConnectionLost(
                cause,
                detail,
                stable=stable,
                close_code=exc.close_code,
                close_reason=exc.close_reason,
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
            for extra in (self._warm_up_task, self._rekey_task):
                if extra is not None:
                    tasks.append(extra)
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

    async def _next_frame(self, background: list[asyncio.Task[Any]], waiting_for: str) -> Any:
        _, raw = await self._race(self.inbox.get(), background, HANDSHAKE_TIMEOUT_S, waiting_for)
        return raw

    async def _register(self, background: list[asyncio.Task[Any]]) -> None:
        """v1: ``hello`` -> ``hello_ack``."""
        assert self.sender is not None
        await self._race(
            self.sender.send(self.owner.hello_message()), background, HANDSHAKE_TIMEOUT_S
        )
        raw = await self._next_frame(background, "hello_ack")
        ack = decode_coordinator_frame(raw)
        if not isinstance(ack, HelloAck):
            what = ack.message if isinstance(ack, Invalid) else message_type(ack)
            raise ConnectionLost("handshake_failed", f"expected hello_ack, got {what}")
        self.heartbeat_interval_s = ack.heartbeat_interval_s
        if ack.assigned_provider_token:
            await self._take_token(ack.assigned_provider_token, ack.auth_state, background)
        self._warn_unrouted(ack.auth_state)
        if ack.required_binary_version:
            log.warning(
                "coordinator requires binary version %s (we are %s)",
                ack.required_binary_version,
                self.owner.binary_version,
            )
        self.registered_at = time.monotonic()
        self.owner.session_registered(self, ack)

    async def _register_v2(self, background: list[asyncio.Task[Any]]) -> None:
        """v2: ``auth_request`` initial and proof; keys for the encrypted leg."""
        assert self.sender is not None and self.config.provider_id is not None
        owner, provider_id = self.owner, self.config.provider_id
        bootstrap = not owner.token and bool(BOOTSTRAP_PROVIDER_ID.fullmatch(provider_id))
        ecdh = tier2.generate_key()
        ecdh_public = tier2.public_bytes(ecdh)
        initial = owner.auth_initial(tier2.b64url(ecdh_public), bootstrap=bootstrap)
        # The transcript is over these exact bytes.
        initial_text = encode_text(initial)
        await self._race(
            self.sender.send_text(initial_text), background, HANDSHAKE_TIMEOUT_S, "auth_challenge"
        )
        raw = await self._next_frame(background, "auth_challenge")
        challenge = decode_coordinator_frame(raw)
        if isinstance(challenge, AuthResponse):
            await self._rejected(challenge, background)
        if not isinstance(challenge, AuthChallenge):
            what = challenge.message if isinstance(challenge, Invalid) else message_type(challenge)
            raise ConnectionLost("handshake_failed", f"expected auth_challenge, got {what}")
        suite = challenge.selected_aead or challenge.selected_aead_suite
        try:
            coordinator_public = tier2.b64url_decode(challenge.coordinator_ecdh_public_key)
            keys = tier2.derive_keys(
                tier2.shared_secret(ecdh, coordinator_public),
                provider_id,
                challenge.assigned_id,
                ecdh_public,
                coordinator_public,
                suite,
            )
        except tier2.AeadError as exc:
            raise ConnectionLost("handshake_failed", f"key exchange failed: {exc}") from None
        if challenge.key_id and challenge.key_id != keys.kid:
            raise ConnectionLost(
                "handshake_failed", "the challenge's key_id differs from the derived key id"
            )
        await self.sender.send(self._proof(initial, initial_text, challenge, raw, bootstrap))
        raw = await self._next_frame(background, "auth_response")
        response = decode_coordinator_frame(raw)
        if not isinstance(response, AuthResponse):
            what = response.message if isinstance(response, Invalid) else message_type(response)
            raise ConnectionLost("handshake_failed", f"expected auth_response, got {what}")
        if response.status != "accepted":
            await self._rejected(response, background)
        problem = handshake.check_accepted(response, keys.kid)
        if problem:
            raise ConnectionLost("handshake_failed", problem)
        self._reconcile_admission_identity(response)
        if response.assigned_provider_token:
            await self._take_token(
                response.assigned_provider_token, response.auth_state, background, bootstrap
            )
        self._warn_unrouted(response.auth_state)
        leg = response.tier2_session.encrypted_leg  # type: ignore[union-attr]
        self.leg = tier2.EncryptedLeg(
            keys,
            provider_id,
            response.assigned_id,
            chunk_envelope=leg.response_chunk_plaintext_envelope,
            in_band_rekey=leg.in_band_aead_rekey_v1,
            rekey_after_requests=leg.rekey_after_requests,
            rekey_after_seconds=float(leg.rekey_after_seconds),
            started_at=time.monotonic(),
        )
        self.auth = response
        self.heartbeat_interval_s = response.heartbeat_interval_s or 30
        self.registered_at = time.monotonic()
        # The first state_update after this commits our receipt key.
        self.owner.session_registered(self, response)

    def _proof(
        self,
        initial: AuthRequestInitial,
        initial_text: str,
        challenge: AuthChallenge,
        challenge_raw: str | bytes,
        bootstrap: bool,
    ) -> AuthRequestProof:
        keys = self.owner.keys
        transcript = handshake.transcript_sha256(initial_text)
        fields = {
            "auth_attempt_id": challenge.auth_attempt_id,
            "provider_id": initial.provider_id,
            "binary_version": initial.binary_version,
            "provider_ecdh_public_key": initial.provider_ecdh_public_key,
            "transcript": transcript,
        }
        key = None
        if challenge.admission_identity_public_key:
            try:
                wanted = tier2.b64url_decode(
                    challenge.admission_identity_public_key.replace("+", "-").replace("/", "_")
                )
            except tier2.AeadError:
                wanted = b""
            key = keys.signing_key_for(wanted)
            if key is None:
                log.error(
                    "the coordinator asks for a signature by identity key %s, which this "
                    "provider does not hold; restore ~/.config/mlx-provider/ from a backup",
                    challenge.admission_identity_public_key,
                )
        if bootstrap:
            value = handshake.bootstrap_tuple(msgspec.json.decode(challenge_raw), **fields)
            key = keys.receipt_key()
        else:
            value = handshake.identity_tuple(**fields)
            if key is None and not challenge.admission_identity_public_key:
                admission = keys.existing_admission_keys()
                key = admission[0] if admission else keys.receipt_key()
        return AuthRequestProof(
            auth_attempt_id=challenge.auth_attempt_id,
            provider_id=initial.provider_id,
            identity_signature=handshake.sign(key, value) if key else msgspec.UNSET,
            identity_signature_transcript_sha256=transcript if key else msgspec.UNSET,
            supported_models=initial.supported_models,
            credential_bootstrap=initial.credential_bootstrap,
            referral_code=initial.referral_code,
        )

    def _reconcile_admission_identity(self, response: AuthResponse) -> None:
        """The coordinator rotated our admission identity: follow it locally."""
        if not response.admission_identity_public_key or not self.config.admission_identity:
            return
        _, following = self.owner.keys.admission_keys()
        if response.admission_identity_public_key == b64(public_key_bytes(following)):
            log.info("the coordinator rotated the admission identity to the next key")
            self.owner.keys.promote_admission_next()

    async def _rejected(self, response: AuthResponse, background: list[asyncio.Task[Any]]) -> None:
        """Log the refusal, then let its close code decide (it follows at once)."""
        error = response.error
        code = (error.code if error else "") or "unknown"
        message = error.message if error else ""
        log.error("auth_response rejected: %s %s", code, message, extra={"code": code})
        await self._race(
            asyncio.sleep(HANDSHAKE_TIMEOUT_S), background, HANDSHAKE_TIMEOUT_S + 1, "close"
        )
        raise ConnectionLost("auth_rejected", f"{code}: {message}".strip(": "))

    async def _take_token(
        self,
        token: str,
        auth_state: str | None,
        background: list[asyncio.Task[Any]],
        bootstrap: bool = False,
    ) -> None:
        """Persist a token the coordinator minted, then reconnect with it if that is
        what makes us routable (a bootstrap, a self-minted or bearerless session).

        Persisted before use: a crash right after must not lose it. A token
        handed to a session that is routable already is only kept for the
        next connection: reconnecting for it would gain nothing.
        """
        self.owner.adopt_token(token)
        if self.owner.token != token:
            return  # refused; the owner said why
        if bootstrap or auth_state in UNROUTED_AUTH_STATES:
            await self._upgrade_token(background, bootstrap=bootstrap)

    def _warn_unrouted(self, auth_state: str | None) -> None:
        if auth_state in UNROUTED_AUTH_STATES:
            log.warning(
                "admitted as %s: the coordinator will not route requests to this session",
                auth_state,
            )

    async def _upgrade_token(self, background: list[asyncio.Task[Any]], *, bootstrap: bool) -> None:
        """Reconnect with the new token: only a Bearer-validated session is routed."""
        assert self.ws is not None
        if bootstrap:
            log.info("credential bootstrap minted a token; reconnecting with it")
            # The coordinator closes after a bootstrap; wait for that close.
            with contextlib.suppress(ConnectionLost):
                await self._race(
                    asyncio.sleep(HANDSHAKE_TIMEOUT_S), background, HANDSHAKE_TIMEOUT_S + 1
                )
        else:
            log.info(
                "the coordinator minted a token (self-mint); reconnecting with it in %.0f s",
                TOKEN_UPGRADE_GRACE_S,
            )
            with contextlib.suppress(Exception):
                await self.ws.close(1000, "token upgrade")
            await asyncio.sleep(TOKEN_UPGRADE_GRACE_S)
        raise ConnectionLost("token_upgrade", "reconnecting with the minted token", stable=True)

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
                self._on_coordinator_drain()
            case WarmUp():
                if self._warm_up_task is None or self._warm_up_task.done():
                    self._warm_up_task = asyncio.create_task(self._warm_up(), name="warm_up")
            case AeadRekeyRequest():
                self._on_rekey_request(msg)
            case AeadRekeyCommit():
                await self._on_rekey_commit(msg)
            case HelloAck() | AuthChallenge() | AuthResponse():
                log.info("ignoring %s after registration", message_type(msg))
            case Invalid(code="unknown_message_type"):
                # An optional feature we do not have. A nak with this code would
                # make the coordinator stop routing to us over the WebSocket.
                log.info("ignoring unknown message type %r", msg.type)
            case Invalid():
                # msg.type is already cut to MAX_TYPE_ECHO; the message may quote input.
                log.warning(
                    "nak %s: %s",
                    msg.code,
                    msg.message[:300],
                    extra={"in_reply_to": msg.in_reply_to, "code": msg.code},
                )
                await self._nak(msg.in_reply_to, msg.code, msg.message)

    async def _nak(self, in_reply_to: str, code: str, message: str) -> None:
        assert self.sender is not None
        await self.sender.send(
            Nak(in_reply_to=in_reply_to, error=NakError(code=code, message=message[:500]))
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

    async def _request_body(self, msg: InferenceRequest) -> tuple[str, str | None] | None:
        """The request's body and conversation hint, opened on the encrypted leg; None
        after a nak."""
        extra = {"request_id": msg.request_id}
        if self.leg is None:
            if msg.encrypted:
                log.warning("encrypted inference_request on a plain session", extra=extra)
                await self._nak(
                    msg.request_id,
                    "unsupported_frame",
                    "this session has no encrypted leg; the request needs a plain body",
                )
                return None
            if msg.body is None:
                log.warning("inference_request without a body", extra=extra)
                await self._nak(
                    msg.request_id, "malformed_message", "Object missing required field `body`"
                )
                return None
            return msg.body, msg.conversation_key
        if not msg.encrypted or msg.enc is None:
            log.warning("plaintext inference_request on the encrypted leg", extra=extra)
            await self._nak(
                msg.request_id,
                "tier2_encrypted_frame_required",
                "inference_request must be encrypted on this session",
            )
            return None
        try:
            plaintext = self.leg.open("inference_request", msg.request_id, msg.stream, msg.enc)
            opened = _plaintext_decoder.decode(plaintext)
            return opened.body, opened.conversation_key
        except (tier2.AeadError, msgspec.DecodeError) as exc:
            log.error("inference_request does not decrypt: %s", exc, extra=extra)
            await self._nak(msg.request_id, "tier2_aead_decrypt_failed", f"decrypt failed: {exc}")
            return None

    async def _on_inference_request(self, msg: InferenceRequest) -> None:
        assert self.sender is not None
        if msg.request_id in self.jobs.running:
            # The same request delivered twice while it runs: the first copy is
            # being served and ends with its one end frame. A nak would make
            # the coordinator fail the request it is waiting for.
            log.warning(
                "duplicate of a running request; ignored", extra={"request_id": msg.request_id}
            )
            return
        opened = await self._request_body(msg)
        if opened is None:
            return
        if self.jobs.known(msg.request_id):
            log.warning("duplicate request", extra={"request_id": msg.request_id})
            await self._nak(
                msg.request_id,
                "duplicate_request_id",
                f"request_id {msg.request_id!r} was already received",
            )
            return
        body, conversation_key = opened
        job = Job(request_id=msg.request_id, stream=msg.stream, conversation_key=conversation_key)
        if msg.settlement is not None:
            try:
                job.settlement = parse_settlement(
                    msg.settlement,
                    request_id=msg.request_id,
                    provider_id=self.config.provider_id or "",
                    key_id=self.owner.keys.receipt_key_id(),
                )
            except InvalidSettlement as exc:
                log.warning("%s", exc, extra={"request_id": msg.request_id})
                await self._nak(msg.request_id, "invalid_settlement_metadata", str(exc))
                return
        outcome = self._refusal()
        request: ChatCompletionRequest | None = None
        if outcome is None:
            try:
                request = decode_chat_request(body)
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

    def _seal(self, msg: InferenceResponseChunk | InferenceResponseEnd, stream: bool) -> Any:
        """The frame as it goes on the wire: sealed on the encrypted leg.

        Called right before the frame is queued for the writer, so the
        sequence numbers are in wire order.
        """
        leg = self.leg
        if leg is None:
            return msg
        if isinstance(msg, InferenceResponseChunk):
            plaintext = leg.chunk_plaintext(msg.seq, msg.data)
            enc = leg.seal("inference_response_chunk", msg.request_id, stream, plaintext)
            return EncryptedChunk(request_id=msg.request_id, enc=enc)
        enc = leg.seal("inference_response_end", msg.request_id, stream, encode(msg))
        return EncryptedEnd(request_id=msg.request_id, enc=enc)

    async def _run_job(self, job: Job, request: ChatCompletionRequest) -> None:
        assert self.sender is not None
        sender = self.sender
        loop = asyncio.get_running_loop()
        job.timeout_s = self.owner.request_timeout_s
        deadline = loop.call_later(job.timeout_s, job.request_cancel, "deadline")
        outcome: Outcome | None = None

        def send(chunk: InferenceResponseChunk) -> Awaitable[None]:
            return sender.send(self._seal(chunk, job.stream))

        def post(chunk: InferenceResponseChunk) -> None:
            sender.post(self._seal(chunk, job.stream))

        try:
            outcome = await relay(
                job,
                request,
                self.owner.engine,
                send if self.leg is not None else sender.send,
                model_id=self.owner.model_id,
                chunk_interval=self.config.chunk_interval_ms / 1000.0,
                post=post if self.leg is not None else sender.post,
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
        """The one place a request ends: slot, end frame, counters.

        The coordinator routes on the ``slots_free`` we report, and it answers
        the buyer as soon as it reads the end frame: the ``state_update`` that
        frees the slot goes out first, so a buyer who asks again at once finds
        the slot free instead of a 503.
        """
        if not self.jobs.mark_ended(job.request_id):
            return
        end = None
        if self.sender is not None:
            end = self._seal(self._end_frame(job, outcome), job.stream)
        self.owner.job_finished(job, outcome, started=started)
        if end is not None and self.sender is not None:
            self.sender.post(end)

    def _end_frame(self, job: Job, outcome: Outcome) -> InferenceResponseEnd:
        model_hash = self.owner.model_hash
        terminal_ms = int(time.time() * 1000)
        receipt = None
        if job.settlement is not None:
            receipt = self._receipt(job, outcome, model_hash, terminal_ms)
        return end_frame(
            job, outcome, model_hash=model_hash, terminal_ts_ms=terminal_ms, receipt=receipt
        )

    def _receipt(
        self, job: Job, outcome: Outcome, model_hash: str | None, terminal_ms: int
    ) -> str | None:
        assert job.settlement is not None
        extra = {"request_id": job.request_id}
        if model_hash is None:
            log.warning("no receipt: the served model has no identity hash", extra=extra)
            return None
        usage = job.usage()
        try:
            return build_receipt(
                self.owner.keys.receipt_key(),
                job.settlement,
                model_hash=model_hash,
                delivered=job.delivered,
                status=outcome.status,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                terminal_ts_ms=terminal_ms,
                issued_at_ms=max(terminal_ms, int(time.time() * 1000)),
            )
        except ValueError as exc:
            log.warning("no receipt: %s", exc, extra=extra)
            return None

    async def _on_cancel(self, msg: CancelRequest) -> None:
        assert self.sender is not None
        job = self.jobs.running.get(msg.request_id)
        extra = {"request_id": msg.request_id, "cancel_reason": msg.reason}
        if job is not None:
            log.info("cancel", extra=extra)
            job.request_cancel(f"cancel_request:{msg.reason}" if msg.reason else "cancel_request")
        elif self.jobs.ended(msg.request_id):
            log.info("cancel for a request that already ended; ignored", extra=extra)
        elif self.leg is not None:
            # On the encrypted leg an end frame for a request the coordinator
            # does not know (or with the wrong stream flag) closes the session.
            log.info("cancel for an unknown request; ignored on the encrypted leg", extra=extra)
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

    # Rekey -----------------------------------------------------------------

    def _on_rekey_request(self, msg: AeadRekeyRequest) -> None:
        if self.leg is None or not self.leg.in_band_rekey:
            log.warning("aead_rekey_request on a session without in-band rekey; ignored")
            return
        if self._rekey_task is not None and not self._rekey_task.done():
            log.warning("aead_rekey_request while a rekey is pending; ignored")
            return
        self._rekey_task = asyncio.create_task(self._respond_rekey(msg), name="rekey")

    async def _respond_rekey(self, msg: AeadRekeyRequest) -> None:
        """Wait until idle, then answer with a fresh X25519 key."""
        assert self.sender is not None and self.leg is not None
        # Every end frame sealed with the old keys is queued before the new epoch.
        await self.jobs.wait_idle()
        if msg.assigned_id != self.leg.assigned_id:
            self.abort("rekey_failed")
            return
        try:
            pending = tier2.start_rekey(
                self.leg,
                rekey_id=msg.rekey_id,
                old_kid=msg.old_kid,
                coordinator_public=msg.coordinator_ecdh_public_key,
                selected_aead=msg.selected_aead,
                expires_at=msg.expires_at,
            )
        except tier2.AeadError as exc:
            log.error("aead_rekey_request refused: %s; reconnecting", exc)
            self.abort("rekey_failed")
            return
        self._rekey = pending
        await self.sender.send(
            AeadRekeyResponse(
                rekey_id=msg.rekey_id,
                assigned_id=msg.assigned_id,
                old_kid=msg.old_kid,
                new_kid=pending.keys.kid,
                provider_ecdh_public_key=pending.provider_public,
            )
        )
        log.info("rekey %s: answered, waiting for the commit", msg.rekey_id)

    async def _on_rekey_commit(self, msg: AeadRekeyCommit) -> None:
        assert self.sender is not None
        pending, leg = self._rekey, self.leg
        if pending is None or leg is None or msg.rekey_id != pending.rekey_id:
            log.error("aead_rekey_commit for no pending rekey; reconnecting")
            self.abort("rekey_failed")
            return
        self._rekey = None
        try:
            if (msg.old_kid, msg.new_kid) != (pending.old_kid, pending.keys.kid):
                raise tier2.AeadError("the commit names other key ids")
            if not msg.encrypted:
                raise tier2.AeadError("the commit is not encrypted")
            proof = pending.open_commit(leg.provider_id, leg.assigned_id, msg.enc)
            pending.check_proof(proof, leg.provider_id, leg.assigned_id)
        except tier2.AeadError as exc:
            log.error("aead_rekey_commit refused: %s; reconnecting", exc)
            self.abort("rekey_failed")
            return
        enc = pending.seal_committed(leg.provider_id, leg.assigned_id, proof)
        # Queued, then switched, with nothing in between: every later frame
        # is sealed with the new keys and goes out after this one.
        self.sender.post(
            AeadRekeyCommitted(
                rekey_id=pending.rekey_id,
                assigned_id=leg.assigned_id,
                old_kid=pending.old_kid,
                new_kid=pending.keys.kid,
                enc=enc,
            )
        )
        leg.adopt(pending, started_at=time.monotonic())
        log.info("rekey %s committed: new key id in use", pending.rekey_id)

    async def _rekey_by_reconnect(self) -> None:
        """Without in-band rekey: at a threshold, once idle, reconnect with fresh keys."""
        assert self.leg is not None and self.ws is not None
        while True:
            await asyncio.sleep(REKEY_CHECK_S)
            if self.leg.due_for_rekey(time.monotonic()) and not self.jobs.running:
                log.info("encrypted leg at its rekey threshold; reconnecting with fresh keys")
                with contextlib.suppress(Exception):
                    await self.ws.close(1000, "rekey")
                raise ConnectionLost("rekey", "fresh keys for the encrypted leg", stable=True)

    # Drain ---------------------------------------------------------------

    def _on_coordinator_drain(self) -> None:
        """The coordinator asked us to drain: do, then reconnect (not exit)."""
        if self._coordinator_drain.is_set() or self.owner.drain_requested.is_set():
            return
        log.info("drain requested by the coordinator")
        self._coordinator_drain.set()
        self.owner.coordinator_drain()

    async def _drain_when_asked(self) -> None:
        waits = [
            asyncio.ensure_future(self.owner.drain_requested.wait()),
            asyncio.ensure_future(self._coordinator_drain.wait()),
        ]
        try:
            await asyncio.wait(waits, return_when="FIRST_COMPLETED")
        finally:
            for w in waits:
                w.cancel()
        self.drained_by = "signal" if self.owner.drain_requested.is_set() else "coordinator"
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
            estimated_drain_seconds=math.ceil(min(left, self.config.drain_timeout_s)),
        )
