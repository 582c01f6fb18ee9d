"""The encrypted leg of protocol v2 ("tier 2, pillar B"): keys, AAD, envelopes, counters.

Pure: no sockets, no clock except what the caller passes. The layout is the
coordinator's (``internal/tier2/pillar_b.go``) byte for byte:

- key agreement: X25519 between the provider's per-connection key and the
  coordinator's; both travel as base64url without padding;
- transcript ``T = SHA256("macprovider/spec008/pillar-b/transcript/v1" ||
  field("provider_id") || field("assigned_id") || field("provider_public") ||
  field("coordinator_public") || field("selected_aead"))`` where
  ``field(label, value) = u32be(len label) label u32be(len value) value``;
- HKDF-SHA256 (salt ``T``, input the shared secret) expands four outputs: the
  c2p and p2c AES-256 keys and the two 4-byte nonce bases;
- ``kid = base64url(SHA256(T)[:16])``, which the coordinator also sends in
  ``auth_challenge.key_id`` and ``auth_response``: a mismatch means the two
  sides derived different keys;
- each frame: AES-256-GCM, nonce ``nonce_base || u64be(seq)``, AAD
  ``"macprovider/spec008/pillar-b/aad/v1\\0" || lenstr(type) ||
  lenstr(direction) || lenstr(request_id) || stream byte || lenstr(provider_id)
  || lenstr(assigned_id) || u64be(seq)`` with ``lenstr(x) = u32be(len x) x``;
- envelope ``enc``: ``{alg, seq, nonce, aad, ciphertext, tag, kid}``, bytes as
  base64url without padding.

One counter per direction for the whole session, starting at 0. We seal p2c
frames in order; c2p frames are accepted out of order within a window of
:data:`RECEIVE_WINDOW` (the coordinator may seal two requests and write them
in the other order) and never twice.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import re
import struct
from dataclasses import dataclass, field

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "AAD_PREFIX",
    "AEAD_SUITE",
    "RECEIVE_WINDOW",
    "AeadError",
    "Envelope",
    "LegKeys",
    "ReplayWindow",
    "aad",
    "b64url",
    "b64url_decode",
    "derive_keys",
    "generate_key",
    "nonce",
    "open_frame",
    "public_bytes",
    "seal_frame",
    "shared_secret",
    "transcript",
]

AEAD_SUITE = "A256GCM"
TRANSCRIPT_PREFIX = b"macprovider/spec008/pillar-b/transcript/v1"
AAD_PREFIX = b"macprovider/spec008/pillar-b/aad/v1\x00"
_INFO_C2P_KEY = b"macprovider/spec008/c2p/aead/v1"
_INFO_P2C_KEY = b"macprovider/spec008/p2c/aead/v1"
_INFO_C2P_NONCE = b"macprovider/spec008/c2p/nonce/v1"
_INFO_P2C_NONCE = b"macprovider/spec008/p2c/nonce/v1"

#: How far ahead of the lowest unseen sequence number a received frame may be
#: (the coordinator's bound for our frames, used for its frames too).
RECEIVE_WINDOW = 4096
_U64_MAX = 2**64 - 1


class AeadError(Exception):
    """A frame that does not open: wrong key id, sequence, nonce, AAD, tag, or a replay."""


# --------------------------------------------------------------------------
# Encodings


def b64url(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_B64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")


def b64url_decode(text: str) -> bytes:
    """Decode base64url with or without padding; AeadError when it is not."""
    if not isinstance(text, str) or not _B64URL.fullmatch(text):
        raise AeadError("not base64url")
    text = text.rstrip("=")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise AeadError("not base64url") from None


# --------------------------------------------------------------------------
# Keys


def generate_key() -> X25519PrivateKey:
    """A fresh X25519 key (one per connection, and one per rekey)."""
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def shared_secret(key: X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519 with the peer's raw 32-byte public key; AeadError for a bad key."""
    if len(peer_public) != 32:
        raise AeadError("an X25519 public key is 32 bytes")
    try:
        return key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # a low-order point gives an all-zero secret
        raise AeadError(f"X25519 exchange failed: {exc}") from None


def _field(label: bytes, value: bytes) -> bytes:
    return struct.pack(">I", len(label)) + label + struct.pack(">I", len(value)) + value


