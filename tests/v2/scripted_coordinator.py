"""A scripted v2 coordinator for tests: the coordinator's side written from the spec.

A second implementation on purpose: it imports nothing from ``provider``
(not the wire types, not the canonical JSON, not the key schedule) and uses
the ``cryptography`` primitives directly, so a mistake shared with the
provider's own modules cannot pass unnoticed. It follows
``../shared/COORDINATOR.md`` sections 1, 5, 7 and 9 and the Go code they
cite, and it is strict where the coordinator is: JSON integers only in int
fields, the binary AAD, one counter per direction, a 4096-frame receive
window, the exact proof bytes back on a rekey.

It serves ``/ws/provider`` (aiohttp) and, when given one, the signed
autotune feed at ``/v1/autotune-candidates`` and ``.sig``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import struct
import unicodedata
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import WSMsgType, web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# --------------------------------------------------------------------------
# The coordinator's primitives, again


def jcs(value: Any) -> bytes:
    """billing.CanonicalJSON for the values these tests use."""

    def enc(v: Any) -> str:
        if v is None or isinstance(v, bool):
            return json.dumps(v)
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            assert math.isfinite(v)
            return str(int(v)) if v == int(v) else repr(v)
        if isinstance(v, str):
            return json.dumps(unicodedata.normalize("NFC", v), ensure_ascii=False)
        if isinstance(v, list):
            return "[" + ",".join(enc(x) for x in v) + "]"
        items = sorted(v.items(), key=lambda kv: kv[0].encode("utf-16-be"))
        pairs = (json.dumps(k, ensure_ascii=False) + ":" + enc(x) for k, x in items)
        return "{" + ",".join(pairs) + "}"

    return enc(value).encode()


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64u(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def derive(shared: bytes, pid: str, aid: str, ppub: bytes, cpub: bytes) -> dict[str, Any]:
    def fld(label: str, value: bytes) -> bytes:
        return u32(len(label)) + label.encode() + u32(len(value)) + value

    t = hashlib.sha256(
        b"macprovider/spec008/pillar-b/transcript/v1"
        + fld("provider_id", pid.encode())
        + fld("assigned_id", aid.encode())
        + fld("provider_public", ppub)
        + fld("coordinator_public", cpub)
        + fld("selected_aead", b"A256GCM")
    ).digest()

    def out(info: str, n: int) -> bytes:
        return HKDF(hashes.SHA256(), n, t, info.encode()).derive(shared)

    return {
        "kid": b64u(hashlib.sha256(t).digest()[:16]),
        "c2p": AESGCM(out("macprovider/spec008/c2p/aead/v1", 32)),
        "p2c": AESGCM(out("macprovider/spec008/p2c/aead/v1", 32)),
        "c2p_base": out("macprovider/spec008/c2p/nonce/v1", 4),
        "p2c_base": out("macprovider/spec008/p2c/nonce/v1", 4),
    }


def aad(kind: str, direction: str, rid: str, stream: bool, pid: str, aid: str, seq: int) -> bytes:
    def s(x: str) -> bytes:
        return u32(len(x.encode())) + x.encode()

    return (
        b"macprovider/spec008/pillar-b/aad/v1\x00"
        + s(kind) + s(direction) + s(rid) + (b"\x01" if stream else b"\x00")
        + s(pid) + s(aid) + struct.pack(">Q", seq)
    )  # fmt: skip


def raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def seal(keys: dict[str, Any], seq: int, frame_aad: bytes, plaintext: bytes) -> dict[str, Any]:
    nonce = keys["c2p_base"] + struct.pack(">Q", seq)
    sealed = keys["c2p"].encrypt(nonce, plaintext, frame_aad)
    return {
        "alg": "A256GCM",
        "seq": seq,
        "nonce": b64u(nonce),
        "aad": b64u(frame_aad),
        "ciphertext": b64u(sealed[:-16]),
        "tag": b64u(sealed[-16:]),
        "kid": keys["kid"],
    }


def strict_int(value: Any, where: str) -> int:
    """Go's encoding/json: a JSON number with a fraction is not an int."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise AssertionError(f"{where} is {value!r}, not a JSON integer")
    return value


# --------------------------------------------------------------------------


class ProtocolViolation(AssertionError):
    """The provider sent something the real coordinator would refuse."""


