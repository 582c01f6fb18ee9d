# ruff: noqa: E501  (vectors copied verbatim, one per line)
"""Known-answer tests of the stub's pure code: manifests, JCS, the encrypted leg, receipts.

Vectors come from COORDINATOR.md, the Go tests (``internal/tier2``,
``internal/billing``, ``internal/versionfloor``, ``internal/modelidentity``)
and the shared fixture ``testdata/spec015/v04_settlement_receipts.json``.
Where the Go tests assert properties rather than values, the expected bytes
are computed here by a second implementation (RFC 7748 X25519 and RFC 5869
HKDF written out with the standard library).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from coordinator_stub import jcs, manifest, rules, settlement, tier2
from coordinator_stub.frames import AEADBody
from coordinator_stub.jcs import RawJSONString

# ---------------------------------------------------------------------------
# Model identity (COORDINATOR.md 2.2)


def test_snapshot_manifest_one_file_vector(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x")
    entries = manifest.manifest_entries(tmp_path)
    assert manifest.manifest_text(entries) == (
        "a\n1\n2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881\n"
    )
    assert manifest.snapshot_manifest_v1(tmp_path) == (
        "e5a512d0669d449f2a2e5e590310e67fad7f8eceaa5887933377fc30b8e4f6fa"
    )


def test_snapshot_manifest_walks_hidden_files_and_subdirectories(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "w.safetensors").write_bytes(b"\x00" * 3)
    (tmp_path / ".gitattributes").write_bytes(b"")
    (tmp_path / "a").write_bytes(b"x")
    paths = [path for path, _, _ in manifest.manifest_entries(tmp_path)]
    assert paths == [".gitattributes", "a", "b/w.safetensors"]
    text = manifest.manifest_text(manifest.manifest_entries(tmp_path))
    assert manifest.snapshot_manifest_v1(tmp_path) == hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo"])
def test_snapshot_manifest_refuses_what_swift_refuses(tmp_path: Path, kind: str) -> None:
    (tmp_path / "a").write_bytes(b"x")
    if kind == "symlink":
        (tmp_path / "link").symlink_to(tmp_path / "a")
    elif kind == "hardlink":
        os.link(tmp_path / "a", tmp_path / "twin")
    else:
        os.mkfifo(tmp_path / "pipe")
    with pytest.raises(manifest.ManifestError):
        manifest.snapshot_manifest_v1(tmp_path)


def test_gguf_identity_is_the_file_digest(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(range(10)))
    assert manifest.model_identity(path) == (
        "macprovider.gguf-file.v1",
        hashlib.sha256(path.read_bytes()).hexdigest(),
    )


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("a" * 64, True),
        ("0123456789abcdef" * 4, True),
        ("A" * 64, False),  # uppercase
        ("a" * 63, False),
        ("a" * 65, False),
        (" " + "a" * 64, False),  # no trimming
        ("a" * 64 + "\n", False),
        ("g" * 64, False),
        ("", False),
    ],
)
def test_valid_sha256(value: str, valid: bool) -> None:
    assert rules.valid_sha256(value) is valid


# ---------------------------------------------------------------------------
# Version floor (versionfloor_test.go)


@pytest.mark.parametrize(
    ("lhs", "rhs", "expected"),
    [
        ("1.8.33", "1.8.33", 0),
        ("1.8.34", "1.8.33", 1),
        ("1.8.9", "1.8.33", -1),
        ("v1.8.33", "1.8.33", 0),
        ("V2", "1.99.99", 1),
        ("1.8", "1.8.0", 0),
        ("1.10.0", "1.9.9", 1),
        ("1.8.33-rc1", "1.8.33", None),
        ("1.8.33+build", "1.8.33", None),
        ("1.2.3.4", "1.2.3", None),
        ("", "1.0.0", None),
        ("x.y.z", "1.0.0", None),
    ],
)
def test_version_compare(lhs: str, rhs: str, expected: int | None) -> None:
    assert rules.compare_versions(lhs, rhs) == expected


def test_floor_refuses_unparseable_and_older_versions() -> None:
    assert rules.below_floor("0.1.0", "1.8.33")
    assert rules.below_floor("dev", "1.8.33")
    assert not rules.below_floor("1.8.33", "1.8.33")
    assert not rules.below_floor("1.8.123", "1.8.33")


# ---------------------------------------------------------------------------
# JCS (billing/jcs.go)


def test_jcs_sorts_by_utf16_and_escapes_like_go() -> None:
    value = {
        "b": "tab\there\u0001\u001f\u007f\u2028 <&> / é",
        "a": [1, True, None, "x"],
        "\ufffd": 1,
        "\U0001f600": 2,  # UTF-16 D83D... sorts before U+FFFD
        "é": "e\u0301",  # NFC-normalised value
    }
    expected = (
        '{"a":[1,true,null,"x"],'
        '"b":"tab\\there\\u0001\\u001f\u007f\u2028 <&> / é",'
        '"é":"é",'
        '"\U0001f600":2,'
        '"\ufffd":1}'
    )
    assert jcs.canonical(value) == expected.encode()


def test_jcs_raw_json_string_is_not_normalised() -> None:
    decomposed = "Cafe\u0301"
    assert jcs.canonical(RawJSONString(decomposed)) == f'"{decomposed}"'.encode()
    assert jcs.canonical(decomposed) == '"Café"'.encode()


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        (0.0, "0"),
        (-0.0, "0"),
        (1.5, "1.5"),
        (1e21, "1e+21"),
        (1e-7, "1e-7"),
        (123456789012345680000.0, "123456789012345680000"),
        (0.000001, "0.000001"),
    ],
)
def test_jcs_numbers_are_ecmascript(number: float, expected: str) -> None:
    assert jcs.canonical(number).decode() == expected


# ---------------------------------------------------------------------------
# The encrypted leg (pillar_b.go, COORDINATOR.md 7.1)

_P = 2**255 - 19


def _x25519(scalar: bytes, u_bytes: bytes) -> bytes:
    """RFC 7748 X25519, written out (the test's own implementation)."""
    k = bytearray(scalar)
    k[0] &= 248
    k[31] &= 127
    k[31] |= 64
    n = int.from_bytes(k, "little")
    u = int.from_bytes(u_bytes, "little") & ((1 << 255) - 1)
    x1, x2, z2, x3, z3, swap = u, 1, 0, u, 1, 0
    for t in reversed(range(255)):
        bit = (n >> t) & 1
        swap ^= bit
        if swap:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b = (x2 + z2) % _P, (x2 - z2) % _P
        aa, bb = a * a % _P, b * b % _P
        e = (aa - bb) % _P
        c, d = (x3 + z3) % _P, (x3 - z3) % _P
        da, cb = d * a % _P, c * b % _P
        x3 = (da + cb) ** 2 % _P
        z3 = x1 * (da - cb) ** 2 % _P
        x2 = aa * bb % _P
        z2 = e * (aa + 121665 * e) % _P
    if swap:
        x2, z2 = x3, z3
    return (x2 * pow(z2, _P - 2, _P) % _P).to_bytes(32, "little")


def _hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def _framed(label: str, value: bytes) -> bytes:
    return len(label).to_bytes(4, "big") + label.encode() + len(value).to_bytes(4, "big") + value


def test_x25519_rfc7748_vector_against_the_test_implementation() -> None:
    # RFC 7748 section 5.2, first vector: checks the second implementation itself.
    scalar = bytes.fromhex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
    u = bytes.fromhex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
    assert _x25519(scalar, u).hex() == (
        "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"
    )


def test_key_derivation_for_the_go_test_inputs() -> None:
    # TestPillarBKeyDerivationIsDeterministic's inputs, outputs from the spec.
    shared, provider_pub, coordinator_pub = b"\x11" * 32, b"\x22" * 32, b"\x33" * 32
    keys = tier2.derive_from_shared(
        shared, "provider-a", "session-a", provider_pub, coordinator_pub
    )
    transcript = hashlib.sha256(
        b"macprovider/spec008/pillar-b/transcript/v1"
        + _framed("provider_id", b"provider-a")
        + _framed("assigned_id", b"session-a")
        + _framed("provider_public", provider_pub)
        + _framed("coordinator_public", coordinator_pub)
        + _framed("selected_aead", b"A256GCM")
    ).digest()
    assert keys.transcript == transcript
    assert keys.c2p_key == _hkdf(transcript, shared, b"macprovider/spec008/c2p/aead/v1", 32)
    assert keys.p2c_key == _hkdf(transcript, shared, b"macprovider/spec008/p2c/aead/v1", 32)
    assert keys.c2p_nonce_base == _hkdf(transcript, shared, b"macprovider/spec008/c2p/nonce/v1", 4)
    assert keys.p2c_nonce_base == _hkdf(transcript, shared, b"macprovider/spec008/p2c/nonce/v1", 4)
    kid = base64.urlsafe_b64encode(hashlib.sha256(transcript).digest()[:16]).rstrip(b"=")
    assert keys.kid == kid.decode() and "=" not in keys.kid
    assert keys.c2p_key != keys.p2c_key
    with pytest.raises(tier2.Tier2Error):
        tier2.derive_from_shared(
            shared[:31], "provider-a", "session-a", provider_pub, coordinator_pub
        )


#: The kid of :func:`test_key_agreement_with_fixed_private_keys` (both implementations).
KID_FIXED_KEYS = "2NDptjIaKOQSmmKLGo08gg"


def test_key_agreement_with_fixed_private_keys() -> None:
    provider_private = bytes(range(32))
    coordinator_private = bytes(range(32, 64))
    base = (9).to_bytes(32, "little")
    provider_public = _x25519(provider_private, base)
    coordinator_public = _x25519(coordinator_private, base)
    shared = _x25519(provider_private, coordinator_public)
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    assigned = "11111111-2222-3333-4444-555555555555"
    key = tier2.CoordinatorKey(X25519PrivateKey.from_private_bytes(coordinator_private))
    assert key.public == coordinator_public
    keys = key.derive(provider_public, "p1", assigned)
    transcript = hashlib.sha256(
        b"macprovider/spec008/pillar-b/transcript/v1"
        + _framed("provider_id", b"p1")
        + _framed("assigned_id", assigned.encode())
        + _framed("provider_public", provider_public)
        + _framed("coordinator_public", coordinator_public)
        + _framed("selected_aead", b"A256GCM")
    ).digest()
    assert keys.c2p_key == _hkdf(transcript, shared, b"macprovider/spec008/c2p/aead/v1", 32)
    assert keys.p2c_nonce_base == _hkdf(transcript, shared, b"macprovider/spec008/p2c/nonce/v1", 4)
    kid = base64.urlsafe_b64encode(hashlib.sha256(transcript).digest()[:16]).rstrip(b"=")
    assert keys.kid == kid.decode() == KID_FIXED_KEYS


def test_aad_byte_layout() -> None:
    aad = tier2.AAD("inference_response_chunk", "p2c", "req-1", True, "p1", "sess", 258)
    expected = (
        b"macprovider/spec008/pillar-b/aad/v1\x00"
        + struct.pack(">I", 24)
        + b"inference_response_chunk"
        + struct.pack(">I", 3)
        + b"p2c"
        + struct.pack(">I", 5)
        + b"req-1"
        + b"\x01"
        + struct.pack(">I", 2)
        + b"p1"
        + struct.pack(">I", 4)
        + b"sess"
        + b"\x00\x00\x00\x00\x00\x00\x01\x02"
    )
    assert aad.marshal() == expected
    decoded, raw = tier2.decode_aad(base64.urlsafe_b64encode(expected).rstrip(b"=").decode())
    assert decoded == aad and raw == expected
    assert tier2.nonce(b"\x01\x02\x03\x04", 7) == b"\x01\x02\x03\x04" + (7).to_bytes(8, "big")


def test_frame_round_trip_and_tamper_rejection() -> None:
    # TestPillarBAEADFrameRoundTripAndTamperRejection, plus the exact ciphertext.
    key, nonce_base = b"\x41" * 32, bytes([1, 2, 3, 4])
    aad = tier2.AAD("chat_request", "c2p", "req-1", True, "provider-a", "session-a", 7)
    plaintext = b'{"model":"model-a","messages":[{"role":"user","content":"secret"}]}'
    enc = tier2.seal(key, nonce_base, "kid-1", aad, plaintext)
    sealed = AESGCM(key).encrypt(nonce_base + (7).to_bytes(8, "big"), plaintext, aad.marshal())
    assert enc["ciphertext"] == base64.urlsafe_b64encode(sealed[:-16]).rstrip(b"=").decode()
    assert enc["tag"] == base64.urlsafe_b64encode(sealed[-16:]).rstrip(b"=").decode()
    assert (enc["alg"], enc["kid"], enc["seq"]) == ("A256GCM", "kid-1", 7)
    body = AEADBody(**enc)
    assert tier2.open_frame(key, nonce_base, "kid-1", aad, True, body) == plaintext
    wrong_seq = tier2.AAD("chat_request", "c2p", "req-1", True, "provider-a", "session-a", 8)
    with pytest.raises(tier2.Tier2Error):
        tier2.open_frame(key, nonce_base, "kid-1", wrong_seq, True, body)
    tampered = AEADBody(**{**enc, "tag": base64.urlsafe_b64encode(bytes(16)).rstrip(b"=").decode()})
    with pytest.raises(tier2.Tier2Error):
        tier2.open_frame(key, nonce_base, "kid-1", aad, True, tampered)
    with pytest.raises(tier2.Tier2Error):
        tier2.open_frame(key, nonce_base, "kid-2", aad, True, body)


def test_p2c_window_accepts_out_of_order_and_refuses_replays() -> None:
    keys = tier2.derive_from_shared(b"\x11" * 32, "p", "a", b"\x22" * 32, b"\x33" * 32)
    epoch = tier2.Epoch(keys, False, False, 0.0)

    def frame(seq: int) -> tuple[tier2.AAD, AEADBody]:
        aad = tier2.AAD("inference_response_chunk", "p2c", "r", False, "p", "a", seq)
        return aad, AEADBody(**tier2.seal(keys.p2c_key, keys.p2c_nonce_base, keys.kid, aad, b"x"))

    for seq in (1, 0, 4096):
        assert epoch.open_p2c(*frame(seq)[:1], True, frame(seq)[1]) == b"x"
    assert epoch.p2c_counter == 2 and epoch.p2c_seen == {4096}
    for seq in (0, 1, 4096):  # replays
        aad, body = frame(seq)
        with pytest.raises(tier2.Tier2Error, match="replayed"):
            epoch.open_p2c(aad, True, body)
    aad, body = frame(2 + tier2.P2C_WINDOW + 1)
    with pytest.raises(tier2.Tier2Error, match="window"):
        epoch.open_p2c(aad, True, body)


# ---------------------------------------------------------------------------
# Settlement (testdata/spec015/v04_settlement_receipts.json)

FIXTURE_PUBKEY = base64.b64decode("A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=")
FIXTURE_KEY_ID = "ed25519-sha256:56475aa75463474c0285df5dbf2bcab73da651358839e9b77481b2eab107708c"


@pytest.mark.parametrize(
    ("content", "finish", "start", "end", "state", "tool_calls", "sha256"),
    [
        ("", "stop", 0, 0, "normal_done", (), "80d91b27441b392460ec11bf47003e526525c582f40b7b32e05bd09ae4953981"),
        ("Final answer.", "stop", 0, 13, "normal_done", (), "4cfc13ae12c1a1ee4446c2927d6975e0b4b8ff77fd894a60569af151f3a2bdd9"),
        ("Streaming answer.", "stop", 0, 17, "normal_done", (), "1d2fdd775b82a9d2ee0606195d741468c9e3d7ff7a1991e370859a4a47946c58"),
        (
            "Use <tag>& Café.", "tool_calls", 13, 30, "normal_done",
            (settlement.ToolCall("call_1", "function", "lookup", '{"query":"<tag>& Cafe\u0301"}'),),
            "e9556ec858078c95388681b39a15aa3e57e657d0831ab1148d267dfbf34ac830",
        ),
        ("Final answer.", None, 0, 13, "upstream_transport_disconnect", (), "ca68aca25618c09d1c1c49f7dc3deb88b9ea3fd35a4f47fcc51d77f6713db167"),
        ("", None, 0, 0, "provider_error", (), "7d9cae58c417d22280fad8fb571ee48a3a469676ea3ac8574a580747654856bd"),
        ("partial", None, 0, 7, "provider_error", (), "db40f0fbe13257918d46f81b0a6039f85f4009b8ad11b3f55e323a63495851ba"),
        ("cancelled prefix", None, 0, 16, "buyer_cancel", (), "2b95dd19723677671469f99b582ca91965f9e2d6d22659de983853e73de2b3fa"),
        ("timeout prefix", None, 0, 14, "gateway_timeout", (), "4065aa1d6f149d6888b3e3cc54dce098fa53fb3ba6e6c61dfac984a7979cf419"),
        ("edge \U0001f9ea\u2028\u2029\u0001", None, 0, 16, "provider_error", (), "b3c901ce42c46d2e0bc6652039d38cca873efa1463ec54f71e5ead9e2b914780"),
    ],
)  # fmt: skip
def test_settlement_output_vectors(
    content: str,
    finish: str | None,
    start: int,
    end: int,
    state: str,
    tool_calls: tuple[settlement.ToolCall, ...],
    sha256: str,
) -> None:
    output = settlement.Output(
        content=content,
        finish_reason=finish,
        available=True,
        output_prefix_start_byte=start,
        output_prefix_end_byte=end,
        terminal_state=state,
        tool_calls=tool_calls,
    )
    assert output.digest() == sha256


def test_usage_vector() -> None:
    usage = {
        "billable_input_tokens": 8,
        "billable_output_tokens": 4,
        "delivered_output_bytes": 13,
        "observed_input_tokens": 8,
        "observed_output_tokens": 4,
    }
    assert jcs.canonical_sha256_hex(usage) == (
        "6b0043019ad11c343aebfc1e05ea3c5694c20ef6a3b2438535b3a9e8fba7b265"
    )


def _fixture_route(request_id: str) -> settlement.RouteSnapshot:
    return settlement.RouteSnapshot(
        account_scope="acct_scope_test_001",
        request_id=request_id,
        attempt_n=0,
        provider_id="provider-mac-001",
        provider_session_id="session-spec015-v04",
        provider_generation_id="generation-42",
        paid_entrypoint="openai-chat-completions",
        provider_receipt_key_id=FIXTURE_KEY_ID,
        provider_receipt_key_source="auth_session",
        model_id="mlx-community/Qwen3-32B-4bit",
        provider_reported_model_hash="2" * 64,
        expected_catalog_model_hash="2" * 64,
        catalog_id="catalog-2026-06-30T00:00:00Z",
        catalog_body_digest="3" * 64,
        catalog_signature_key_id="catalog-key-2026-06",
        catalog_signature_pubkey_fingerprint="ed25519-sha256:" + "4" * 64,
        catalog_expires_at_unix_ms=1782950400000,
        spec008_hash_status="verified",
        route_snapshot_policy_version="spec022-policy-v1",
        route_snapshot_mode="observe",
        route_decision_ts_unix_ms=1782864000123,
        request_start_ts_unix_ms=1782864000456,
        pending_deadline_seconds=90,
        prompt_hash_basis="coordinator-openai-chat-v1",
        prompt_hash="1" * 64,
    )


@pytest.mark.parametrize(
    ("request_id", "digest"),
    [
        ("req_spec015_v04_chain_0001", "cea961907471041ea7f77ce80db94f7fa0d2986863a5104a2ea427aa4a913369"),
        ("req_spec015_v04_provider_error_empty", "8bdeb94be45709c22b7a136bb4a7f3069b77f59ffbb74ea2847ce98c6eaa0a52"),
        ("req_spec015_v04_provider_error_prefix", "50ae031d83398585d796c3ba462f31192660db77c44687ef4f6ce57b40a8835a"),
        ("req_spec015_v04_gateway_timeout_empty", "c553cf2e5e2ad30a66c9d8f480d42f71d765256d4b865dc7403eeec6c9e0c549"),
        ("req_spec015_v04_gateway_timeout_prefix", "38e767477d453d59a1af7ffed2c9fb180ec96c94d10d1016122e9b1e06f98b34"),
    ],
)  # fmt: skip
def test_route_snapshot_vectors(request_id: str, digest: str) -> None:
    snapshot = _fixture_route(request_id)
    assert len(snapshot.value()) == 25
    assert snapshot.digest() == digest


def test_receipt_key_id_vector() -> None:
    assert tier2.receipt_key_id(FIXTURE_PUBKEY) == FIXTURE_KEY_ID


WIRE_TIMEOUT_PREFIX = (
    "eyJhY2NvdW50X3Njb3BlIjoiYWNjdF9zY29wZV90ZXN0XzAwMSIsImF0dGVtcHRfbiI6MCwiY2F0YWxvZ19ib2R5X2RpZ2VzdCI6IjMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMiLCJjYXRhbG9nX2lkIjoiY2F0YWxvZy0yMDI2LTA2LTMwVDAwOjAwOjAwWiIsImV4cGVjdGVkX2NhdGFsb2dfbW9kZWxfaGFzaCI6IjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIiLCJpc3N1ZWRfYXRfdW5peF9tcyI6MTc4Mjg2NDAwMTk5OSwibW9kZWxfaGFzaCI6IjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIiLCJtb2RlbF9pZCI6Im1seC1jb21tdW5pdHkvUXdlbjMtMzJCLTRiaXQiLCJvdXRwdXRfaGFzaCI6IjQwNjVhYTFkNmYxNDlkNjg4OGIzZTNjYzU0ZGNlMDk4ZmE1M2ZiM2JhNmU2YzYxZGZhYzk4NGE3OTc5Y2Y0MTkiLCJvdXRwdXRfcHJlZml4X2VuZF9ieXRlIjoxNCwib3V0cHV0X3ByZWZpeF9zdGFydF9ieXRlIjowLCJwcm9tcHRfaGFzaCI6IjExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTEiLCJwcm92aWRlcl9pZCI6InByb3ZpZGVyLW1hYy0wMDEiLCJwcm92aWRlcl9yZWNlaXB0X2tleV9pZCI6ImVkMjU1MTktc2hhMjU2OjU2NDc1YWE3NTQ2MzQ3NGMwMjg1ZGY1ZGJmMmJjYWI3M2RhNjUxMzU4ODM5ZTliNzc0ODFiMmVhYjEwNzcwOGMiLCJyZWNlaXB0X3ZlcnNpb24iOiI0IiwicmVxdWVzdF9pZCI6InJlcV9zcGVjMDE1X3YwNF9nYXRld2F5X3RpbWVvdXRfcHJlZml4Iiwicm91dGVfc25hcHNob3RfZGlnZXN0IjoiMzhlNzY3NDc3ZDQ1M2Q1OWExYWY3ZmZlZDJjOWZiMTgwZWM5NmM5NGQxMGQxMDE2MTIyZTliMWUwNmY5OGIzNCIsInJvdXRlX3NuYXBzaG90X21vZGUiOiJvYnNlcnZlIiwicm91dGVfc25hcHNob3RfcG9saWN5X3ZlcnNpb24iOiJzcGVjMDIyLXBvbGljeS12MSIsInNpZ25hdHVyZV9rZXlfYWxnIjoiRWQyNTUxOSIsInRlcm1pbmFsX3N0YXRlIjoiZ2F0ZXdheV90aW1lb3V0IiwidGVybWluYWxfc3RhdGVfdHNfdW5peF9tcyI6MTc4Mjg2NDAwMTc4OSwidXNhZ2UiOnsiYmlsbGFibGVfaW5wdXRfdG9rZW5zIjo4LCJiaWxsYWJsZV9vdXRwdXRfdG9rZW5zIjoyLCJkZWxpdmVyZWRfb3V0cHV0X2J5dGVzIjoxNCwib2JzZXJ2ZWRfaW5wdXRfdG9rZW5zIjo4LCJvYnNlcnZlZF9vdXRwdXRfdG9rZW5zIjo0fX0="
    ".kUJ6q66FlLDbAVGRdpgnFKhYingWMq1TaK0p0B3YqqGVekjZfgtfvOmmcUfMu8GjxEqizdoOG1GSXoVgFlQcBA=="
)
WIRE_TIMEOUT_EMPTY = (
    "eyJhY2NvdW50X3Njb3BlIjoiYWNjdF9zY29wZV90ZXN0XzAwMSIsImF0dGVtcHRfbiI6MCwiY2F0YWxvZ19ib2R5X2RpZ2VzdCI6IjMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMiLCJjYXRhbG9nX2lkIjoiY2F0YWxvZy0yMDI2LTA2LTMwVDAwOjAwOjAwWiIsImV4cGVjdGVkX2NhdGFsb2dfbW9kZWxfaGFzaCI6IjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIiLCJpc3N1ZWRfYXRfdW5peF9tcyI6MTc4Mjg2NDAwMTk5OSwibW9kZWxfaGFzaCI6IjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIiLCJtb2RlbF9pZCI6Im1seC1jb21tdW5pdHkvUXdlbjMtMzJCLTRiaXQiLCJvdXRwdXRfaGFzaCI6IjlkNGE2MWM3MzkwZTQ5ZmYzNzllNjdlZDdlYzgyMzZjZmM0MmU3NWM3YTA3NGIyMjk3NGE2ZmZhMDE2ZWNiMzYiLCJvdXRwdXRfcHJlZml4X2VuZF9ieXRlIjowLCJvdXRwdXRfcHJlZml4X3N0YXJ0X2J5dGUiOjAsInByb21wdF9oYXNoIjoiMTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMSIsInByb3ZpZGVyX2lkIjoicHJvdmlkZXItbWFjLTAwMSIsInByb3ZpZGVyX3JlY2VpcHRfa2V5X2lkIjoiZWQyNTUxOS1zaGEyNTY6NTY0NzVhYTc1NDYzNDc0YzAyODVkZjVkYmYyYmNhYjczZGE2NTEzNTg4MzllOWI3NzQ4MWIyZWFiMTA3NzA4YyIsInJlY2VpcHRfdmVyc2lvbiI6IjQiLCJyZXF1ZXN0X2lkIjoicmVxX3NwZWMwMTVfdjA0X2dhdGV3YXlfdGltZW91dF9lbXB0eSIsInJvdXRlX3NuYXBzaG90X2RpZ2VzdCI6ImM1NTNjZjJlNWUyYWQzMGE2NmM5ZDhmNDgwZDQyZjcxZDc2NTI1NmQ0Yjg2NWRjNzQwM2VlZWM2YzllMGM1NDkiLCJyb3V0ZV9zbmFwc2hvdF9tb2RlIjoib2JzZXJ2ZSIsInJvdXRlX3NuYXBzaG90X3BvbGljeV92ZXJzaW9uIjoic3BlYzAyMi1wb2xpY3ktdjEiLCJzaWduYXR1cmVfa2V5X2FsZyI6IkVkMjU1MTkiLCJ0ZXJtaW5hbF9zdGF0ZSI6ImdhdGV3YXlfdGltZW91dCIsInRlcm1pbmFsX3N0YXRlX3RzX3VuaXhfbXMiOjE3ODI4NjQwMDE3ODksInVzYWdlIjp7ImJpbGxhYmxlX2lucHV0X3Rva2VucyI6MCwiYmlsbGFibGVfb3V0cHV0X3Rva2VucyI6MCwiZGVsaXZlcmVkX291dHB1dF9ieXRlcyI6MCwib2JzZXJ2ZWRfaW5wdXRfdG9rZW5zIjo4LCJvYnNlcnZlZF9vdXRwdXRfdG9rZW5zIjowfX0="
    ".tbTZscam/JNjmucLjwEHSi5HhQHbbq85aiRgc70QMhY6LXe6SOzo0PCYZcnRPAzuvJlDVNOUvBrELC/Lzx+DCA=="
)
TERMINAL_MS = 1782864001789


def _verify_input(header: str, route_request_id: str, **changes: object) -> settlement.VerifyInput:
    request_id = route_request_id
    prefix = request_id.endswith("prefix")
    fields: dict[str, object] = {
        "header": header,
        "provider_receipt_pubkey": FIXTURE_PUBKEY,
        "route_snapshot": _fixture_route(request_id),
        "account_scope": "acct_scope_test_001",
        "request_id": request_id,
        "attempt_n": 0,
        "provider_id": "provider-mac-001",
        "provider_receipt_key_id": FIXTURE_KEY_ID,
        "terminal_state": "gateway_timeout",
        "terminal_state_ts_unix_ms": TERMINAL_MS,
        "output_hash": (
            "4065aa1d6f149d6888b3e3cc54dce098fa53fb3ba6e6c61dfac984a7979cf419"
            if prefix
            else "9d4a61c7390e49ff379e67ed7ec8236cfc42e75c7a074b22974a6ffa016ecb36"
        ),
        "output_prefix_start_byte": 0,
        "output_prefix_end_byte": 14 if prefix else 0,
        "expected_usage": settlement.Usage(8, 2, 14, 8, 4)
        if prefix
        else settlement.Usage(0, 0, 0, 8, 0),
        "receipt_received_unix_ms": TERMINAL_MS + 250,
    }
    fields.update(changes)
    return settlement.VerifyInput(**fields)  # type: ignore[arg-type]


def test_fixture_receipts_verify() -> None:
    result = settlement.verify_receipt(
        _verify_input(WIRE_TIMEOUT_PREFIX, "req_spec015_v04_gateway_timeout_prefix")
    )
    assert (result.outcome, result.reason) == ("verified", "verified_settlement")
    assert all(result.checks.values())
    result = settlement.verify_receipt(
        _verify_input(WIRE_TIMEOUT_EMPTY, "req_spec015_v04_gateway_timeout_empty")
    )
    assert (result.outcome, result.reason) == ("zero_settled", "verified_zero_settlement")


def _retupled(header: str, transform: object) -> str:
    raw, signature = header.split(".")
    data = base64.b64decode(raw)
    return base64.b64encode(transform(data)).decode() + "." + signature  # type: ignore[operator]


@pytest.mark.parametrize(
    ("mutate", "changes", "reason"),
    [
        (lambda h: h[:-6] + "AAAA==", {}, "signature_verify_failed"),
        (lambda h: _retupled(h, lambda d: d.replace(b'{"account', b'{ "account')), {}, "non_canonical_tuple"),
        (lambda h: _retupled(h, lambda d: d.replace(b'"4"', b'"3"')), {}, "not_settlement_capable"),
        (lambda h: _retupled(h, lambda d: d.replace(b'"4"', b'"9"')), {}, "unknown_receipt_version"),
        (lambda h: _retupled(h, lambda d: d.replace(b'"attempt_n":0', b'"attempt_n":0.0')), {}, "tuple_type_invalid"),
        (lambda h: _retupled(h, lambda d: d.replace(b'"usage"', b'"usagf"')), {}, "tuple_shape_invalid"),
        (lambda h: "no-dot-here", {}, "receipt_envelope_invalid"),
        (lambda h: h, {"output_hash": "0" * 64}, "output_hash_mismatch"),
        (lambda h: h, {"terminal_state": "normal_done"}, "terminal_state_mismatch"),
        (lambda h: h, {"terminal_state_ts_unix_ms": TERMINAL_MS + 1}, "terminal_state_timestamp_mismatch"),
        (lambda h: h, {"expected_usage": settlement.Usage(8, 4, 14, 8, 4)}, "usage_mismatch"),
        (lambda h: h, {"provider_receipt_pubkey": b"\x01" * 32}, "provider_receipt_key_id_mismatch"),
        (lambda h: h, {"receipt_received_unix_ms": TERMINAL_MS + 90_001}, "receipt_after_deadline"),
        (lambda h: h, {"request_id": "other"}, "request_id_mismatch"),
    ],
)  # fmt: skip
def test_receipt_failures_name_the_go_reason(mutate: object, changes: dict, reason: str) -> None:
    header = mutate(WIRE_TIMEOUT_PREFIX)  # type: ignore[operator]
    result = settlement.verify_receipt(
        _verify_input(header, "req_spec015_v04_gateway_timeout_prefix", **changes)
    )
    assert not result.ok and result.reason == reason


def test_prompt_hash_is_the_coordinator_canonical_object() -> None:
    body = '{"model":"m","messages":[{"role":"user","content":"a\\r\\nb"}],"max_tokens":2}'
    expected = jcs.canonical_sha256_hex(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "a\nb", "name": None, "tool_call_id": None,
                 "tool_calls": None}
            ],
            "tools": None,
            **dict.fromkeys(
                ("temperature", "top_p", "stop", "seed", "response_format", "tool_choice",
                 "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
                 "top_logprobs", "n"),
            ),
            "max_tokens": 2,
        }
    )  # fmt: skip
    assert settlement.prompt_hash(body) == expected


def test_stream_tracker_follows_split_lines_and_tool_calls() -> None:
    tracker = settlement.OutputTracker()
    events = (
        'data: {"choices":[{"delta":{"role":"assistant","content":"Use "}}]}\n\n'
        'data: {"choices":[{"delta":{"content":"<tag>& Cafe\u0301."}}]}\n\n'
        'data: {"choices":[{"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function",'
        '"function":{"name":"lookup","arguments":"{\\"query\\":"}}]}}]}\n\n'
        'data: {"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":'
        '"\\"<tag>& Cafe\u0301\\"}"}}]},"finish_reason":"tool_calls"}]}\n\n'
        "data: [DONE]\n\n"
    )
    for cut in range(0, len(events), 7):
        tracker.feed(events[cut : cut + 7])
    assert tracker.error is None and tracker.done
    output = tracker.output("normal_done", 1)
    assert output.content == "Use <tag>& Café."
    assert output.tool_calls == (
        settlement.ToolCall("call_1", "function", "lookup", '{"query":"<tag>& Cafe\u0301"}'),
    )
    assert output.output_prefix_end_byte == 17  # "Use <tag>& Café." in UTF-8