def transcript(
    provider_id: str,
    assigned_id: str,
    provider_public: bytes,
    coordinator_public: bytes,
    selected_aead: str = AEAD_SUITE,
) -> bytes:
    """The 32-byte key-derivation transcript ``T`` (the HKDF salt)."""
    digest = hashlib.sha256(TRANSCRIPT_PREFIX)
    digest.update(_field(b"provider_id", provider_id.encode()))
    digest.update(_field(b"assigned_id", assigned_id.encode()))
    digest.update(_field(b"provider_public", provider_public))
    digest.update(_field(b"coordinator_public", coordinator_public))
    digest.update(_field(b"selected_aead", selected_aead.encode()))
    return digest.digest()


@dataclass(frozen=True)
class LegKeys:
    """Everything one encrypted-leg epoch needs; never logged."""

    kid: str
    c2p_key: bytes = field(repr=False)
    p2c_key: bytes = field(repr=False)
    c2p_nonce_base: bytes = field(repr=False)
    p2c_nonce_base: bytes = field(repr=False)
    transcript: bytes = field(repr=False)


def derive_keys(
    shared: bytes,
    provider_id: str,
    assigned_id: str,
    provider_public: bytes,
    coordinator_public: bytes,
    selected_aead: str = AEAD_SUITE,
) -> LegKeys:
    """HKDF-SHA256 outputs and the key id for one session (or one rekey epoch)."""
    if selected_aead != AEAD_SUITE:
        raise AeadError(f"unsupported AEAD suite {selected_aead!r}")
    if len(shared) != 32 or len(provider_public) != 32 or len(coordinator_public) != 32:
        raise AeadError("key derivation needs 32-byte secrets and public keys")
    salt = transcript(provider_id, assigned_id, provider_public, coordinator_public, selected_aead)

    def expand(info: bytes, length: int) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(shared)

    return LegKeys(
        kid=b64url(hashlib.sha256(salt).digest()[:16]),
        c2p_key=expand(_INFO_C2P_KEY, 32),
        p2c_key=expand(_INFO_P2C_KEY, 32),
        c2p_nonce_base=expand(_INFO_C2P_NONCE, 4),
        p2c_nonce_base=expand(_INFO_P2C_NONCE, 4),
        transcript=salt,
    )


# --------------------------------------------------------------------------
# Frames


def _lenstr(value: str) -> bytes:
    raw = value.encode()
    return struct.pack(">I", len(raw)) + raw


def aad(
    kind: str,
    direction: str,
    request_id: str,
    stream: bool,
    provider_id: str,
    assigned_id: str,
    seq: int,
) -> bytes:
    """The binary AAD of one frame (``direction`` is ``c2p`` or ``p2c``)."""
    head = _aad_head(kind, direction, request_id, stream, provider_id, assigned_id)
    return head + struct.pack(">Q", seq)


@functools.lru_cache(maxsize=1024)
def _aad_head(
    kind: str, direction: str, request_id: str, stream: bool, provider_id: str, assigned_id: str
) -> bytes:
    # Everything but the sequence number: the same for every chunk of a request.
    return b"".join(
        (
            AAD_PREFIX,
            _lenstr(kind),
            _lenstr(direction),
            _lenstr(request_id),
            b"\x01" if stream else b"\x00",
            _lenstr(provider_id),
            _lenstr(assigned_id),
        )
    )


def nonce(base: bytes, seq: int) -> bytes:
    if len(base) != 4:
        raise AeadError("a nonce base is 4 bytes")
    return base + struct.pack(">Q", seq)


class Envelope(msgspec.Struct, kw_only=True):
    """The ``enc`` object of an encrypted frame."""

    alg: str
    seq: int
    nonce: str
    aad: str
    ciphertext: str
    tag: str
    kid: str


def seal_frame(
    cipher: AESGCM, nonce_base: bytes, kid: str, seq: int, frame_aad: bytes, plaintext: bytes
) -> Envelope:
    """Encrypt one frame with its sequence number and AAD."""
    if not 0 <= seq < _U64_MAX:
        raise AeadError("frame counter exhausted")
    iv = nonce(nonce_base, seq)
    sealed = cipher.encrypt(iv, plaintext, frame_aad)
    return Envelope(
        alg=AEAD_SUITE,
        seq=seq,
        nonce=b64url(iv),
        aad=b64url(frame_aad),
        ciphertext=b64url(sealed[:-16]),
        tag=b64url(sealed[-16:]),
        kid=kid,
    )