@dataclass
class Conn:
    """One provider connection as the coordinator sees it."""

    ws: web.WebSocketResponse
    authorization: str | None
    initial: dict[str, Any] = field(default_factory=dict)
    initial_raw: str = ""
    proof: dict[str, Any] = field(default_factory=dict)
    response: dict[str, Any] = field(default_factory=dict)
    assigned_id: str = ""
    keys: dict[str, Any] = field(default_factory=dict)
    c2p_next: int = 0
    p2c_next: int = 0
    p2c_seen: set[int] = field(default_factory=set)
    stream_of: dict[str, bool] = field(default_factory=dict)
    frames: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    log: list[dict[str, Any]] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_code: int | None = None
    violations: list[str] = field(default_factory=list)
    rekey: dict[str, Any] | None = None
    #: A v1 ``hello`` session (plain frames), for A/B comparisons.
    v1: bool = False

    @property
    def provider_id(self) -> str:
        return str(self.initial.get("provider_id", ""))

    @property
    def receipt_public(self) -> Ed25519PublicKey:
        raw = base64.b64decode(self.initial["provider_receipt_public_key"])
        return Ed25519PublicKey.from_public_bytes(raw)

    async def send(self, obj: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(obj))

    async def send_request(
        self,
        request_id: str,
        body: dict[str, Any],
        *,
        stream: bool = False,
        settlement: dict[str, Any] | None = None,
        tamper: bool = False,
    ) -> None:
        """An encrypted inference_request (plaintext envelope inside ``enc``)."""
        self.stream_of[request_id] = stream
        if self.v1:
            await self.send({"type": "inference_request", "request_id": request_id,
                             "stream": stream, "body": json.dumps(body)})  # fmt: skip
            return
        seq = self.c2p_next
        self.c2p_next += 1
        plaintext = json.dumps(
            {"type": "inference_request_plaintext", "body": json.dumps(body)}
        ).encode()
        frame_aad = aad("inference_request", "c2p", request_id, stream, self.provider_id,
                        self.assigned_id, seq)  # fmt: skip
        enc = seal(self.keys, seq, frame_aad, plaintext)
        if tamper:
            enc["tag"] = b64u(b"\x00" * 16)
        self.stream_of[request_id] = stream
        msg: dict[str, Any] = {
            "type": "inference_request",
            "request_id": request_id,
            "stream": stream,
            "encrypted": True,
            "enc": enc,
        }
        if settlement is not None:
            msg["settlement"] = settlement
        await self.send(msg)

    async def next(self, *types: str, timeout: float = 10.0) -> dict[str, Any]:
        """The next frame of one of ``types`` (others are kept in :attr:`log` only)."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.frames.get()
                if not types or frame["type"] in types:
                    return frame

    async def collect(self, request_id: str, timeout: float = 15.0) -> tuple[list[str], dict]:
        """Chunk data and the end frame of one request."""
        chunks: list[str] = []
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.next("inference_response_chunk", "inference_response_end")
                if frame["request_id"] != request_id:
                    continue
                if frame["type"] == "inference_response_end":
                    return chunks, frame
                chunks.append(frame["data"])

    # Receiving --------------------------------------------------------------

    def _open_p2c(self, kind: str, msg: dict[str, Any]) -> bytes:
        enc = msg["enc"]
        seq = strict_int(enc["seq"], f"{kind}.enc.seq")
        frame_aad_got = unb64u(enc["aad"])
        rid = msg.get("request_id", "")
        stream = self.stream_of.get(rid, False)
        want = aad(kind, "p2c", rid, stream, self.provider_id, self.assigned_id, seq)
        if frame_aad_got != want:
            raise ProtocolViolation(f"{kind} AAD is not the binary layout for seq {seq}")
        if seq < self.p2c_next or seq in self.p2c_seen:
            raise ProtocolViolation(f"{kind} seq {seq} replayed")
        if seq - self.p2c_next > 4096:
            raise ProtocolViolation(f"{kind} seq {seq} outside the window")
        if enc["kid"] != self.keys["kid"] or enc["alg"] != "A256GCM":
            raise ProtocolViolation(f"{kind} kid/alg mismatch")
        nonce = unb64u(enc["nonce"])
        if nonce != self.keys["p2c_base"] + struct.pack(">Q", seq):
            raise ProtocolViolation(f"{kind} nonce mismatch")
        plain = self.keys["p2c"].decrypt(
            nonce, unb64u(enc["ciphertext"]) + unb64u(enc["tag"]), want
        )
        self.p2c_seen.add(seq)
        while self.p2c_next in self.p2c_seen:
            self.p2c_seen.discard(self.p2c_next)
            self.p2c_next += 1
        return plain

    def accept_frame(self, raw: str) -> None:
        msg = json.loads(raw)
        kind = msg.get("type")
        if kind in ("inference_response_chunk", "inference_response_end") and self.v1:
            pass
        elif kind in ("inference_response_chunk", "inference_response_end"):
            if not msg.get("encrypted"):
                raise ProtocolViolation(f"plaintext {kind} on the encrypted leg")
            plain = self._open_p2c(kind, msg)
            if kind == "inference_response_chunk":
                inner = json.loads(plain)
                if inner.get("type") != "inference_response_chunk_plaintext":
                    raise ProtocolViolation("chunk plaintext is not the negotiated envelope")
                seq = strict_int(inner["seq"], "chunk seq")
                msg = {"type": kind, "request_id": msg["request_id"], "seq": seq,
                       "data": inner["data"]}  # fmt: skip
            else:
                msg = json.loads(plain)
                check_end_ints(msg)
        elif kind == "drain_status":
            strict_int(msg["inflight_requests"], "drain_status.inflight_requests")
            strict_int(msg["estimated_drain_seconds"], "drain_status.estimated_drain_seconds")
        elif kind == "heartbeat":
            for name in ("ram_gb", "max_context_tokens", "max_concurrency", "slots_free",
                         "slots_total", "requests_served_since_last"):  # fmt: skip
                strict_int(msg[name], f"heartbeat.{name}")
            if "model_hash" in msg and not isinstance(msg["model_hash"], str):
                raise ProtocolViolation("heartbeat model_hash is not a string")
        elif kind == "state_update":
            snapshot = msg["metrics_snapshot"]
            strict_int(snapshot["slots_free"], "state_update slots_free")
            strict_int(snapshot["slots_total"], "state_update slots_total")
        self.log.append(msg)
        self.frames.put_nowait(msg)


def check_end_ints(end: dict[str, Any]) -> None:
    strict_int(end["chunks_sent"], "end.chunks_sent")
    strict_int(end["terminal_state_ts_unix_ms"], "end.terminal_state_ts_unix_ms")
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        strict_int(end["usage"][name], f"end.usage.{name}")
    if "receipt_pending_deadline_seconds" in end:
        strict_int(end["receipt_pending_deadline_seconds"], "end.receipt_pending_deadline_seconds")


# --------------------------------------------------------------------------


class ScriptedCoordinator:
    """``auth``: which tokens are valid (Bearer), and what a tokenless provider gets."""

    def __init__(
        self,
        *,
        tokens: set[str] | None = None,
        require_identity_signature: bool = False,
        in_band_rekey: bool = True,
        rekey_after_requests: int = 0,
        feed: tuple[bytes, bytes] | None = None,
        reject: tuple[str, int, str] | None = None,
    ) -> None:
        self.tokens = set(tokens or ())
        self.require_identity_signature = require_identity_signature
        self.in_band_rekey = in_band_rekey
        self.rekey_after_requests = rekey_after_requests
        self.feed = feed
        self.reject = reject
        self.conns: list[Conn] = []
        self.minted: list[str] = []
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def __aenter__(self) -> ScriptedCoordinator:
        app = web.Application()
        app.router.add_get("/ws/provider", self._ws)
        if self.feed is not None:
            app.router.add_get("/v1/autotune-candidates", self._feed)
            app.router.add_get("/v1/autotune-candidates.sig", self._feed_sig)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for conn in self.conns:
            await conn.ws.close()
        assert self._runner is not None
        await self._runner.cleanup()

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/provider"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _feed(self, request: web.Request) -> web.Response:
        assert self.feed is not None
        return web.Response(body=self.feed[0])

    async def _feed_sig(self, request: web.Request) -> web.Response:
        assert self.feed is not None
        return web.Response(body=self.feed[1])

    async def wait_conn(self, n: int, *, authed: bool = True, timeout: float = 15.0) -> Conn:
        """The ``n``-th connection (1-based), once its auth_response went out."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(
                lambda: len(self.conns) >= n and (not authed or bool(self.conns[n - 1].response))
            )
        return self.conns[n - 1]

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=4 * 1024 * 1024, autoping=True)
        await ws.prepare(request)
        conn = Conn(ws=ws, authorization=request.headers.get("Authorization"))
        self.conns.append(conn)
        await self._notify()
        try:
            if conn.authorization is not None and (
                not conn.authorization.startswith("Bearer ")
                or conn.authorization[7:] not in self.tokens
            ):
                await ws.close(code=4005, message=b"invalid_token")
                return ws
            if not await self._handshake(conn):
                return ws
            async for message in ws:
                if message.type != WSMsgType.TEXT:
                    conn.violations.append(f"non-text frame {message.type}")
                    break
                try:
                    if not await self._control(conn, message.data):
                        conn.accept_frame(message.data)
                except (ProtocolViolation, KeyError, ValueError, AssertionError) as exc:
                    conn.violations.append(str(exc))
                    await ws.close(code=4013, message=b"tier2_session_failure")
                    break
        finally:
            conn.close_code = ws.close_code
            conn.closed.set()
            await self._notify()
        return ws

    async def _handshake(self, conn: Conn) -> bool:
        ws = conn.ws
        first = await ws.receive(timeout=10)
        conn.initial_raw = first.data
        initial = json.loads(first.data)
        conn.initial = initial
        if initial.get("type") == "hello":
            conn.v1, conn.assigned_id = True, str(uuid.uuid4())
            conn.response = {"type": "hello_ack", "coordinator_version": 1,
                             "assigned_id": conn.assigned_id, "heartbeat_interval_s": 1,
                             "tier": "pinned"}  # fmt: skip
            await conn.send(conn.response)
            await self._notify()
            return True
        problems = check_initial(initial)
        if problems:
            conn.violations.extend(problems)
            await ws.close(code=4001, message=("invalid_hello: " + problems[0]).encode()[:120])
            return False
        if self.reject is not None:
            code_text, close_code, reason = self.reject
            await conn.send({"type": "auth_response", "version": 2, "status": "rejected",
                             "error": {"code": code_text, "message": reason}})  # fmt: skip
            await ws.close(code=close_code, message=reason.encode())
            return False
        bootstrap = bool(initial.get("credential_bootstrap"))
        conn.assigned_id = str(uuid.uuid4())
        mine = X25519PrivateKey.generate()
        ppub = unb64u(initial["provider_ecdh_public_key"])
        shared = mine.exchange(X25519PublicKey.from_public_bytes(ppub))
        conn.keys = derive(shared, initial["provider_id"], conn.assigned_id, ppub, raw_public(mine))
        challenge = {
            "type": "auth_challenge",
            "version": 2,
            "auth_attempt_id": "auth-" + str(uuid.uuid4()),
            "assigned_id": conn.assigned_id,
            "attestation_challenge": b64u(b"\x05" * 32),
            "attestation_formats": ["apple-managed-device-attestation-acme-v1"],
            "coordinator_ecdh_public_key": b64u(raw_public(mine)),
            "selected_aead_suite": "A256GCM",
            "selected_aead": "A256GCM",
            "key_id": conn.keys["kid"],
            "expires_at": (datetime.now(UTC) + timedelta(minutes=10)).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            ),
        }
        await conn.send(challenge)
        proof = json.loads((await ws.receive(timeout=10)).data)
        conn.proof = proof
        transcript = base64.b64encode(hashlib.sha256(jcs(json.loads(conn.initial_raw))).digest())
        tuple_ = {
            "auth_attempt_id": proof.get("auth_attempt_id"),
            "provider_id": proof.get("provider_id"),
            "binary_version": initial["binary_version"],
            "provider_ecdh_public_key": initial["provider_ecdh_public_key"],
            "transcript_sha256": proof.get("identity_signature_transcript_sha256"),
        }
        mismatch = (
            proof.get("type") != "auth_request"
            or proof.get("stage") != "proof"
            or proof.get("auth_attempt_id") != challenge["auth_attempt_id"]
            or proof.get("provider_id") != initial["provider_id"]
            or bool(proof.get("credential_bootstrap")) != bootstrap
            or proof.get("referral_code", "") != initial.get("referral_code", "")
        )
        if mismatch:
            conn.violations.append("proof does not match the initial request")
            await ws.close(code=4012, message=b"tier2_attestation_failed")
            return False
        signed = bootstrap or self.require_identity_signature
        if signed:
            if proof.get("identity_signature_transcript_sha256") != transcript.decode():
                conn.violations.append("transcript hash differs")
                await ws.close(code=4003, message=b"identity_signature_required")
                return False
            if bootstrap:
                tuple_ |= {"challenge": challenge, "credential_bootstrap": True}
            try:
                conn.receipt_public.verify(
                    base64.b64decode(proof.get("identity_signature", "")), jcs(tuple_)
                )
            except Exception:
                conn.violations.append("identity signature does not verify")
                await ws.close(code=4003, message=b"identity_signature_required")
                return False
        response: dict[str, Any] = {
            "type": "auth_response",
            "version": 2,
            "status": "accepted",
            "assigned_id": conn.assigned_id,
            "heartbeat_interval_s": 1,
            "tier": "pinned",
            "tier2_session": {
                "encrypted_leg": {
                    "enabled": True,
                    "alg": "A256GCM",
                    "kid": conn.keys["kid"],
                    "rekey_after_requests": self.rekey_after_requests,
                    "rekey_after_seconds": 0,
                    "response_chunk_plaintext_envelope": bool(
                        initial["tier2_capabilities"].get("response_chunk_plaintext_envelope")
                    ),
                    "in_band_aead_rekey_v1": self.in_band_rekey
                    and bool(initial["tier2_capabilities"].get("in_band_aead_rekey_v1")),
                },
                "attestation": {"status": "not_required", "ram_tier_attested": False},
                "model_hash": {"status": "uncatalogued"},
            },
        }
        if bootstrap or conn.authorization is None:
            token = "minted-" + uuid.uuid4().hex
            self.minted.append(token)
            self.tokens.add(token)
            response["assigned_provider_token"] = token
            response["auth_state"] = "self_minted" if not bootstrap else ""
            if bootstrap:
                response["tier"] = "provisional"
                response["identity_admission_mode"] = "signature"
                response["identity_generation"] = 1
        else:
            response["auth_state"] = "bearer_validated"
        conn.response = response
        await conn.send(response)
        await self._notify()
        if bootstrap:
            await ws.close(code=1000, message=b"")
            return False
        return True

    async def _control(self, conn: Conn, raw: str) -> bool:
        """Rekey frames; True when handled here."""
        msg = json.loads(raw)
        if msg.get("type") == "aead_rekey_response":
            exchange = conn.rekey
            assert exchange is not None, "aead_rekey_response without a request"
            ppub = unb64u(msg["provider_ecdh_public_key"])
            shared = exchange["key"].exchange(X25519PublicKey.from_public_bytes(ppub))
            new = derive(shared, conn.provider_id, conn.assigned_id, ppub,
                         raw_public(exchange["key"]))  # fmt: skip
            if msg["new_kid"] != new["kid"] or msg["old_kid"] != conn.keys["kid"]:
                raise ProtocolViolation("rekey response key ids do not match")
            proof = json.dumps({
                "type": "aead_rekey_proof", "version": 1, "rekey_id": exchange["id"],
                "provider_id": conn.provider_id, "assigned_id": conn.assigned_id,
                "old_kid": conn.keys["kid"], "new_kid": new["kid"],
                "provider_ecdh_public_key": msg["provider_ecdh_public_key"],
                "coordinator_ecdh_public_key": exchange["public"],
                "selected_aead": "A256GCM", "expires_at": exchange["expires_at"],
            }).encode()  # fmt: skip
            commit_aad = aad("aead_rekey_commit", "c2p", exchange["id"], False, conn.provider_id,
                             conn.assigned_id, 0)  # fmt: skip
            exchange |= {"new": new, "proof": proof}
            await conn.send({
                "type": "aead_rekey_commit", "version": 1, "rekey_id": exchange["id"],
                "assigned_id": conn.assigned_id, "old_kid": conn.keys["kid"],
                "new_kid": new["kid"], "encrypted": True,
                "enc": seal(new, 0, commit_aad, proof),
            })  # fmt: skip
            return True
        if msg.get("type") == "aead_rekey_committed":
            exchange = conn.rekey
            assert exchange is not None and "new" in exchange
            new = exchange["new"]
            back_aad = aad("aead_rekey_committed", "p2c", exchange["id"], False,
                           conn.provider_id, conn.assigned_id, 0)  # fmt: skip
            enc = msg["enc"]
            nonce = new["p2c_base"] + struct.pack(">Q", 0)
            plain = new["p2c"].decrypt(
                nonce, unb64u(enc["ciphertext"]) + unb64u(enc["tag"]), back_aad
            )
            if plain != exchange["proof"] or unb64u(enc["aad"]) != back_aad:
                raise ProtocolViolation("rekey committed proof differs")
            conn.keys, conn.c2p_next, conn.p2c_next, conn.p2c_seen = new, 1, 1, set()
            conn.rekey = None
            exchange["done"].set()
            return True
        return False

    async def rekey(self, conn: Conn, timeout: float = 10.0) -> None:
        """An in-band rekey, started by us; returns once both sides switched."""
        key = X25519PrivateKey.generate()
        conn.rekey = {
            "id": str(uuid.uuid4()),
            "key": key,
            "public": b64u(raw_public(key)),
            "expires_at": (datetime.now(UTC) + timedelta(seconds=10)).isoformat(),
            "done": asyncio.Event(),
        }
        await conn.send({
            "type": "aead_rekey_request", "version": 1, "rekey_id": conn.rekey["id"],
            "assigned_id": conn.assigned_id, "reason": "request_threshold",
            "old_kid": conn.keys["kid"], "coordinator_ecdh_public_key": conn.rekey["public"],
            "selected_aead": "A256GCM", "expires_at": conn.rekey["expires_at"],
            "response_chunk_plaintext_envelope": True,
        })  # fmt: skip
        async with asyncio.timeout(timeout):
            await conn.rekey["done"].wait()


