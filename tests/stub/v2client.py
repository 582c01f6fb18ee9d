"""A scripted protocol v2 provider for the stub's tests (test-only).

It runs the ``auth_request`` challenge/proof handshake, the encrypted leg,
settlement receipts and the in-band rekey written straight from
COORDINATOR.md sections 1, 5 and 7 with the ``cryptography`` primitives, and
imports nothing from ``coordinator_stub``: it is the second implementation
the stub's crypto and canonical JSON are checked against. Canonical JSON here
is ``json.dumps(sort_keys=True)``, which is JCS for what this client signs
(ASCII keys and strings, integers only).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

WARMUP_TEXT = "Reply with ok."


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def public_raw(private: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


@dataclass
class LegKeys:
    """One epoch of the encrypted leg, derived on the provider side."""

    kid: str
    c2p_key: bytes
    p2c_key: bytes
    c2p_nonce: bytes
    p2c_nonce: bytes
    c2p_next: int = 0
    p2c_next: int = 0

    @classmethod
    def derive(
        cls,
        private: X25519PrivateKey,
        coordinator_public: bytes,
        provider_id: str,
        assigned_id: str,
    ) -> LegKeys:
        shared = private.exchange(X25519PublicKey.from_public_bytes(coordinator_public))
        transcript = hashlib.sha256(b"macprovider/spec008/pillar-b/transcript/v1")
        for label, value in (
            ("provider_id", provider_id.encode()),
            ("assigned_id", assigned_id.encode()),
            ("provider_public", public_raw(private)),
            ("coordinator_public", coordinator_public),
            ("selected_aead", b"A256GCM"),
        ):
            transcript.update(struct.pack(">I", len(label)) + label.encode())
            transcript.update(struct.pack(">I", len(value)) + value)
        salt = transcript.digest()

        def expand(info: str, length: int) -> bytes:
            return HKDF(hashes.SHA256(), length, salt, info.encode()).derive(shared)

        return cls(
            kid=b64url(hashlib.sha256(salt).digest()[:16]),
            c2p_key=expand("macprovider/spec008/c2p/aead/v1", 32),
            p2c_key=expand("macprovider/spec008/p2c/aead/v1", 32),
            c2p_nonce=expand("macprovider/spec008/c2p/nonce/v1", 4),
            p2c_nonce=expand("macprovider/spec008/p2c/nonce/v1", 4),
        )


def aad_bytes(
    kind: str, direction: str, request_id: str, stream: bool, pid: str, aid: str, seq: int
) -> bytes:
    def lenstr(value: str) -> bytes:
        raw = value.encode()
        return struct.pack(">I", len(raw)) + raw

    return (
        b"macprovider/spec008/pillar-b/aad/v1\x00"
        + lenstr(kind)
        + lenstr(direction)
        + lenstr(request_id)
        + (b"\x01" if stream else b"\x00")
        + lenstr(pid)
        + lenstr(aid)
        + struct.pack(">Q", seq)
    )


def seal(key: bytes, nonce_base: bytes, kid: str, aad: bytes, seq: int, plaintext: bytes) -> dict:
    nonce = nonce_base + struct.pack(">Q", seq)
    sealed = AESGCM(key).encrypt(nonce, plaintext, aad)
    return {
        "alg": "A256GCM",
        "seq": seq,
        "nonce": b64url(nonce),
        "aad": b64url(aad),
        "ciphertext": b64url(sealed[:-16]),
        "tag": b64url(sealed[-16:]),
        "kid": kid,
    }


def open_enc(key: bytes, nonce_base: bytes, enc: dict, aad: bytes) -> bytes:
    assert unb64url(enc["aad"]) == aad, "AAD differs from the expected layout"
    nonce = nonce_base + struct.pack(">Q", enc["seq"])
    assert unb64url(enc["nonce"]) == nonce
    return AESGCM(key).decrypt(nonce, unb64url(enc["ciphertext"]) + unb64url(enc["tag"]), aad)


@dataclass
class Request:
    """An ``inference_request`` as this client opened it."""

    request_id: str
    stream: bool
    body: dict[str, Any]
    settlement: dict[str, Any] | None
    c2p_seq: int | None
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def warmup(self) -> bool:
        return self.body.get("messages", [{}])[-1].get("content") == WARMUP_TEXT


class V2Client:
    """A v2 provider: handshake, heartbeats, encrypted answers, receipts, rekey.

    Args:
        url: The stub's ``ws_url``.
        provider_id: Sent in ``auth_request``.
        token: Bearer token (``None``: tokenless).
        bootstrap: Credential bootstrap (``mp-`` id, receipt key signs the proof).
        receipt_key: Ed25519 receipt key (sent as ``provider_receipt_public_key``).
        identity_key: Key of the identity signature (default: the receipt key
            for bootstrap and its reconnects; ``None`` sends no signature otherwise).
        hold: Hold buyer requests until :meth:`release` or a cancel.
        envelope: Negotiate ``response_chunk_plaintext_envelope``.
        in_band_rekey: Advertise ``in_band_aead_rekey_v1``.
        extra: Extra or overriding fields of the initial ``auth_request``.
    """

    def __init__(
        self,
        url: str,
        provider_id: str = "p2",
        *,
        token: str | None = None,
        bootstrap: bool = False,
        referral_code: str = "",
        receipt_key: Ed25519PrivateKey | None = None,
        identity_key: Ed25519PrivateKey | None = None,
        sign_identity: bool | None = None,
        model_id: str = "test-model",
        model_hash: str | None = None,
        binary_version: str = "1.8.123",
        hold: bool = False,
        envelope: bool = True,
        in_band_rekey: bool = True,
        answer: str = "Hello world",
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.url = url
        self.provider_id = provider_id
        self.token = token
        self.bootstrap = bootstrap
        self.referral_code = referral_code
        self.receipt_key = receipt_key or Ed25519PrivateKey.generate()
        self.identity_key = identity_key
        self.sign_identity = bootstrap if sign_identity is None else sign_identity
        self.model_id = model_id
        self.model_hash = model_hash
        self.binary_version = binary_version
        self.hold = hold
        self.envelope = envelope
        self.in_band_rekey = in_band_rekey
        self.answer = answer
        self.extra = extra or {}
        self.ecdh = X25519PrivateKey.generate()
        self.ws: ClientConnection | None = None
        self.initial: dict[str, Any] = {}
        self.challenge: dict[str, Any] = {}
        self.response: dict[str, Any] = {}
        self.keys: LegKeys | None = None
        self.assigned_id = ""
        self.received: list[dict[str, Any]] = []
        self.requests: dict[str, Request] = {}
        self.c2p_seqs: list[int] = []
        self.sent_frames: list[str] = []
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.rekeys = 0
        self._released: dict[str, asyncio.Event] = {}
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pending_rekey: tuple[str, LegKeys, str] | None = None

    # ------------------------------------------------------------------
    # Handshake

    def initial_request(self) -> dict[str, Any]:
        request: dict[str, Any] = {
            "type": "auth_request",
            "version": 2,
            "stage": "initial",
            "provider_id": self.provider_id,
            "hostname": "v2-host",
            "model_id": self.model_id,
            "model_params_b": 1,
            "ram_gb": 16,
            "max_context_tokens": 4096,
            "max_concurrency": 4,
            "throughput_tps_estimate": 50,
            "binary_version": self.binary_version,
            "provider_ecdh_public_key": b64url(public_raw(self.ecdh)),
            "provider_receipt_public_key": base64.b64encode(public_raw(self.receipt_key)).decode(),
            "tier2_capabilities": {
                "encrypted_leg": True,
                "attestation": False,
                "aead_suites": ["A256GCM"],
                "response_chunk_plaintext_envelope": self.envelope,
                "in_band_aead_rekey_v1": self.in_band_rekey,
            },
        }
        if self.model_hash is not None:
            request["model_hash"] = self.model_hash
            request["model_hash_algorithm"] = "macprovider.snapshot-manifest.v1"
        if self.bootstrap:
            request["credential_bootstrap"] = True
        if self.referral_code:
            request["referral_code"] = self.referral_code
        request.update(self.extra)
        return request

    async def connect(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.ws = await connect(
            self.url,
            additional_headers=headers,
            ping_interval=None,
            max_size=None,
            open_timeout=5,
            close_timeout=1,
            proxy=None,
        )

    async def handshake(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """Initial, challenge, proof, response; ``None`` when the stub closed first."""
        if self.ws is None:
            await self.connect()
        assert self.ws is not None
        self.initial = self.initial_request()
        text = json.dumps(self.initial)
        await self.ws.send(text)
        try:
            async with asyncio.timeout(timeout):
                self.challenge = json.loads(await self.ws.recv())
                if self.challenge.get("type") != "auth_challenge":
                    self.response = self.challenge
                    await self._await_close()
                    return self.response
                self.assigned_id = self.challenge["assigned_id"]
                self.keys = LegKeys.derive(
                    self.ecdh,
                    unb64url(self.challenge["coordinator_ecdh_public_key"]),
                    self.provider_id,
                    self.assigned_id,
                )
                assert self.challenge["key_id"] == self.keys.kid, "kid differs"
                await self.ws.send(json.dumps(self.proof()))
                self.response = json.loads(await self.ws.recv())
        except ConnectionClosed:
            self._record_close()
            return None
        if self.response.get("status") != "accepted" or self.bootstrap:
            await self._await_close()
            return self.response
        leg = self.response["tier2_session"]["encrypted_leg"]
        assert leg["kid"] == self.keys.kid and leg["alg"] == "A256GCM" and leg["enabled"]
        self._spawn(self._receive())
        return self.response

    def transcript_sha256(self) -> str:
        return base64.b64encode(hashlib.sha256(canonical(self.initial)).digest()).decode()

    def proof(self) -> dict[str, Any]:
        proof: dict[str, Any] = {
            "type": "auth_request",
            "version": 2,
            "stage": "proof",
            "auth_attempt_id": self.challenge["auth_attempt_id"],
            "provider_id": self.provider_id,
            "attestation_token": None,
        }
        if self.bootstrap:
            proof["credential_bootstrap"] = True
        if self.referral_code:
            proof["referral_code"] = self.referral_code
        if self.sign_identity:
            transcript = self.transcript_sha256()
            signed: dict[str, Any] = {
                "auth_attempt_id": self.challenge["auth_attempt_id"],
                "provider_id": self.provider_id,
                "binary_version": self.binary_version,
                "provider_ecdh_public_key": self.initial["provider_ecdh_public_key"],
                "transcript_sha256": transcript,
            }
            if self.bootstrap:
                signed["challenge"] = self.challenge
                signed["credential_bootstrap"] = True
            key = self.identity_key or self.receipt_key
            proof["identity_signature"] = base64.b64encode(key.sign(canonical(signed))).decode()
            proof["identity_signature_transcript_sha256"] = transcript
        return proof

    async def _await_close(self) -> None:
        assert self.ws is not None
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            async with asyncio.timeout(5):
                while True:
                    self.received.append(json.loads(await self.ws.recv()))
        self._record_close()

    def _record_close(self) -> None:
        assert self.ws is not None
        rcvd = self.ws.protocol.close_rcvd
        self.close_code = None if rcvd is None else rcvd.code
        self.close_reason = None if rcvd is None else rcvd.reason
        self.closed.set()
        self._notify()

    # ------------------------------------------------------------------
    # Session

    async def start(self) -> dict[str, Any]:
        """Handshake, then ``state_update ready`` (commits the receipt key)."""
        response = await self.handshake()
        assert response is not None and response["status"] == "accepted", response
        await self.send(self.state_update("ready"))
        return response

    async def send(self, message: dict[str, Any] | str) -> None:
        assert self.ws is not None
        text = message if isinstance(message, str) else json.dumps(message)
        self.sent_frames.append(text)
        await self.ws.send(text)

    def state_update(self, state: str) -> dict[str, Any]:
        return {
            "type": "state_update",
            "state": state,
            "reason": "test",
            "since": "2026-01-01T00:00:00Z",
            "metrics_snapshot": {"slots_free": 4, "slots_total": 4},
        }

    def heartbeat(self) -> dict[str, Any]:
        hb: dict[str, Any] = {
            "type": "heartbeat",
            "status": "ready",
            "model_id": self.model_id,
            "model_params_b": 1,
            "ram_gb": 16,
            "max_context_tokens": 4096,
            "max_concurrency": 4,
            "slots_free": 4,
            "slots_total": 4,
            "throughput_tps_estimate": 50,
            "requests_served_since_last": 0,
            "avg_latency_ms_since_last": 0,
            "throughput_tps_since_last": 0,
        }
        if self.model_hash is not None:
            hb["model_hash"] = self.model_hash
            hb["model_hash_algorithm"] = "macprovider.snapshot-manifest.v1"
        return hb

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 1)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                result = predicate()
                if result:
                    return result
                await self._changed.wait()

    def messages(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.received if m.get("type") == kind]

    async def wait_request(self, *, warmup: bool = False, timeout: float = 5.0) -> Request:
        return await self.wait_for(
            lambda: next((r for r in self.requests.values() if r.warmup == warmup), None), timeout
        )

    def release(self, request_id: str | None = None) -> None:
        for rid, event in self._released.items():
            if request_id is None or rid == request_id:
                event.set()

    async def _receive(self) -> None:
        assert self.ws is not None
        try:
            async for data in self.ws:
                message = json.loads(data)
                self.received.append(message)
                kind = message.get("type")
                if kind == "inference_request":
                    self._on_request(message)
                elif kind == "cancel_request":
                    request = self.requests.get(message["request_id"])
                    if request is not None:
                        request.cancelled.set()
                elif kind == "aead_rekey_request":
                    await self._on_rekey_request(message)
                elif kind == "aead_rekey_commit":
                    await self._on_rekey_commit(message)
                self._notify()
        except ConnectionClosed:
            pass
        finally:
            self._record_close()

    # -- requests --------------------------------------------------------

    def _on_request(self, message: dict[str, Any]) -> None:
        keys = self.keys
        assert keys is not None
        rid, stream = message["request_id"], message["stream"]
        assert message.get("encrypted") is True and "body" not in message
        enc = message["enc"]
        assert enc["seq"] == keys.c2p_next, (enc["seq"], keys.c2p_next)
        aad = aad_bytes(
            "inference_request", "c2p", rid, stream, self.provider_id, self.assigned_id, enc["seq"]
        )
        plaintext = json.loads(open_enc(keys.c2p_key, keys.c2p_nonce, enc, aad))
        assert plaintext["type"] == "inference_request_plaintext"
        keys.c2p_next += 1
        self.c2p_seqs.append(enc["seq"])
        request = Request(
            rid, stream, json.loads(plaintext["body"]), message.get("settlement"), enc["seq"]
        )
        self.requests[rid] = request
        self._released[rid] = asyncio.Event()
        self._spawn(self._answer(request))

    async def _answer(self, request: Request) -> None:
        rid = request.request_id
        if self.hold and not request.warmup:
            released = asyncio.create_task(self._released[rid].wait())
            cancelled = asyncio.create_task(request.cancelled.wait())
            await asyncio.wait({released, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            released.cancel()
            cancelled.cancel()
        try:
            if request.cancelled.is_set():
                await self.send_end(request, "cancelled", 0, content="", completion_tokens=0)
                return
            if request.warmup:
                await self.send_chunk(request, 0, self.completion_json("ok"))
                await self.send_end(request, "complete", 1, content="ok")
                return
            if request.stream:
                first = _sse({"choices": [{"index": 0, "delta": {"content": "Hello"}}]})
                done = {"index": 0, "delta": {"content": " world"}, "finish_reason": "stop"}
                rest = _sse({"choices": [done]})
                await self.send_chunk(request, 0, first)
                await self.send_chunk(request, 1, rest + "data: [DONE]\n\n")
                await self.send_end(request, "complete", 2, content="Hello world")
            else:
                await self.send_chunk(request, 0, self.completion_json(self.answer))
                await self.send_end(request, "complete", 1, content=self.answer)
        except ConnectionClosed:
            pass

    def completion_json(self, text: str) -> str:
        return json.dumps(
            {
                "id": "chatcmpl-v2",
                "object": "chat.completion",
                "created": 1700000000,
                "model": self.model_id,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
            }
        )

    def encrypt_frame(self, kind: str, request: Request, plaintext: bytes) -> dict[str, Any]:
        keys = self.keys
        assert keys is not None
        seq = keys.p2c_next
        keys.p2c_next += 1
        aad = aad_bytes(
            kind, "p2c", request.request_id, request.stream, self.provider_id, self.assigned_id, seq
        )
        return {
            "type": kind,
            "request_id": request.request_id,
            "encrypted": True,
            "enc": seal(keys.p2c_key, keys.p2c_nonce, keys.kid, aad, seq, plaintext),
        }

    async def send_chunk(self, request: Request, seq: int, data: str) -> None:
        if self.envelope:
            plaintext = json.dumps(
                {"type": "inference_response_chunk_plaintext", "seq": seq, "data": data}
            ).encode()
        else:
            plaintext = data.encode()
        await self.send(self.encrypt_frame("inference_response_chunk", request, plaintext))

    async def send_end(
        self,
        request: Request,
        status: str,
        chunks_sent: int,
        *,
        content: str,
        completion_tokens: int = 2,
        receipt: str | None = None,
    ) -> None:
        terminal_ms = time.time_ns() // 1_000_000
        end: dict[str, Any] = {
            "type": "inference_response_end",
            "request_id": request.request_id,
            "status": status,
            "chunks_sent": chunks_sent,
            "usage": {
                "prompt_tokens": 5,
                "completion_tokens": completion_tokens,
                "total_tokens": 5 + completion_tokens,
            },
            "terminal_state_ts_unix_ms": terminal_ms,
        }
        if request.settlement is not None:
            state = "normal_done" if status == "complete" else "buyer_cancel"
            end["receipt"] = receipt or self.receipt(
                request, content, state, terminal_ms, completion_tokens
            )
            end["receipt_pending_deadline_seconds"] = request.settlement["pending_deadline_seconds"]
            end["late_receipt_settlement"] = "not_settled"
        await self.send(
            self.encrypt_frame("inference_response_end", request, json.dumps(end).encode())
        )

    def receipt(
        self,
        request: Request,
        content: str,
        terminal_state: str,
        terminal_ms: int,
        completion_tokens: int,
        *,
        key: Ed25519PrivateKey | None = None,
        **overrides: Any,
    ) -> str:
        """A v0.4 settlement receipt for what this client delivered."""
        meta = request.settlement
        assert meta is not None
        start = meta["output_prefix_start_byte"]
        delivered = len(content.encode())
        billable = terminal_state == "normal_done" or delivered > 0
        output = {
            "content": content,
            "finish_reason": "stop" if terminal_state == "normal_done" else None,
            "output_prefix_end_byte": start + delivered,
            "output_prefix_start_byte": start,
            "terminal_state": terminal_state,
            "tool_calls": None,
        }
        key_id = "ed25519-sha256:" + hashlib.sha256(public_raw(self.receipt_key)).hexdigest()
        assert meta["provider_receipt_key_id"] == key_id
        tuple_: dict[str, Any] = {
            "account_scope": meta["account_scope"],
            "attempt_n": meta["attempt_n"],
            "catalog_body_digest": meta["catalog_body_digest"],
            "catalog_id": meta["catalog_id"],
            "expected_catalog_model_hash": meta["expected_catalog_model_hash"],
            "issued_at_unix_ms": time.time_ns() // 1_000_000,
            "model_hash": self.model_hash,
            "model_id": meta["model_id"],
            "output_hash": hashlib.sha256(canonical(output)).hexdigest(),
            "output_prefix_end_byte": start + delivered,
            "output_prefix_start_byte": start,
            "prompt_hash": meta["prompt_hash"],
            "provider_id": self.provider_id,
            "provider_receipt_key_id": key_id,
            "receipt_version": "4",
            "request_id": meta["request_id"],
            "route_snapshot_digest": meta["route_snapshot_digest"],
            "route_snapshot_mode": meta["route_snapshot_mode"],
            "route_snapshot_policy_version": meta["route_snapshot_policy_version"],
            "signature_key_alg": "Ed25519",
            "terminal_state": terminal_state,
            "terminal_state_ts_unix_ms": terminal_ms,
            "usage": {
                "billable_input_tokens": 5 if billable else 0,
                "billable_output_tokens": completion_tokens if billable else 0,
                "delivered_output_bytes": delivered,
                "observed_input_tokens": 5,
                "observed_output_tokens": completion_tokens,
            },
        }
        tuple_.update(overrides)
        raw = canonical(tuple_)
        signature = (key or self.receipt_key).sign(raw)
        return base64.b64encode(raw).decode() + "." + base64.b64encode(signature).decode()

    # -- rekey -------------------------------------------------------------

    async def _on_rekey_request(self, message: dict[str, Any]) -> None:
        assert self.keys is not None and message["old_kid"] == self.keys.kid
        private = X25519PrivateKey.generate()
        new = LegKeys.derive(
            private,
            unb64url(message["coordinator_ecdh_public_key"]),
            self.provider_id,
            self.assigned_id,
        )
        self._pending_rekey = (message["rekey_id"], new, b64url(public_raw(private)))
        await self.send(
            {
                "type": "aead_rekey_response",
                "version": 1,
                "rekey_id": message["rekey_id"],
                "assigned_id": self.assigned_id,
                "old_kid": self.keys.kid,
                "new_kid": new.kid,
                "provider_ecdh_public_key": b64url(public_raw(private)),
            }
        )

    async def _on_rekey_commit(self, message: dict[str, Any]) -> None:
        assert self._pending_rekey is not None and self.keys is not None
        rekey_id, new, _ = self._pending_rekey
        assert message["rekey_id"] == rekey_id and message["new_kid"] == new.kid
        commit_aad = aad_bytes(
            "aead_rekey_commit", "c2p", rekey_id, False, self.provider_id, self.assigned_id, 0
        )
        proof = open_enc(new.c2p_key, new.c2p_nonce, message["enc"], commit_aad)
        parsed = json.loads(proof)
        assert parsed["type"] == "aead_rekey_proof" and parsed["new_kid"] == new.kid
        committed_aad = aad_bytes(
            "aead_rekey_committed", "p2c", rekey_id, False, self.provider_id, self.assigned_id, 0
        )
        await self.send(
            {
                "type": "aead_rekey_committed",
                "version": 1,
                "rekey_id": rekey_id,
                "assigned_id": self.assigned_id,
                "old_kid": self.keys.kid,
                "new_kid": new.kid,
                "encrypted": True,
                "enc": seal(new.p2c_key, new.p2c_nonce, new.kid, committed_aad, 0, proof),
            }
        )
        new.c2p_next = new.p2c_next = 1
        self.keys = new
        self._pending_rekey = None
        self.rekeys += 1


def _sse(event: dict[str, Any]) -> str:
    return "data: " + json.dumps(event) + "\n\n"