def open_frame(
    cipher: AESGCM, nonce_base: bytes, kid: str, envelope: Envelope, expected_aad: bytes
) -> bytes:
    """Decrypt one frame whose AAD must be ``expected_aad`` (built with ``envelope.seq``).

    Checks, in the coordinator's order: algorithm, key id, nonce, AAD, tag.
    """
    if envelope.alg != AEAD_SUITE:
        raise AeadError(f"unsupported AEAD algorithm {envelope.alg!r}")
    if envelope.kid != kid:
        raise AeadError("key id mismatch")
    if not 0 <= envelope.seq < _U64_MAX:
        raise AeadError("sequence number out of range")
    iv = nonce(nonce_base, envelope.seq)
    if b64url_decode(envelope.nonce) != iv:
        raise AeadError("nonce mismatch")
    if b64url_decode(envelope.aad) != expected_aad:
        raise AeadError("AAD mismatch")
    ciphertext = b64url_decode(envelope.ciphertext)
    tag = b64url_decode(envelope.tag)
    if len(tag) != 16:
        raise AeadError("tag is not 16 bytes")
    try:
        return cipher.decrypt(iv, ciphertext + tag, expected_aad)
    except InvalidTag:
        raise AeadError("authentication failed") from None


class ReplayWindow:
    """Sequence numbers seen in one direction: each once, within the window.

    ``next`` is the lowest number not yet seen; numbers below it or already
    seen are replays; more than :data:`RECEIVE_WINDOW` above it is out of
    the window (the coordinator's rule for the frames we send it).
    """

    def __init__(self, start: int = 0) -> None:
        self.next = start
        self._ahead: set[int] = set()

    def check(self, seq: int) -> None:
        """Raise AeadError if ``seq`` must not be opened."""
        if seq < self.next or seq in self._ahead:
            raise AeadError(f"frame {seq} replayed")
        if seq - self.next > RECEIVE_WINDOW:
            raise AeadError(f"frame {seq} is outside the receive window (next {self.next})")

    def mark(self, seq: int) -> None:
        """Record ``seq`` as opened (call only after it authenticated)."""
        if seq == self.next:
            self.next += 1
            while self.next in self._ahead:
                self._ahead.discard(self.next)
                self.next += 1
        elif seq > self.next:
            self._ahead.add(seq)


# --------------------------------------------------------------------------
# One session's leg


class ChunkPlaintext(msgspec.Struct, tag_field="type", tag="inference_response_chunk_plaintext"):
    """A chunk's plaintext when ``response_chunk_plaintext_envelope`` was negotiated."""

    seq: int
    data: str


_chunk_encoder = msgspec.json.Encoder()


class EncryptedLeg:
    """The encrypted leg of one session: keys, both counters, the negotiated options.

    ``seal`` assigns the next p2c sequence number, so frames must be sealed
    in the order they are written (the one writer does). ``open`` checks the
    c2p window before decrypting and records the number only once the frame
    authenticated, so a forged frame cannot burn a sequence number.
    """

    def __init__(
        self,
        keys: LegKeys,
        provider_id: str,
        assigned_id: str,
        *,
        chunk_envelope: bool = False,
        in_band_rekey: bool = False,
        rekey_after_requests: int = 0,
        rekey_after_seconds: float = 0.0,
        started_at: float = 0.0,
    ) -> None:
        self.provider_id = provider_id
        self.assigned_id = assigned_id
        self.chunk_envelope = chunk_envelope
        self.in_band_rekey = in_band_rekey
        self.rekey_after_requests = rekey_after_requests
        self.rekey_after_seconds = rekey_after_seconds
        self._install(keys, p2c_next=0, c2p_next=0, started_at=started_at)

    def _install(self, keys: LegKeys, *, p2c_next: int, c2p_next: int, started_at: float) -> None:
        self.keys = keys
        self._p2c = AESGCM(keys.p2c_key)
        self._c2p = AESGCM(keys.c2p_key)
        self.p2c_next = p2c_next
        self.c2p_window = ReplayWindow(c2p_next)
        self.requests = 0
        self.started_at = started_at

    @property
    def kid(self) -> str:
        return self.keys.kid

    def seal(self, kind: str, request_id: str, stream: bool, plaintext: bytes) -> Envelope:
        """Seal one provider -> coordinator frame with the next sequence number."""
        seq = self.p2c_next
        frame_aad = aad(kind, "p2c", request_id, stream, self.provider_id, self.assigned_id, seq)
        envelope = seal_frame(
            self._p2c, self.keys.p2c_nonce_base, self.kid, seq, frame_aad, plaintext
        )
        self.p2c_next = seq + 1
        return envelope

    def chunk_plaintext(self, seq: int, data: str) -> bytes:
        """What a chunk's ciphertext holds: the JSON envelope, or the raw data."""
        if self.chunk_envelope:
            return _chunk_encoder.encode(ChunkPlaintext(seq=seq, data=data))
        return data.encode()

    def open(self, kind: str, request_id: str, stream: bool, envelope: Envelope) -> bytes:
        """Open one coordinator -> provider frame; AeadError if it must be refused."""
        self.c2p_window.check(envelope.seq)
        frame_aad = aad(
            kind, "c2p", request_id, stream, self.provider_id, self.assigned_id, envelope.seq
        )
        plaintext = open_frame(self._c2p, self.keys.c2p_nonce_base, self.kid, envelope, frame_aad)
        self.c2p_window.mark(envelope.seq)
        if kind == "inference_request":
            self.requests += 1
        return plaintext

    def due_for_rekey(self, now: float) -> bool:
        """True once either rekey threshold of ``auth_response`` is reached."""
        by_count = 0 < self.rekey_after_requests <= self.requests
        by_age = self.rekey_after_seconds > 0 and now - self.started_at >= self.rekey_after_seconds
        return by_count or by_age

    def adopt(self, pending: PendingRekey, started_at: float) -> None:
        """Switch to the committed epoch: seq 0 was the commit, so both counters go on at 1."""
        self._install(pending.keys, p2c_next=1, c2p_next=1, started_at=started_at)


