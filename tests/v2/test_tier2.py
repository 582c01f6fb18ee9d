"""The encrypted leg's key schedule, AAD layout, envelopes and counters.

The coordinator's Go tests (internal/tier2/pillar_b_test.go) hold no fixed
outputs, so the derivation is checked against a second implementation
written here from the spec with hmac and hashlib (RFC 5869 by hand), and the
AAD against bytes spelled out in the test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from provider.coordinator import tier2

SHARED = b"\x11" * 32
PROVIDER_PUB = b"\x22" * 32
COORDINATOR_PUB = b"\x33" * 32


def _hkdf(salt: bytes, ikm: bytes, info: bytes, n: int) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()[:n]


def _spec_transcript(pid: str, aid: str, ppub: bytes, cpub: bytes, aead: str) -> bytes:
    def field(label: bytes, value: bytes) -> bytes:
        return len(label).to_bytes(4, "big") + label + len(value).to_bytes(4, "big") + value

    return hashlib.sha256(
        b"macprovider/spec008/pillar-b/transcript/v1"
        + field(b"provider_id", pid.encode())
        + field(b"assigned_id", aid.encode())
        + field(b"provider_public", ppub)
        + field(b"coordinator_public", cpub)
        + field(b"selected_aead", aead.encode())
    ).digest()


def test_key_schedule_matches_an_independent_implementation() -> None:
    keys = tier2.derive_keys(SHARED, "provider-a", "session-a", PROVIDER_PUB, COORDINATOR_PUB)
    t = _spec_transcript("provider-a", "session-a", PROVIDER_PUB, COORDINATOR_PUB, "A256GCM")
    assert keys.transcript == t
    assert keys.c2p_key == _hkdf(t, SHARED, b"macprovider/spec008/c2p/aead/v1", 32)
    assert keys.p2c_key == _hkdf(t, SHARED, b"macprovider/spec008/p2c/aead/v1", 32)
    assert keys.c2p_nonce_base == _hkdf(t, SHARED, b"macprovider/spec008/c2p/nonce/v1", 4)
    assert keys.p2c_nonce_base == _hkdf(t, SHARED, b"macprovider/spec008/p2c/nonce/v1", 4)
    kid = base64.urlsafe_b64encode(hashlib.sha256(t).digest()[:16]).rstrip(b"=").decode()
    assert keys.kid == kid and "=" not in kid and len(kid) == 22
    # pillar_b_test.go: deterministic, directional keys differ, short secrets refused.
    again = tier2.derive_keys(SHARED, "provider-a", "session-a", PROVIDER_PUB, COORDINATOR_PUB)
    assert again == keys and keys.c2p_key != keys.p2c_key
    with pytest.raises(tier2.AeadError):
        tier2.derive_keys(SHARED[:31], "provider-a", "session-a", PROVIDER_PUB, COORDINATOR_PUB)
    with pytest.raises(tier2.AeadError):
        tier2.derive_keys(SHARED, "p", "s", PROVIDER_PUB, COORDINATOR_PUB, "A128GCM")
    # Every input is bound: another session id gives another key id.
    other = tier2.derive_keys(SHARED, "provider-a", "session-b", PROVIDER_PUB, COORDINATOR_PUB)
    assert other.kid != keys.kid


def test_x25519_agreement_both_sides() -> None:
    provider, coordinator = tier2.generate_key(), tier2.generate_key()
    ppub, cpub = tier2.public_bytes(provider), tier2.public_bytes(coordinator)
    assert tier2.shared_secret(provider, cpub) == tier2.shared_secret(coordinator, ppub)
    with pytest.raises(tier2.AeadError):
        tier2.shared_secret(provider, b"\x00" * 32)  # low-order point
    with pytest.raises(tier2.AeadError):
        tier2.shared_secret(provider, b"short")


def test_aad_byte_layout() -> None:
    got = tier2.aad("inference_response_chunk", "p2c", "req-1", True, "prov", "sess", 7)
    want = (
        b"macprovider/spec008/pillar-b/aad/v1\x00"
        + b"\x00\x00\x00\x18inference_response_chunk"
        + b"\x00\x00\x00\x03p2c"
        + b"\x00\x00\x00\x05req-1"
        + b"\x01"
        + b"\x00\x00\x00\x04prov"
        + b"\x00\x00\x00\x04sess"
        + b"\x00\x00\x00\x00\x00\x00\x00\x07"
    )
    assert got == want
    unicode_id = tier2.aad("t", "c2p", "r\u00e9", False, "", "", 2**40)
    assert b"\x00\x00\x00\x03r\xc3\xa9\x00" in unicode_id  # length in bytes, stream byte 0
    assert unicode_id.endswith(struct.pack(">Q", 2**40))


def test_seal_open_round_trip_and_tamper_rejection() -> None:
    # pillar_b_test.go TestPillarBAEADFrameRoundTripAndTamperRejection, with the binary AAD.
    key, base = b"\x41" * 32, bytes([1, 2, 3, 4])
    cipher = AESGCM(key)
    frame_aad = tier2.aad("chat_request", "c2p", "req-1", True, "provider-a", "session-a", 7)
    plaintext = b'{"model":"model-a","messages":[{"role":"user","content":"secret"}]}'
    env = tier2.seal_frame(cipher, base, "kid-1", 7, frame_aad, plaintext)
    assert env.kid == "kid-1" and env.seq == 7 and env.alg == "A256GCM"
    assert tier2.b64url_decode(env.nonce) == base + (7).to_bytes(8, "big")
    assert b"secret" not in (env.ciphertext + env.tag).encode()
    assert tier2.open_frame(cipher, base, "kid-1", env, frame_aad) == plaintext
    # The AES-GCM output is the standard one: ciphertext || 16-byte tag.
    raw = tier2.b64url_decode(env.ciphertext) + tier2.b64url_decode(env.tag)
    assert AESGCM(key).decrypt(base + (7).to_bytes(8, "big"), raw, frame_aad) == plaintext
    other_seq = tier2.aad("chat_request", "c2p", "req-1", True, "provider-a", "session-a", 8)
    with pytest.raises(tier2.AeadError, match="AAD"):
        tier2.open_frame(cipher, base, "kid-1", env, other_seq)
    for change in (
        {"tag": tier2.b64url(b"\x00" * 16)},
        {"kid": "kid-2"},
        {"seq": 8},
        {"alg": "A128GCM"},
        {"ciphertext": tier2.b64url(b"x" * len(plaintext))},
    ):
        bad = tier2.Envelope(**({f: getattr(env, f) for f in env.__struct_fields__} | change))
        with pytest.raises(tier2.AeadError):
            tier2.open_frame(cipher, base, "kid-1", bad, frame_aad)


def test_replay_window() -> None:
    window = tier2.ReplayWindow()
    for seq in (0, 2, 1):  # out of order within the window is fine
        window.check(seq)
        window.mark(seq)
    assert window.next == 3
    for replay in (0, 1, 2):
        with pytest.raises(tier2.AeadError, match="replayed"):
            window.check(replay)
    window.check(3 + tier2.RECEIVE_WINDOW)
    with pytest.raises(tier2.AeadError, match="window"):
        window.check(4 + tier2.RECEIVE_WINDOW)
    window.mark(10)
    with pytest.raises(tier2.AeadError, match="replayed"):
        window.check(10)


def _pair() -> tuple[tier2.EncryptedLeg, tier2.LegKeys]:
    keys = tier2.derive_keys(SHARED, "prov", "sess", PROVIDER_PUB, COORDINATOR_PUB)
    return tier2.EncryptedLeg(keys, "prov", "sess", chunk_envelope=True), keys


def test_leg_counts_and_refuses_forgeries_without_burning_a_number() -> None:
    leg, keys = _pair()
    c2p = AESGCM(keys.c2p_key)

    def request(seq: int, key: AESGCM = c2p) -> tier2.Envelope:
        a = tier2.aad("inference_request", "c2p", "r", False, "prov", "sess", seq)
        return tier2.seal_frame(key, keys.c2p_nonce_base, keys.kid, seq, a, b"{}")

    forged = request(0, AESGCM(b"\x00" * 32))
    with pytest.raises(tier2.AeadError):
        leg.open("inference_request", "r", False, forged)
    assert leg.open("inference_request", "r", False, request(0)) == b"{}"
    with pytest.raises(tier2.AeadError, match="replayed"):
        leg.open("inference_request", "r", False, request(0))
    assert leg.requests == 1
    first = leg.seal("inference_response_chunk", "r", False, leg.chunk_plaintext(0, "hi"))
    second = leg.seal("inference_response_end", "r", False, b"{}")
    assert (first.seq, second.seq, leg.p2c_next) == (0, 1, 2)
    p2c = AESGCM(keys.p2c_key)
    a = tier2.aad("inference_response_chunk", "p2c", "r", False, "prov", "sess", 0)
    body = tier2.open_frame(p2c, keys.p2c_nonce_base, keys.kid, first, a)
    assert body == b'{"type":"inference_response_chunk_plaintext","seq":0,"data":"hi"}'


def test_rekey_commit_round_trip() -> None:
    leg, _ = _pair()
    coordinator = tier2.generate_key()
    cpub = tier2.b64url(tier2.public_bytes(coordinator))
    pending = tier2.start_rekey(
        leg,
        rekey_id="rk-1",
        old_kid=leg.kid,
        coordinator_public=cpub,
        selected_aead="A256GCM",
        expires_at="2030-01-01T00:00:00Z",
    )
    # The coordinator's side, from the provider's new public key.
    ppub = tier2.b64url_decode(pending.provider_public)
    shared = tier2.shared_secret(coordinator, ppub)
    theirs = tier2.derive_keys(shared, "prov", "sess", ppub, tier2.public_bytes(coordinator))
    assert theirs.kid == pending.keys.kid != leg.kid
    proof = (
        b'{"type":"aead_rekey_proof","version":1,"rekey_id":"rk-1","provider_id":"prov",'
        b'"assigned_id":"sess","old_kid":"' + leg.kid.encode() + b'","new_kid":"'
        + theirs.kid.encode() + b'","provider_ecdh_public_key":"' + pending.provider_public.encode()
        + b'","coordinator_ecdh_public_key":"' + cpub.encode()
        + b'","selected_aead":"A256GCM","expires_at":"2030-01-01T00:00:00Z"}'
    )  # fmt: skip
    commit_aad = tier2.aad("aead_rekey_commit", "c2p", "rk-1", False, "prov", "sess", 0)
    commit = tier2.seal_frame(
        AESGCM(theirs.c2p_key), theirs.c2p_nonce_base, theirs.kid, 0, commit_aad, proof
    )
    opened = pending.open_commit("prov", "sess", commit)
    pending.check_proof(opened, "prov", "sess")
    committed = pending.seal_committed("prov", "sess", opened)
    back_aad = tier2.aad("aead_rekey_committed", "p2c", "rk-1", False, "prov", "sess", 0)
    assert (
        tier2.open_frame(
            AESGCM(theirs.p2c_key), theirs.p2c_nonce_base, theirs.kid, committed, back_aad
        )
        == proof
    )
    leg.adopt(pending, started_at=1.0)
    assert leg.kid == theirs.kid and leg.p2c_next == 1 and leg.c2p_window.next == 1
    with pytest.raises(tier2.AeadError, match="rekey_id"):
        pending.check_proof(proof.replace(b"rk-1", b"rk-2"), "prov", "sess")
    with pytest.raises(tier2.AeadError):
        tier2.start_rekey(
            leg, rekey_id="x", old_kid="stale", coordinator_public=cpub,
            selected_aead="A256GCM", expires_at="",
        )  # fmt: skip


def test_rekey_thresholds() -> None:
    leg, _ = _pair()
    leg.rekey_after_requests, leg.rekey_after_seconds = 2, 100.0
    assert not leg.due_for_rekey(50.0)
    assert leg.due_for_rekey(100.0)
    leg.requests = 2
    assert leg.due_for_rekey(0.0)


def test_base64url_strictness() -> None:
    assert tier2.b64url_decode("AAE") == b"\x00\x01"
    assert tier2.b64url_decode("AAE=") == b"\x00\x01"
    for bad in ("AA+E", "A/AE", "A E", "AAE==="):
        with pytest.raises(tier2.AeadError):
            tier2.b64url_decode(bad)
