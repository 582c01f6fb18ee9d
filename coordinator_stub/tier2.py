"""The encrypted leg ("Pillar B", ``internal/tier2/pillar_b.go``) and the auth crypto.

Written from the coordinator's Go code and COORDINATOR.md section 7, with the
``cryptography`` primitives; no code is shared with the provider.

Key agreement: X25519 between the provider's key (``provider_ecdh_public_key``)
and a fresh coordinator key per session (or per in-band rekey), then

* ``transcript = SHA256("macprovider/spec008/pillar-b/transcript/v1" ||
  field("provider_id") || field("assigned_id") || field("provider_public") ||
  field("coordinator_public") || field("selected_aead"))`` where
  ``field(l, v) = u32be(len l) || l || u32be(len v) || v``;
* HKDF-SHA256 with the transcript as salt and the shared secret as key; four
  separate expands of the one PRK give the two AES-256 keys and the two
  4-byte nonce bases;
* ``kid = base64url_nopad(SHA256(transcript)[:16])``.

Frames: AES-256-GCM, nonce ``nonce_base || u64be(seq)``, AAD
``"macprovider/spec008/pillar-b/aad/v1\\x00" || lenstr(type) ||
lenstr(direction) || lenstr(request_id) || stream byte || lenstr(provider_id)
|| lenstr(assigned_id) || u64be(seq)``. Opening also accepts the legacy JSON
AAD form when it decodes to exactly the expected fields, as Go does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from . import gojson
from .frames import AEADBody, decode_raw_url_base64
from .gojson import GoJSONError, decode_struct, unmarshal_bool, unmarshal_string, unmarshal_uint64

A256GCM: Final = "A256GCM"
TRANSCRIPT_PREFIX: Final = b"macprovider/spec008/pillar-b/transcript/v1"
AAD_PREFIX: Final = b"macprovider/spec008/pillar-b/aad/v1\x00"
INFO_C2P_KEY: Final = b"macprovider/spec008/c2p/aead/v1"
INFO_P2C_KEY: Final = b"macprovider/spec008/p2c/aead/v1"
INFO_C2P_NONCE: Final = b"macprovider/spec008/c2p/nonce/v1"
INFO_P2C_NONCE: Final = b"macprovider/spec008/p2c/nonce/v1"

#: How far ahead of the contiguous p2c counter a frame may arrive.
P2C_WINDOW: Final = 4096
SEQ_EXHAUSTED: Final = 2**64 - 1


class Tier2Error(Exception):
    """A key exchange or frame the coordinator refuses (the session is closed)."""


def b64url(data: bytes) -> str:
    """base64url without padding (Go's ``RawURLEncoding``)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def parse_x25519_public(encoded: str) -> bytes:
    """A raw 32-byte X25519 key from base64url-nopad (``ParseX25519PublicKey``)."""
    try:
        raw = decode_raw_url_base64(encoded)
    except ValueError as exc:
        raise Tier2Error(f"invalid X25519 public key encoding: {exc}") from None
    if len(raw) != 32:
        raise Tier2Error("X25519 public key must be 32 bytes")
    return raw


def _field(label: str, value: bytes) -> bytes:
    encoded = label.encode()
    return struct.pack(">I", len(encoded)) + encoded + struct.pack(">I", len(value)) + value


def transcript(
    provider_id: str,
    assigned_id: str,
    provider_public: bytes,
    coordinator_public: bytes,
    selected_aead: str = A256GCM,
) -> bytes:
    """The 32-byte Pillar B transcript hash."""
    digest = hashlib.sha256(TRANSCRIPT_PREFIX)
    digest.update(_field("provider_id", provider_id.encode()))
    digest.update(_field("assigned_id", assigned_id.encode()))
    digest.update(_field("provider_public", provider_public))
    digest.update(_field("coordinator_public", coordinator_public))
    digest.update(_field("selected_aead", selected_aead.encode()))
    return digest.digest()


def _hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    return HKDFExpand(hashes.SHA256(), length, info).derive(prk)


@dataclass(frozen=True, slots=True)
class Keys:
    """The derived key material of one epoch (``PillarBKeyMaterial``)."""

    kid: str
    c2p_key: bytes
    p2c_key: bytes
    c2p_nonce_base: bytes
    p2c_nonce_base: bytes
    transcript: bytes


def derive_from_shared(
    shared: bytes,
    provider_id: str,
    assigned_id: str,
    provider_public: bytes,
    coordinator_public: bytes,
    selected_aead: str = A256GCM,
) -> Keys:
    """``DerivePillarBKeysFromSharedSecret``."""
    if selected_aead != A256GCM:
        raise Tier2Error(f"unsupported AEAD suite {selected_aead!r}")
    if len(shared) != 32 or len(provider_public) != 32 or len(coordinator_public) != 32:
        raise Tier2Error("pillar B key derivation requires 32-byte shared/public keys")
    t = transcript(provider_id, assigned_id, provider_public, coordinator_public, selected_aead)
    # HKDF-Extract is HMAC(salt, ikm); the four outputs share one PRK.
    prk = hmac.new(t, shared, hashlib.sha256).digest()
    return Keys(
        kid=b64url(hashlib.sha256(t).digest()[:16]),
        c2p_key=_hkdf_expand(prk, INFO_C2P_KEY, 32),
        p2c_key=_hkdf_expand(prk, INFO_P2C_KEY, 32),
        c2p_nonce_base=_hkdf_expand(prk, INFO_C2P_NONCE, 4),
        p2c_nonce_base=_hkdf_expand(prk, INFO_P2C_NONCE, 4),
        transcript=t,
    )


class CoordinatorKey:
    """A fresh X25519 key pair of the coordinator side."""

    def __init__(self, private: X25519PrivateKey | None = None) -> None:
        self.private = private or X25519PrivateKey.generate()
        self.public = self.private.public_key().public_bytes_raw()

    @property
    def public_b64url(self) -> str:
        return b64url(self.public)

    def derive(
        self, provider_public: bytes, provider_id: str, assigned_id: str, aead: str = A256GCM
    ) -> Keys:
        """``DerivePillarBKeys``: X25519 with ``provider_public`` and the HKDF outputs."""
        try:
            shared = self.private.exchange(X25519PublicKey.from_public_bytes(provider_public))
        except ValueError as exc:
            raise Tier2Error(f"X25519 exchange failed: {exc}") from None
        return derive_from_shared(
            shared, provider_id, assigned_id, provider_public, self.public, aead
        )


# ---------------------------------------------------------------------------
# AAD


@dataclass(frozen=True, slots=True)
class AAD:
    """``AEADFrameAAD``: what an encrypted frame is bound to."""

    type: str
    direction: str
    request_id: str
    stream: bool
    provider_id: str
    assigned_id: str
    seq: int

    def marshal(self) -> bytes:
        """The binary AAD (``MarshalAEADAAD``)."""

        def lenstr(value: str) -> bytes:
            encoded = value.encode("utf-8", "surrogatepass")
            return struct.pack(">I", len(encoded)) + encoded

        return (
            AAD_PREFIX
            + lenstr(self.type)
            + lenstr(self.direction)
            + lenstr(self.request_id)
            + (b"\x01" if self.stream else b"\x00")
            + lenstr(self.provider_id)
            + lenstr(self.assigned_id)
            + struct.pack(">Q", self.seq)
        )


def _parse_binary_aad(raw: bytes) -> AAD:
    view = memoryview(raw)[len(AAD_PREFIX) :]
    position = 0

    def read_string(name: str) -> str:
        nonlocal position
        if len(view) - position < 4:
            raise Tier2Error(f"invalid pillar B AAD {name} length")
        (length,) = struct.unpack_from(">I", view, position)
        position += 4
        if length > len(view) - position:
            raise Tier2Error(f"invalid pillar B AAD {name} length")
        value = bytes(view[position : position + length])
        position += length
        return value.decode("utf-8", "replace")

    typ = read_string("type")
    direction = read_string("direction")
    request_id = read_string("request_id")
    if position >= len(view):
        raise Tier2Error("invalid pillar B AAD stream")
    flag = view[position]
    position += 1
    if flag not in (0, 1):
        raise Tier2Error("invalid pillar B AAD stream flag")
    provider_id = read_string("provider_id")
    assigned_id = read_string("assigned_id")
    if len(view) - position < 8:
        raise Tier2Error("invalid pillar B AAD seq")
    (seq,) = struct.unpack_from(">Q", view, position)
    position += 8
    if position != len(view):
        raise Tier2Error("invalid pillar B AAD trailing data")
    return AAD(typ, direction, request_id, flag == 1, provider_id, assigned_id, seq)


_AAD_JSON_FIELDS = {
    "type": unmarshal_string,
    "direction": unmarshal_string,
    "request_id": unmarshal_string,
    "stream": unmarshal_bool,
    "provider_id": unmarshal_string,
    "assigned_id": unmarshal_string,
    "seq": unmarshal_uint64,
}


def decode_aad(encoded: str) -> tuple[AAD, bytes]:
    """``DecodeAEADAAD``: the binary form, or the legacy JSON form."""
    try:
        raw = decode_raw_url_base64(encoded)
    except ValueError as exc:
        raise Tier2Error(f"invalid pillar B AAD: {exc}") from None
    if raw.startswith(AAD_PREFIX):
        return _parse_binary_aad(raw), raw
    try:
        fields = decode_struct(gojson.loads(raw), _AAD_JSON_FIELDS, "AEADFrameAAD")
    except GoJSONError as exc:
        raise Tier2Error(f"invalid pillar B AAD JSON: {exc}") from None
    defaults: dict[str, Any] = dict.fromkeys(
        ("type", "direction", "request_id", "provider_id", "assigned_id"), ""
    )
    defaults.update(stream=False, seq=0)
    return AAD(**{**defaults, **fields}), raw


def nonce(nonce_base: bytes, seq: int) -> bytes:
    """``nonce_base (4 bytes) || u64be(seq)``."""
    if len(nonce_base) != 4:
        raise Tier2Error("pillar B nonce base must be 4 bytes")
    return nonce_base + struct.pack(">Q", seq)


def seal(key: bytes, nonce_base: bytes, kid: str, aad: AAD, plaintext: bytes) -> dict[str, Any]:
    """``SealPillarBFrame``: the ``enc`` object of an encrypted frame."""
    iv = nonce(nonce_base, aad.seq)
    aad_raw = aad.marshal()
    sealed = AESGCM(key).encrypt(iv, plaintext, aad_raw)
    return {
        "alg": A256GCM,
        "seq": aad.seq,
        "nonce": b64url(iv),
        "aad": b64url(aad_raw),
        "ciphertext": b64url(sealed[:-16]),
        "tag": b64url(sealed[-16:]),
        "kid": kid,
    }


def open_frame(
    key: bytes, nonce_base: bytes, kid: str, expected: AAD, encrypted: bool, enc: AEADBody
) -> bytes:
    """``OpenPillarBFrame``: the plaintext, or :class:`Tier2Error`."""
    if not encrypted:
        raise Tier2Error("frame is not encrypted")
    if enc.alg != A256GCM:
        raise Tier2Error("pillar B unsupported AEAD algorithm")
    if enc.kid != kid:
        raise Tier2Error("pillar B key id mismatch")
    if enc.seq != expected.seq:
        raise Tier2Error("pillar B sequence mismatch")
    iv = nonce(nonce_base, expected.seq)
    try:
        got_nonce = decode_raw_url_base64(enc.nonce)
    except ValueError as exc:
        raise Tier2Error(f"invalid pillar B nonce: {exc}") from None
    if got_nonce != iv:
        raise Tier2Error("pillar B nonce mismatch")
    decoded, aad_raw = decode_aad(enc.aad)
    if aad_raw != expected.marshal() and (aad_raw.startswith(AAD_PREFIX) or decoded != expected):
        raise Tier2Error("pillar B AAD mismatch")
    try:
        ciphertext = decode_raw_url_base64(enc.ciphertext)
        tag = decode_raw_url_base64(enc.tag)
    except ValueError as exc:
        raise Tier2Error(f"invalid pillar B ciphertext or tag: {exc}") from None
    if len(tag) != 16:
        raise Tier2Error("pillar B tag must be 16 bytes")
    try:
        return AESGCM(key).decrypt(iv, ciphertext + tag, aad_raw)
    except InvalidTag:
        raise Tier2Error("cipher: message authentication failed") from None


# ---------------------------------------------------------------------------
# One epoch of a session (pool.Tier2Session plus the p2c replay window)


@dataclass(slots=True)
class Epoch:
    """The encrypted leg's state for one key epoch of a session."""

    keys: Keys
    response_chunk_plaintext_envelope: bool
    in_band_rekey: bool
    started_at: float
    c2p_counter: int = 0
    p2c_counter: int = 0
    p2c_seen: set[int] = field(default_factory=set)
    requests_dispatched: int = 0

    @property
    def kid(self) -> str:
        return self.keys.kid

    def seal_c2p(self, aad: AAD, plaintext: bytes) -> dict[str, Any]:
        """Seal with the next c2p sequence number (``aad.seq`` is ignored)."""
        if self.c2p_counter == SEQ_EXHAUSTED:
            raise Tier2Error("tier2 c2p frame counter exhausted")
        bound = AAD(
            aad.type,
            "c2p",
            aad.request_id,
            aad.stream,
            aad.provider_id,
            aad.assigned_id,
            self.c2p_counter,
        )
        enc = seal(self.keys.c2p_key, self.keys.c2p_nonce_base, self.kid, bound, plaintext)
        self.c2p_counter += 1
        return enc

    def check_p2c(self, seq: int) -> None:
        """Refuse a p2c sequence outside the window or already seen."""
        if seq == SEQ_EXHAUSTED:
            raise Tier2Error("tier2 p2c frame counter exhausted")
        if seq > self.p2c_counter and seq - self.p2c_counter > P2C_WINDOW:
            raise Tier2Error("tier2 p2c frame sequence outside receive window")
        if seq < self.p2c_counter or seq in self.p2c_seen:
            raise Tier2Error("tier2 p2c frame replayed")

    def mark_p2c(self, seq: int) -> None:
        """Record ``seq`` as used; the contiguous counter moves past seen numbers."""
        if seq == self.p2c_counter:
            self.p2c_counter += 1
            while self.p2c_counter in self.p2c_seen:
                self.p2c_seen.discard(self.p2c_counter)
                self.p2c_counter += 1
            return
        if seq > self.p2c_counter:
            self.p2c_seen.add(seq)

    def open_p2c(self, expected: AAD, encrypted: bool, enc: AEADBody) -> bytes:
        """Check the window, open, then mark the sequence as used."""
        self.check_p2c(expected.seq)
        plaintext = open_frame(
            self.keys.p2c_key, self.keys.p2c_nonce_base, self.kid, expected, encrypted, enc
        )
        self.mark_p2c(expected.seq)
        return plaintext


# ---------------------------------------------------------------------------
# Ed25519 (identity signatures, receipts, the catalog feed)


def ed25519_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Pure Ed25519 over ``message`` (Go's ``ed25519.Verify``)."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def receipt_key_id(public_key: bytes) -> str:
    """``ed25519-sha256:<hex sha256 of the raw key>`` (``billing.ReceiptKeyID``)."""
    if len(public_key) != 32:
        raise ValueError(f"receipt pubkey length={len(public_key)} want 32")
    return "ed25519-sha256:" + hashlib.sha256(public_key).hexdigest()