@dataclass
class PendingRekey:
    """An in-band rekey between our ``aead_rekey_response`` and the coordinator's commit."""

    rekey_id: str
    old_kid: str
    keys: LegKeys
    provider_public: str
    coordinator_public: str
    selected_aead: str
    expires_at: str

    def open_commit(self, provider_id: str, assigned_id: str, envelope: Envelope) -> bytes:
        """Open ``aead_rekey_commit`` (new c2p key, seq 0); returns the proof bytes."""
        if envelope.seq != 0:
            raise AeadError("a rekey commit is sealed at seq 0")
        frame_aad = aad(
            "aead_rekey_commit", "c2p", self.rekey_id, False, provider_id, assigned_id, 0
        )
        cipher = AESGCM(self.keys.c2p_key)
        return open_frame(cipher, self.keys.c2p_nonce_base, self.keys.kid, envelope, frame_aad)

    def check_proof(self, proof: bytes, provider_id: str, assigned_id: str) -> None:
        """The commit's proof must name exactly this exchange; AeadError if not."""
        try:
            fields = msgspec.json.decode(proof)
        except msgspec.DecodeError:
            raise AeadError("rekey proof is not JSON") from None
        expected = {
            "type": "aead_rekey_proof",
            "version": 1,
            "rekey_id": self.rekey_id,
            "provider_id": provider_id,
            "assigned_id": assigned_id,
            "old_kid": self.old_kid,
            "new_kid": self.keys.kid,
            "provider_ecdh_public_key": self.provider_public,
            "coordinator_ecdh_public_key": self.coordinator_public,
            "selected_aead": self.selected_aead,
            "expires_at": self.expires_at,
        }
        if not isinstance(fields, dict):
            raise AeadError("rekey proof is not an object")
        for key, value in expected.items():
            if fields.get(key) != value:
                raise AeadError(f"rekey proof {key} does not match the exchange")

    def seal_committed(self, provider_id: str, assigned_id: str, proof: bytes) -> Envelope:
        """Seal the exact proof bytes back (new p2c key, seq 0) for ``aead_rekey_committed``."""
        frame_aad = aad(
            "aead_rekey_committed", "p2c", self.rekey_id, False, provider_id, assigned_id, 0
        )
        cipher = AESGCM(self.keys.p2c_key)
        return seal_frame(cipher, self.keys.p2c_nonce_base, self.keys.kid, 0, frame_aad, proof)


def start_rekey(
    leg: EncryptedLeg,
    *,
    rekey_id: str,
    old_kid: str,
    coordinator_public: str,
    selected_aead: str,
    expires_at: str,
    key: X25519PrivateKey | None = None,
) -> PendingRekey:
    """Derive the next epoch's keys from a fresh X25519 key (``aead_rekey_request``).

    Raises AeadError when the request does not fit this leg (another key
    id, another suite, a bad public key).
    """
    if old_kid != leg.kid:
        raise AeadError("rekey request names another key id")
    key = key or generate_key()
    coordinator_raw = b64url_decode(coordinator_public)
    provider_raw = public_bytes(key)
    keys = derive_keys(
        shared_secret(key, coordinator_raw),
        leg.provider_id,
        leg.assigned_id,
        provider_raw,
        coordinator_raw,
        selected_aead,
    )
    return PendingRekey(
        rekey_id=rekey_id,
        old_kid=old_kid,
        keys=keys,
        provider_public=b64url(provider_raw),
        coordinator_public=coordinator_public,
        selected_aead=selected_aead,
        expires_at=expires_at,
    )