def check_initial(initial: dict[str, Any]) -> list[str]:
    """The coordinator's ParseAuthRequest rules that a provider can break."""
    problems = []
    if initial.get("type") != "auth_request" or initial.get("stage") != "initial":
        problems.append("stage")
    if initial.get("version") != 2:
        problems.append("version")
    for name in ("ram_gb", "max_context_tokens", "max_concurrency"):
        if not isinstance(initial.get(name), int) or isinstance(initial.get(name), bool):
            problems.append(name)
    caps = initial.get("tier2_capabilities", {})
    if not caps.get("encrypted_leg") or "A256GCM" not in caps.get("aead_suites", []):
        problems.append("no_common_aead_suite")
    if len(unb64u(initial.get("provider_ecdh_public_key", ""))) != 32:
        problems.append("provider_ecdh_public_key")
    receipt = initial.get("provider_receipt_public_key")
    if receipt is None or len(base64.b64decode(receipt)) != 32:
        problems.append("provider_receipt_public_key")
    models = initial.get("supported_models")
    if models is not None and initial.get("model_id") not in models:
        problems.append("model_id not in supported_models")
    for name, value in initial.items():
        if value is None:
            problems.append(f"{name} is null")
    if "model_hash_algorithm" in initial and "model_hash" not in initial:
        problems.append("model_hash_algorithm")
    catalog = [k for k in initial if k.startswith("catalog_")]
    if catalog and len(catalog) != 5:
        problems.append("catalog fields: all five or none")
    return problems


