"""The provider endpoint ``/ws/provider``: listening, handshake, registration, frames in.

:class:`WebSocketSide` accepts connections (with the refusal faults), gates
the bearer token at the upgrade, runs the handshake the first frame asks for
(v1 ``hello`` or the v2 ``auth_request`` challenge/proof with the tier-2 key
exchange), admits the provider (binary floor, compatibility set, catalog,
model hash, tokens, identities) with the real coordinator's close codes and
reasons (``server.go``), registers it in the pool, and reads its frames for
as long as the session lives. Every frame is parsed with
:mod:`coordinator_stub.frames` and handled as Go handles it: a bad heartbeat
is dropped, a bad model hash fences the session, a ``drain_status
complete`` closes it, chunk and end frames go to the
:class:`~coordinator_stub.relay.Relay`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import itertools
import logging
import math
import secrets
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from . import gojson, jcs, messages
from .catalog import Catalog, CatalogError, model_hash_status
from .catalog import admit as catalog_admit
from .config import WS_PATH, StubConfig
from .credentials import AUTH_BEARER_VALIDATED, AUTH_SELF_MINTED, CredentialRefusal, Credentials
from .events import EventBus
from .faults import Faults, RefuseMode
from .frames import (
    CATALOG_FIELDS,
    SUPPORTED_MODELS_FIELDS,
    AuthProof,
    FrameError,
    Refusal,
    Registration,
    Tier2Caps,
    close_reason,
    decode_std_base64,
    envelope_type,
    parse_auth_request,
    parse_diagnostic_status,
    parse_drain_status,
    parse_first,
    parse_heartbeat,
    parse_hello,
    parse_idle_prewarm_event,
    parse_nak,
    parse_preflight_ack,
    parse_state_update,
)
from .gojson import GoJSONError
from .observe import Changes, FrameLog, FrameRecord, RejectRecord
from .pool import Pool
from .relay import FrameOutcome, Relay
from .rules import STATES, below_floor, is_bootstrap_principal, valid_compatibility_set_id
from .session import ProviderSession, StubConnection
from .tier2 import (
    A256GCM,
    CoordinatorKey,
    Epoch,
    Tier2Error,
    b64url,
    ed25519_verify,
    parse_x25519_public,
)

logger = logging.getLogger(__name__)

#: How long an ``auth_challenge`` is valid.
CHALLENGE_TTL: Final = dt.timedelta(minutes=10)
ATTESTATION_FORMATS: Final = (
    "apple-managed-device-attestation-acme-v1",
    "macprovider-se-p256-v1",
)
#: The nak codes the coordinator acts on; any other is only logged.
HANDLED_NAK_CODES: Final = frozenset(
    {
        "unknown_message_type",
        "duplicate_request_id",
        "tier2_aead_decrypt_failed",
        "tier2_encrypted_frame_required",
    }
)


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
        credentials: Credentials,
        catalog: Catalog | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.bus = bus
        self.faults = faults
        self.log = log
        self.changes = changes
        self.credentials = credentials
        self.catalog = catalog
        self.sessions: dict[str, ProviderSession] = {}
        self.relay = Relay(config, pool, bus, changes, self.sessions, catalog)
        #: Provider ids that completed a credential bootstrap, in order.
        self.bootstraps: list[str] = []
        self.port = 0
        self.stopping = False
        self._handlers: dict[str, Callable[[ProviderSession, str, float], FrameOutcome]] = {
            "heartbeat": self._on_heartbeat,
            "state_update": self._on_state_update,
            "preflight_ack": self._on_preflight_ack,
            "drain_status": self._on_drain_status,
            "nak": self._on_nak,
            "diagnostic_status": self._on_diagnostic_status,
            "idle_prewarm_event": self._on_idle_prewarm,
            "inference_response_chunk": self._on_chunk,
            "inference_response_end": self._on_end,
            "aead_rekey_response": self._on_rekey_response,
            "aead_rekey_committed": self._on_rekey_committed,
        }
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
        self.relay.fail_all("stub_shutdown", "coordinator stopped")

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

    async def _reject_v2(
        self,
        conn: ServerConnection,
        error_code: str,
        message: str,
        close_code: int,
        reason: str,
        provider_id: str | None,
    ) -> None:
        """``auth_response`` rejected, then the close (the v2 refusals that answer first)."""
        with contextlib.suppress(ConnectionClosed):
            await conn.send(messages.auth_rejected(error_code, message).wire)
        await self._reject(conn, close_code, reason, provider_id)

    async def _handler(self, conn: ServerConnection) -> None:
        assert isinstance(conn, StubConnection)
        if self.faults.take_accept_then_close():
            await self._reject(conn, self.faults.accept_close_code, self.faults.accept_close_reason)
            return
        authorization = conn.request.headers.get("Authorization")
        try:
            token = self.credentials.check_upgrade(authorization)
        except CredentialRefusal as refusal:
            await self._reject(conn, refusal.code, refusal.reason)
            return
        if token is None and authorization is not None:
            logger.warning(
                "malformed Authorization header accepted as tokenless (the real coordinator "
                "closes 4005 invalid_token) remote=%s",
                _peer(conn),
            )
        try:
            first = await asyncio.wait_for(conn.recv(), self.config.hello_timeout_s)
        except TimeoutError:
            await self._reject(conn, 4001, "invalid_hello: read")
            return
        except ConnectionClosed as exc:
            logger.info("connection closed before hello remote=%s: %s", _peer(conn), exc)
            return
        if isinstance(first, bytes):
            await self._reject(conn, 4000, "unrecognized auth message")
            return
        try:
            kind, version = parse_first(first)
        except FrameError:
            await self._reject(conn, 4000, "unrecognized auth message")
            return
        try:
            if kind == "hello" and version == 1:
                session = await self._v1(conn, token, first)
            elif kind == "auth_request" and version == 2:
                session = await self._v2(conn, token, first)
            else:
                await self._reject(conn, 4000, "unrecognized auth message")
                return
        except Refusal as refusal:
            await self._reject(conn, refusal.code, refusal.reason, refusal.provider_id)
            return
        if session is None:
            return
        closed: ConnectionClosed | None = None
        try:
            closed = await self._receive(session)
        finally:
            self._end_session(session, closed)

    # -- admission (both paths) ---------------------------------------------

    def _compatibility(self, reg: Registration) -> str | None:
        """Compatibility-set admission: ``None`` (unconfigured), ``accepted``, ``update_bridge``."""
        accepted = self.config.accepted_compatibility_set_ids
        bridge = self.config.bridge_compatibility_set_ids
        if not accepted and not bridge:
            return None
        cid = reg.compatibility_set_id
        if not cid:
            raise Refusal(4001, "compatibility_set_required", reg.provider_id)
        if not valid_compatibility_set_id(cid):
            raise Refusal(4001, "compatibility_set_invalid", reg.provider_id)
        if cid in bridge:
            return "update_bridge"
        if cid not in accepted:
            raise Refusal(4001, "compatibility_set_unaccepted", reg.provider_id)
        return "accepted"

    def _compatibility_ack(self, reg: Registration, compat: str | None) -> dict[str, str]:
        policy = "configured" if compat is not None else "unconfigured"
        return {
            "policy": policy,
            "accepted": reg.compatibility_set_id if compat is not None else "",
        }

    def _floor(self, reg: Registration) -> None:
        required = self.config.required_binary_version
        if required and below_floor(reg.binary_version, required):
            raise Refusal(
                4004,
                f"version_unsupported: binary_version {reg.binary_version} below required "
                f"{required}",
                reg.provider_id,
            )

    def _admit(self, reg: Registration, compat: str | None) -> dict[str, Any]:
        """``prepareProviderAdmission``: floor, catalog and model hash; the record's facts."""
        if compat != "update_bridge":
            self._floor(reg)
        if compat == "update_bridge":
            mode = "update_bridge"
        else:
            try:
                mode = catalog_admit(
                    self.catalog,
                    reg.model_id,
                    {name: getattr(reg, name) for name in CATALOG_FIELDS},
                )
            except CatalogError as exc:
                logger.warning("catalog incompatible provider_id=%s: %s", reg.provider_id, exc)
                raise Refusal(4001, "catalog_incompatible", reg.provider_id) from None
        status = model_hash_status(
            self.catalog, reg.model_id, reg.model_hash, reg.model_hash_algorithm
        )
        if status == "invalid" and reg.model_hash:
            raise Refusal(4001, "invalid_model_hash_identity", reg.provider_id)
        expected = (
            ""
            if self.catalog is None
            else self.catalog.feed.expected_model_hash(reg.model_id) or ""
        )
        return {"catalog_mode": mode, "hash_status": status, "expected_model_hash": expected}

    def _token_state(self, provider_id: str, token: str | None) -> str:
        try:
            return self.credentials.validate(provider_id, token, time.monotonic())
        except CredentialRefusal as refusal:
            raise Refusal(refusal.code, refusal.reason, provider_id) from None

    def _self_mint(self, provider_id: str, token: str | None, auth_state: str) -> tuple[str, str]:
        """``resolveProvisionalToken``: ``(auth_state, assigned_provider_token)``."""
        if self.credentials.needs_self_mint(token):
            try:
                minted = self.credentials.self_mint(provider_id, time.monotonic())
            except CredentialRefusal as refusal:
                raise Refusal(refusal.code, refusal.reason, provider_id) from None
            logger.info("provider token self-minted provider_id=%s", provider_id)
            return AUTH_SELF_MINTED, minted
        if self.config.issue_provider_token:
            return auth_state, self.credentials.issue()
        return auth_state, ""

    # -- v1 -------------------------------------------------------------------

    async def _v1(self, conn: StubConnection, token: str | None, first: str) -> ProviderSession:
        received = time.monotonic()
        try:
            reg = parse_hello(first)
        except FrameError as exc:
            raise Refusal(4001, f"invalid_hello: {exc.field}") from None
        pid = reg.provider_id
        if reg.tier != 1:
            raise Refusal(4003, f"tier_unsupported: tier {reg.tier} not supported", pid)
        compat = self._compatibility(reg)
        if self.config.require_encrypted_leg:
            raise Refusal(4013, "tier2_encrypted_leg_required", pid)
        if reg.credential_bootstrap:
            raise Refusal(4001, "credential_bootstrap_requires_v2", pid)
        if pid in self.credentials.identities:
            if is_bootstrap_principal(pid):
                raise Refusal(4003, "bootstrap_identity_requires_v2", pid)
            raise Refusal(4003, "durable_identity_requires_v2", pid)
        admission = self._admit(reg, compat)
        auth_state = self._token_state(pid, token)
        auth_state, assigned_token = self._self_mint(pid, token, auth_state)
        assigned_id = str(uuid.uuid4())
        recommended = self.config.recommended_binary_version if reg.compatibility_set_id else ""
        ack = messages.hello_ack(
            assigned_id=assigned_id,
            heartbeat_interval_s=self.config.heartbeat_interval_s,
            tier=self.config.tier,
            recommended_binary_version=recommended,
            required_binary_version=self.config.required_binary_version,
            assigned_provider_token=assigned_token,
            auth_state=auth_state,
            catalog=self._catalog_ack(admission["catalog_mode"]),
            compatibility=self._compatibility_ack(reg, compat),
        )
        handshake = [(received, "in", "hello", reg, first)]
        return self._register(
            conn,
            reg,
            handshake,
            ack,
            protocol=1,
            assigned_id=assigned_id,
            auth_state=auth_state,
            assigned_token=assigned_token or None,
            **admission,
        )

    def _catalog_ack(self, mode: str) -> dict[str, str] | None:
        if self.catalog is None or mode != "compatible":
            return None
        return self.catalog.ack_fields()

    # -- v2 -------------------------------------------------------------------

    async def _v2(
        self, conn: StubConnection, token: str | None, first: str
    ) -> ProviderSession | None:
        received = time.monotonic()
        try:
            reg = parse_auth_request(first)
        except FrameError as exc:
            if exc.field in SUPPORTED_MODELS_FIELDS:
                await self._reject_v2(conn, "bad_request", exc.field, 4001, exc.field, None)
                return None
            raise Refusal(4000, "unrecognized auth message") from None
        if not isinstance(reg, Registration):
            raise Refusal(4000, "unrecognized auth message")
        pid = reg.provider_id
        try:
            compat = self._compatibility(reg)
        except Refusal as refusal:
            await self._reject_v2(
                conn, refusal.reason, refusal.reason, refusal.code, refusal.reason, pid
            )
            return None
        try:
            transcript = base64.b64encode(
                hashlib.sha256(jcs.canonical(gojson.loads(first))).digest()
            ).decode()
        except (GoJSONError, jcs.JCSError):
            raise Refusal(4001, "invalid_auth_request: transcript", pid) from None
        caps = reg.tier2_capabilities or Tier2Caps()
        if not caps.encrypted_leg or A256GCM not in caps.aead_suites:
            raise Refusal(4001, "no_common_aead_suite", pid)
        try:
            provider_public = parse_x25519_public(reg.provider_ecdh_public_key)
        except Tier2Error:
            raise Refusal(4013, "tier2_key_exchange_failed", pid) from None
        bootstrap = reg.credential_bootstrap
        auth_state = ""
        admission: dict[str, Any] = {}
        if bootstrap:
            if token is not None:
                raise Refusal(4005, "invalid_token", pid)
            if not is_bootstrap_principal(pid) or reg.provider_receipt_public_key is None:
                raise Refusal(4003, "bootstrap_receipt_identity_required", pid)
            self._floor(reg)
        else:
            admission = self._admit(reg, compat)
            auth_state = self._token_state(pid, token)
        assigned_id = str(uuid.uuid4())
        coordinator_key = CoordinatorKey()
        try:
            keys = coordinator_key.derive(provider_public, pid, assigned_id)
        except Tier2Error:
            raise Refusal(4013, "tier2_key_exchange_failed", pid) from None
        identity = self.credentials.identities.get(pid)
        enroll_key = None
        if (
            not bootstrap
            and identity is None
            and auth_state == AUTH_BEARER_VALIDATED
            and reg.provider_admission_public_key is not None
        ):
            enroll_key = reg.provider_admission_public_key
        signature_required = bootstrap or identity is not None or enroll_key is not None
        attempt_id = "auth-" + str(uuid.uuid4())
        expires = dt.datetime.now(dt.UTC).replace(microsecond=0) + CHALLENGE_TTL
        expires_mono = time.monotonic() + CHALLENGE_TTL.total_seconds()
        challenge = messages.auth_challenge_fields(
            auth_attempt_id=attempt_id,
            assigned_id=assigned_id,
            attestation_challenge=b64url(secrets.token_bytes(32)),
            attestation_formats=list(ATTESTATION_FORMATS),
            coordinator_ecdh_public_key=coordinator_key.public_b64url,
            key_id=keys.kid,
            expires_at=expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
            admission_identity_public_key=(
                base64.b64encode(identity.public_key).decode()
                if identity is not None and not bootstrap
                else ""
            ),
            admission_identity_generation=(
                identity.generation if identity is not None and not bootstrap else 0
            ),
        )
        challenge_frame = messages.outgoing(challenge)
        try:
            await conn.send(challenge_frame.wire)
        except ConnectionClosed:
            return None
        challenged = time.monotonic()
        try:
            second = await asyncio.wait_for(conn.recv(), self.config.hello_timeout_s)
        except TimeoutError:
            raise Refusal(4001, "invalid_auth_request: read", pid) from None
        except ConnectionClosed:
            return None
        proved = time.monotonic()
        if isinstance(second, bytes):
            raise Refusal(4001, "invalid_auth_request: type", pid)
        try:
            proof = parse_auth_request(second)
            if not isinstance(proof, AuthProof):
                raise FrameError("stage", "expected the proof stage")
        except FrameError as exc:
            await self._reject_v2(
                conn,
                "invalid_auth_request",
                exc.message,
                4001,
                f"invalid_auth_request: {exc.field}",
                pid,
            )
            return None
        if (
            proof.auth_attempt_id != attempt_id
            or proof.provider_id != pid
            or proof.credential_bootstrap != bootstrap
            or proof.referral_code != reg.referral_code
            or (proof.supported_models_present and proof.supported_models != reg.supported_models)
            or (
                proof.publishes_present
                and proof.publishes_supported_models != reg.publishes_supported_models
            )
            or time.monotonic() > expires_mono
        ):
            await self._reject_v2(
                conn,
                "attestation_failed",
                "auth proof does not match the challenge",
                4012,
                "tier2_attestation_failed",
                pid,
            )
            return None
        if signature_required:
            if bootstrap:
                assert reg.provider_receipt_public_key is not None
                key = reg.provider_receipt_public_key
                code = "bootstrap_identity_proof_required"
                # The challenge as Go marshals it, decoded back (UseNumber).
                extra = {
                    "challenge": gojson.loads(challenge_frame.wire),
                    "credential_bootstrap": True,
                }
            else:
                key = identity.public_key if identity is not None else enroll_key  # type: ignore[assignment]
                code = "identity_signature_required"
                extra = {}
            assert key is not None
            signed = {
                "auth_attempt_id": attempt_id,
                "provider_id": pid,
                "binary_version": reg.binary_version,
                "provider_ecdh_public_key": reg.provider_ecdh_public_key,
                "transcript_sha256": transcript,
                **extra,
            }
            if not _identity_signature_ok(proof, transcript, key, signed):
                await self._reject_v2(
                    conn, code, f"{code}: identity signature missing or invalid", 4003, code, pid
                )
                return None
        handshake: list[tuple[float, str, str, Any, str]] = [
            (received, "in", "auth_request", reg, first),
            (challenged, "out", "auth_challenge", challenge_frame, challenge_frame.wire),
            (proved, "in", "auth_request", proof, second),
        ]
        if bootstrap:
            await self._bootstrap(conn, reg, keys.kid, caps, assigned_id)
            return None
        auth_state, assigned_token = self._self_mint(pid, token, auth_state)
        identity_mode = "exemption"
        if enroll_key is not None:
            identity = self.credentials.enroll(pid, enroll_key)
        if signature_required:
            identity_mode = "signature"
        epoch = Epoch(
            keys=keys,
            response_chunk_plaintext_envelope=caps.response_chunk_plaintext_envelope,
            in_band_rekey=caps.in_band_aead_rekey_v1,
            started_at=time.monotonic(),
        )
        response = messages.auth_accepted(
            assigned_id=assigned_id,
            heartbeat_interval_s=self.config.heartbeat_interval_s,
            tier=self.config.tier,
            kid=keys.kid,
            rekey_after_requests=self.config.rekey_after_requests,
            rekey_after_seconds=int(self.config.rekey_after_seconds),
            response_chunk_plaintext_envelope=caps.response_chunk_plaintext_envelope,
            in_band_aead_rekey_v1=caps.in_band_aead_rekey_v1,
            model_hash_status=admission.get("hash_status", ""),
            recommended_binary_version=self.config.recommended_binary_version,
            required_binary_version=self.config.required_binary_version,
            assigned_provider_token=assigned_token,
            auth_state=auth_state,
            identity_admission_mode=identity_mode,
            identity_admission_key_role="current" if signature_required else "",
            identity_generation=identity.generation if signature_required and identity else 0,
            admission_identity_public_key=(
                base64.b64encode(identity.public_key).decode()
                if signature_required and identity
                else ""
            ),
            catalog=self._catalog_ack(admission.get("catalog_mode", "")),
            compatibility=self._compatibility_ack(reg, compat),
        )
        receipt_key = reg.provider_receipt_public_key
        return self._register(
            conn,
            reg,
            handshake,
            response,
            protocol=2,
            assigned_id=assigned_id,
            auth_state=auth_state,
            assigned_token=assigned_token or None,
            epoch=epoch,
            receipt_key=receipt_key,
            receipt_key_pending=self.pool.receipt_key_pending(pid, receipt_key),
            **admission,
        )

    async def _bootstrap(
        self,
        conn: StubConnection,
        reg: Registration,
        kid: str,
        caps: Tier2Caps,
        assigned_id: str,
    ) -> None:
        """Credential bootstrap after a valid proof: mint, answer, close (no session)."""
        pid = reg.provider_id
        remote = _peer(conn).rsplit(":", 1)[0]
        now = time.monotonic()
        if not self.credentials.take_bootstrap_slot(remote, pid, now):
            await self._reject_v2(
                conn,
                "credential_bootstrap_rate_limited",
                "credential bootstrap rate limited",
                4008,
                "credential_bootstrap_rate_limited",
                pid,
            )
            return
        assert reg.provider_receipt_public_key is not None
        try:
            token = self.credentials.mint_bootstrap(
                pid, reg.provider_receipt_public_key, reg.referral_code, now
            )
        except CredentialRefusal as refusal:
            await self._reject(conn, refusal.code, refusal.reason, pid)
            return
        response = messages.auth_accepted(
            assigned_id=assigned_id,
            heartbeat_interval_s=self.config.heartbeat_interval_s,
            tier="provisional",
            kid=kid,
            rekey_after_requests=self.config.rekey_after_requests,
            rekey_after_seconds=int(self.config.rekey_after_seconds),
            response_chunk_plaintext_envelope=caps.response_chunk_plaintext_envelope,
            in_band_aead_rekey_v1=caps.in_band_aead_rekey_v1,
            recommended_binary_version=self.config.recommended_binary_version,
            required_binary_version=self.config.required_binary_version,
            assigned_provider_token=token,
            identity_admission_mode="signature",
            identity_generation=1,
        )
        logger.info("credential bootstrap token minted provider_id=%s", pid)
        with contextlib.suppress(ConnectionClosed):
            await conn.send(response.wire)
        self.bootstraps.append(pid)
        # The handler returns: Go closes the TCP connection, no close frame.
        self.log.reject(
            RejectRecord(time.monotonic(), 0, "credential_bootstrap_complete", pid, _peer(conn))
        )
        conn.transport.close()
        self.changes.notify()

    # -- registration ---------------------------------------------------------

    def _register(
        self,
        conn: StubConnection,
        reg: Registration,
        handshake: list[tuple[float, str, str, Any, str]],
        ack: messages.Outgoing,
        *,
        protocol: int,
        assigned_id: str,
        epoch: Epoch | None = None,
        assigned_token: str | None = None,
        **admission: Any,
    ) -> ProviderSession:
        now = time.monotonic()
        pid = reg.provider_id
        session_id = next(self._session_ids)
        record, _replaced, events = self.pool.register(
            reg,
            session_id,
            now,
            assigned_token=assigned_token,
            protocol=protocol,
            assigned_id=assigned_id,
            encrypted=epoch is not None,
            **admission,
        )
        session = ProviderSession(
            conn,
            session_id,
            reg,
            now,
            config=self.config,
            faults=self.faults,
            log=self.log,
            assigned_id=assigned_id,
            epoch=epoch,
        )
        old = self.sessions.get(pid)
        self.sessions[pid] = session
        removal = self._removals.pop(pid, None)
        if removal is not None:
            removal.cancel()
        for when, direction, kind, message, raw in handshake:
            self.log.add(FrameRecord(when, pid, session_id, direction, kind, message, raw))  # type: ignore[arg-type]
        logger.info(
            "provider registered provider_id=%s session_id=%d protocol=%d model_id=%s "
            "max_concurrency=%d state=%s auth_state=%s catalog=%s hash=%s remote=%s",
            pid,
            session_id,
            protocol,
            reg.model_id,
            reg.max_concurrency,
            record.state,
            record.auth_state or "-",
            record.catalog_mode,
            record.hash_status,
            _peer(conn),
        )
        if old is not None:
            self.relay.fail_flights(old, "provider_dropped", "session replaced")
            old.abort("replaced", f"superseded by session {session_id}")
        self.bus.publish_all(events)
        session.start()
        session.send(ack)
        if not record.warmed:
            session.add_task(
                asyncio.create_task(self.relay.warm_up(session), name=f"warm-up {pid}#{session_id}")
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
            try:
                kind = envelope_type(data)
            except FrameError as exc:
                # Go logs it; it does not even count as liveness.
                self.pool.record_invalid(pid, sid)
                self.log.add(
                    FrameRecord(now, pid, sid, "in", "<invalid>", None, data, str(exc), "dropped")
                )
                logger.warning("undecodable frame provider_id=%s error=%s", pid, exc)
                continue
            session.last_liveness = now
            self.pool.touch(pid, sid, now)
            outcome = self._dispatch(session, kind, data, now)
            if outcome.error is not None:
                self.pool.record_invalid(pid, sid)
                logger.warning(
                    "frame not accepted provider_id=%s type=%r action=%s error=%s",
                    pid,
                    kind,
                    outcome.action,
                    outcome.error,
                )
            self.log.add(
                FrameRecord(
                    now,
                    pid,
                    sid,
                    "in",
                    kind or "<invalid>",
                    outcome.message,
                    data,
                    outcome.error,
                    outcome.action,
                )
            )
            self.changes.notify()

    def _dispatch(self, session: ProviderSession, kind: str, data: str, now: float) -> FrameOutcome:
        handler = self._handlers.get(kind)
        if handler is None:
            return FrameOutcome(error=f"unknown message type {kind!r}", action="dropped")
        try:
            return handler(session, data, now)
        except FrameError as exc:
            return FrameOutcome(error=str(exc), action="dropped")

    def _on_heartbeat(self, session: ProviderSession, data: str, now: float) -> FrameOutcome:
        pid, sid = session.provider_id, session.session_id
        try:
            hb = parse_heartbeat(data)
        except FrameError as exc:
            if exc.field in ("model_hash", "model_hash_algorithm"):
                self._fence(session, str(exc))
                return FrameOutcome(error=str(exc), action="fenced")
            raise
        if hb.status not in STATES:
            return FrameOutcome(hb, f"invalid status {hb.status!r}", "dropped")
        telemetry = hb.safety_telemetry
        if telemetry is not None:
            if telemetry.get("provider_id") != pid:
                return FrameOutcome(hb, "safety_telemetry provider_id mismatch", "dropped")
            if (
                telemetry.get("schema_version") == 2
                and session.assigned_id
                and telemetry.get("coordinator_session_id") != session.assigned_id
            ):
                return FrameOutcome(hb, "safety_telemetry session mismatch", "dropped")
        record = self.pool.get(pid)
        if hb.model_hash_present and record is not None and record.session_id == sid:
            algorithm = (
                hb.model_hash_algorithm
                if hb.model_hash_algorithm_present
                else record.model_hash_algorithm
            )
            status = model_hash_status(self.catalog, hb.model_id, hb.model_hash, algorithm)
            if status == "invalid" and hb.model_hash:
                self._fence(session, "heartbeat model hash invalid")
                return FrameOutcome(hb, "invalid model hash identity", "fenced")
            record.hash_status = status
        gap, events = self.pool.heartbeat(pid, sid, hb, now)
        self.bus.publish_all(events)
        wake = self.config.wake_gap_s
        if gap is not None and wake is not None and gap > wake:
            logger.warning("heartbeat gap provider_id=%s gap_s=%.3f: sending warm_up", pid, gap)
            self.bus.publish({"type": "wake_gap", "provider_id": pid, "gap_s": round(gap, 3)})
            session.send(messages.warm_up())
        return FrameOutcome(hb)

    def _fence(self, session: ProviderSession, detail: str) -> None:
        record = self.pool.get(session.provider_id)
        if record is not None and record.session_id == session.session_id:
            record.fenced = detail
        logger.warning("provider fenced provider_id=%s: %s", session.provider_id, detail)
        self.relay.fail_flights(session, "provider_fenced", detail)
        session.close(4001, "invalid_model_hash_identity", "fenced")

    def _on_state_update(self, session: ProviderSession, data: str, now: float) -> FrameOutcome:
        update = parse_state_update(data)
        if update.state not in STATES:
            return FrameOutcome(update, f"invalid state {update.state!r}", "dropped")
        logger.info(
            "state_update provider_id=%s state=%s reason=%s",
            session.provider_id,
            update.state,
            update.reason,
        )
        self.bus.publish_all(
            self.pool.state_update(session.provider_id, session.session_id, update, now)
        )
        if update.state == "ready":
            session.reported_ready.set()
        return FrameOutcome(update)

    def _on_preflight_ack(self, session: ProviderSession, data: str, now: float) -> FrameOutcome:
        ack = parse_preflight_ack(data)
        self.pool.record_preflight_ack(session.provider_id, session.session_id, ack)
        logger.info(
            "preflight_ack provider_id=%s request_id=%s accepted=%s reason=%s",
            session.provider_id,
            ack.request_id,
            ack.accepted,
            ack.reason,
        )
        return FrameOutcome(ack)

    def _on_drain_status(self, session: ProviderSession, data: str, now: float) -> FrameOutcome:
        status = parse_drain_status(data)
        logger.info(
            "drain_status provider_id=%s phase=%s inflight=%d",
            session.provider_id,
            status.phase,
            status.inflight_requests,
        )
        self.bus.publish_all(
            self.pool.record_drain_status(session.provider_id, session.session_id, status)
        )
        if status.phase == "starting":
            session.draining = True
        elif status.phase == "complete":
            # Go's conn.Close(): the TCP connection ends, no close frame.
            session.close_transport("drain_complete", "drain_status complete")
        return FrameOutcome(status)

    def _on_nak(self, session: ProviderSession, data: str, now: float) -> FrameOutcome:
        nak = parse_nak(data)
        pid, sid = session.provider_id, session.session_id
        self.pool.record_nak(pid, sid, nak)
        code = nak.error.code
        logger.warning(
            "nak provider_id=%s in_reply_to=%s code=%s message=%s",
            pid,
            nak.in_reply_to,
            code,
            nak.error.message,
        )
        if code not in HANDLED_NAK_CODES:
            return FrameOutcome(nak)
        if code == "unknown_message_type":
            session.http_only = True
            self.bus.publish_all(self.pool.mark_http_forwarding_only(pid, sid))
        if code in ("tier2_aead_decrypt_failed", "tier2_encrypted_frame_required"):
            self.relay.close_tier2_for_nak(session, nak.in_reply_to, code)
            return FrameOutcome(nak, action="closed")
        if nak.in_reply_to:
            self.relay.on_nak_request(session, nak.in_reply_to, f"nak_{code}")
        return FrameOutcome(nak)

    def _on_diagnostic_status(
        self, session: ProviderSession, data: str, now: float
    ) -> FrameOutcome:
        status = parse_diagnostic_status(data)
        record = self.pool.get(session.provider_id)
        if record is not None and record.session_id == session.session_id:
            record.diagnostics.append(status)
        return FrameOutcome(status)

    def _on_idle_prewarm(self, session: ProviderSession, data: str, now: float) -> FrameOutcome:
        event = parse_idle_prewarm_event(data)
        record = self.pool.get(session.provider_id)
        if record is not None and record.session_id == session.session_id:
            record.idle_prewarm_events.append(event)
        return FrameOutcome(event)

    def _on_chunk(self, session: ProviderSession, data: str, now: float) -> FrameOutcome:
        return self.relay.on_chunk(session, data)

    def _on_end(self, session: ProviderSession, data: str, now: float) -> FrameOutcome:
        return self.relay.on_end(session, data)

    def _on_rekey_response(self, session: ProviderSession, data: str, now: float) -> FrameOutcome:
        return self.relay.on_rekey_frame(session, "aead_rekey_response", data)

    def _on_rekey_committed(self, session: ProviderSession, data: str, now: float) -> FrameOutcome:
        return self.relay.on_rekey_frame(session, "aead_rekey_committed", data)

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
            if session.draining:
                # A provider that was draining is removed at once, no grace.
                self._remove(session.provider_id, session.session_id, "drained")
            else:
                self._removals[session.provider_id] = asyncio.get_running_loop().call_later(
                    self.config.grace_s, self._remove, session.provider_id, session.session_id
                )
        self.changes.notify()

    def _remove(self, provider_id: str, session_id: int, cause: str = "grace_expired") -> None:
        self._removals.pop(provider_id, None)
        events = self.pool.remove(provider_id, session_id, cause, time.monotonic())
        if events:
            logger.info(
                "provider removed provider_id=%s session_id=%d cause=%s",
                provider_id,
                session_id,
                cause,
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
        return self.session(provider_id).send(messages.drain())

    def send_warm_up(self, provider_id: str) -> asyncio.Future[None]:
        logger.info("sending warm_up provider_id=%s", provider_id)
        return self.session(provider_id).send(messages.warm_up())

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
        written = self.session(provider_id).send(messages.preflight(request_id, estimated_tokens))
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


def _identity_signature_ok(
    proof: AuthProof, transcript: str, public_key: bytes, signed: dict[str, Any]
) -> bool:
    """An identity signature over the JCS of ``signed`` with ``public_key``."""
    if not proof.identity_signature or proof.identity_signature_transcript_sha256 != transcript:
        return False
    try:
        signature = decode_std_base64(proof.identity_signature)
    except ValueError:
        return False
    return ed25519_verify(public_key, jcs.canonical(signed), signature)