def output_hash_of(content: str, finish: str | None, state: str, start: int) -> tuple[str, int]:
    """settlement_output_v1 without tool calls, for checking receipts."""
    text = unicodedata.normalize("NFC", content.replace("\r\n", "\n").replace("\r", "\n"))
    end = start + len(text.encode())
    value = {
        "content": text,
        "finish_reason": finish if state == "normal_done" else None,
        "output_prefix_end_byte": end,
        "output_prefix_start_byte": start,
        "terminal_state": state,
        "tool_calls": None,
    }
    return hashlib.sha256(jcs(value)).hexdigest(), end


def verify_receipt(conn: Conn, receipt: str) -> dict[str, Any]:
    """The settlement verifier's first checks: canonical tuple, key id, signature."""
    tuple_b64, sig_b64 = receipt.split(".")
    raw = base64.b64decode(tuple_b64, validate=True)
    tuple_ = json.loads(raw)
    if jcs(tuple_) != raw:
        raise ProtocolViolation("receipt tuple is not canonical")
    pub = base64.b64decode(conn.initial["provider_receipt_public_key"])
    if tuple_["provider_receipt_key_id"] != "ed25519-sha256:" + hashlib.sha256(pub).hexdigest():
        raise ProtocolViolation("receipt key id")
    conn.receipt_public.verify(base64.b64decode(sig_b64, validate=True), raw)
    return tuple_
