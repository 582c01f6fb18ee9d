"""Provider frames as the coordinator parses them (pure).

Every parser is a port of the Go code (``internal/ws/messages.go`` for
``ParseHello``, ``ParseAuthRequest``, ``ParseHeartbeat``,
``ParseStateUpdate``, ``ParsePreflightAck``, ``ParseDrainStatus``,
``ParseNak``, ``ParseDiagnosticStatus`` and ``ParseIdlePrewarmEvent``;
``internal/ws/relay.go`` for response chunks, end frames and the rekey
replies), with Go's JSON rules (:mod:`coordinator_stub.gojson`): required
fields, integer strictness (``0.0`` in an ``int`` field is an error), byte
limits, control characters, enums and both-or-none pairs. A parser returns a
frozen record whose attributes carry the wire names, or raises
:class:`FrameError` naming the field the way Go reports it (``"missing
version"``, ``"hostname"``, ...). What the coordinator then does with a
failure differs per message; the endpoint decides that, not this module.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any, Final

from . import gojson
from .gojson import (
    ABSENT,
    GoJSONError,
    GoObject,
    decode_struct,
    pointer,
    unmarshal_bool,
    unmarshal_float,
    unmarshal_int,
    unmarshal_string,
    unmarshal_strings,
    unmarshal_uint64,
)
from .rules import (
    RUNTIME_SOURCES,
    SAFETENSORS_MANIFEST_V1,
    canonical_algorithm,
    contains_control_char,
    normalize_supported_model,
    valid_provider_id,
    valid_sha256,
)

MAX_HOSTNAME_BYTES: Final = 253
MAX_MODEL_ID_BYTES: Final = 256
MAX_BINARY_VERSION_BYTES: Final = 32
MAX_METADATA_BYTES: Final = 1024
MAX_REFERRAL_CODE_BYTES: Final = 256
MAX_SUPPORTED_MODELS: Final = 64
MAX_RELAY_BLIND_RECORDS: Final = 8
MAX_DIAGNOSTIC_BYTES: Final = 8192
MAX_EVENT_OBJECT_BYTES: Final = 4096

#: Longest close reason a close frame can carry, in bytes.
MAX_CLOSE_REASON: Final = 123

PREFLIGHT_REJECTION_REASONS: Final = frozenset(
    {
        "context_exceeds_capacity",
        "queue_full",
        "draining",
        "model_not_loaded",
        "unhealthy",
        "tier_mismatch",
    }
)
DRAIN_PHASES: Final = frozenset({"starting", "in_progress", "complete", "timeout_skipped"})
IDLE_PREWARM_EVENTS: Final = frozenset(
    {
        "idle_prewarm_fired",
        "idle_prewarm_completed",
        "idle_prewarm_skipped",
        "idle_prewarm_cancelled_by_real_request",
        "idle_prewarm_failed",
    }
)
IDLE_PREWARM_REASONS: Final = frozenset(
    {"disabled", "busy", "not_idle_yet", "thermal_pressure", "on_battery", "model_not_loaded"}
)

#: Initial-stage ``auth_request`` failures the coordinator answers with an
#: ``auth_response`` ``bad_request`` and close 4001 naming them (SPEC-010);
#: every other initial parse failure closes 4000.
SUPPORTED_MODELS_FIELDS: Final = frozenset(
    {
        "supported_models must be array of strings",
        "supported_models cannot be empty",
        "supported_models entry exceeds 256 bytes",
        "supported_models exceeds 64 entries",
        "supported_models contains duplicate entries",
        "model_id not in supported_models",
    }
)

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})"
)


def close_reason(text: str) -> str:
    """``text`` cut to fit a close frame (123 bytes, whole characters)."""
    return text.encode()[:MAX_CLOSE_REASON].decode(errors="ignore")


class FrameError(Exception):
    """A frame the coordinator's parser refuses; ``field`` is Go's bad-field label."""

    def __init__(self, field: str, message: str = "") -> None:
        super().__init__(f"{field}: {message}" if message else field)
        self.field = field
        self.message = message or field


class Refusal(Exception):
    """A handshake the coordinator closes the connection for."""

    def __init__(self, code: int, reason: str, provider_id: str | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.provider_id = provider_id


def parse_rfc3339(value: str, *, nano: bool = True) -> bool:
    """Whether Go's ``time.Parse(time.RFC3339[Nano], value)`` accepts ``value``."""
    match = _RFC3339.fullmatch(value)
    if match is None:
        return False
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    if not (1 <= month <= 12 and hour < 24 and minute < 60 and second < 60):
        return False
    days = [31, 29 if (year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)) else 28]
    days += [31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
    if not 1 <= day <= days[month - 1]:
        return False
    zone = match.group(8)
    return zone == "Z" or (int(zone[1:3]) < 24 and int(zone[4:6]) < 60)


def decode_std_base64(value: str) -> bytes:
    """Go's ``base64.StdEncoding.DecodeString``: padded; CR and LF are skipped."""
    cleaned = value.replace("\r", "").replace("\n", "")
    try:
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"illegal base64 data: {exc}") from None


def decode_raw_url_base64(value: str) -> bytes:
    """Go's ``base64.RawURLEncoding.DecodeString``: no padding, URL alphabet."""
    cleaned = value.replace("\r", "").replace("\n", "")
    if "=" in cleaned or not re.fullmatch(r"[A-Za-z0-9_-]*", cleaned) or len(cleaned) % 4 == 1:
        raise ValueError("illegal base64 data")
    try:
        return base64.urlsafe_b64decode(cleaned + "=" * (-len(cleaned) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"illegal base64 data: {exc}") from None


# ---------------------------------------------------------------------------
# map[string]json.RawMessage helpers (the handshake parsers)


def _object(payload: str | bytes) -> tuple[GoObject, str]:
    try:
        value = gojson.loads(payload)
    except GoJSONError as exc:
        raise FrameError("json", str(exc)) from None
    if value is None:
        return GoObject([]), ""
    if not isinstance(value, GoObject):
        raise FrameError("json", f"cannot unmarshal {gojson.type_name(value)} into map")
    text = payload if isinstance(payload, str) else payload.decode()
    return value, text


def _require_string(raw: GoObject, name: str) -> str:
    if name not in raw:
        raise FrameError("missing " + name)
    try:
        value = unmarshal_string(raw[name])
    except GoJSONError as exc:
        raise FrameError(name, str(exc)) from None
    if value is ABSENT or value == "" or contains_control_char(value):  # type: ignore[operator]
        raise FrameError(name)
    return value  # type: ignore[return-value]


def _require_int(raw: GoObject, name: str) -> int:
    if name not in raw:
        raise FrameError("missing " + name)
    try:
        value = unmarshal_int(raw[name])
    except GoJSONError as exc:
        raise FrameError(name, str(exc)) from None
    return 0 if value is ABSENT else value  # type: ignore[return-value]


def _require_float(raw: GoObject, name: str) -> float:
    if name not in raw:
        raise FrameError("missing " + name)
    try:
        value = unmarshal_float(raw[name])
    except GoJSONError as exc:
        raise FrameError(name, str(exc)) from None
    return 0.0 if value is ABSENT else value  # type: ignore[return-value]


def _require_bool(raw: GoObject, name: str) -> bool:
    if name not in raw:
        raise FrameError("missing " + name)
    if raw[name] is None:
        raise FrameError(name)
    try:
        return bool(unmarshal_bool(raw[name]))
    except GoJSONError as exc:
        raise FrameError(name, str(exc)) from None


def _require_auth_version(raw: GoObject) -> int:
    if "version" not in raw:
        raise FrameError("missing version")
    value = raw["version"]
    try:
        number = unmarshal_int(value)
        return 0 if number is ABSENT else number  # type: ignore[return-value]
    except GoJSONError:
        pass
    if not isinstance(value, str) or not value:
        raise FrameError("version")
    if not re.fullmatch(r"[+-]?[0-9]+", value) or not (
        gojson.INT64_MIN <= int(value) <= gojson.INT64_MAX
    ):
        raise FrameError("version")
    return int(value)


def _optional_string(raw: GoObject, name: str, *, control: bool = True) -> str | None:
    """An optional string member: absent or ``null`` is ``None``."""
    value = raw.get(name)
    if value is None:
        return None
    try:
        decoded = unmarshal_string(value)
    except GoJSONError as exc:
        raise FrameError(name, str(exc)) from None
    assert isinstance(decoded, str)
    if control and contains_control_char(decoded):
        raise FrameError(name)
    return decoded


def _optional_bool_strict(raw: GoObject, name: str) -> bool:
    """Present means a bool; ``null`` is an error (``credential_bootstrap`` and kin)."""
    if name not in raw:
        return False
    value = raw[name]
    if not isinstance(value, bool):
        raise FrameError(name, f"{name} must be a bool")
    return value


def _identity_string(raw: GoObject, name: str) -> tuple[bool, str]:
    """``parseOptionalIdentityString``: present means a 1..128 byte clean string."""
    if name not in raw:
        return False, ""
    value = raw[name]
    if value is None:
        raise FrameError(name, f"{name} must be a string")
    try:
        decoded = unmarshal_string(value)
    except GoJSONError as exc:
        raise FrameError(name, str(exc)) from None
    assert isinstance(decoded, str)
    if not decoded or len(decoded.encode()) > 128 or contains_control_char(decoded):
        raise FrameError(name, f"{name} must be a non-empty string of at most 128 bytes")
    return True, decoded


def _runtime_source(raw: GoObject) -> str:
    value = raw.get("runtime_source")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise FrameError("runtime_source", "runtime_source must be a string")
    if value not in RUNTIME_SOURCES:
        raise FrameError("runtime_source", "runtime_source is not a recognized adapter source")
    return value


def _model_hash(raw: GoObject) -> str:
    value = _optional_string(raw, "model_hash", control=False)
    if value is None:
        return ""
    if contains_control_char(value):
        raise FrameError("model_hash")
    return value


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """``model_hash`` and the optional algorithm and weights pair."""

    model_hash: str = ""
    model_hash_algorithm: str = ""
    weights_manifest_sha256: str = ""
    weights_manifest_algorithm: str = ""


def _model_identity(raw: GoObject, model_hash: str) -> ModelIdentity:
    alg_present, algorithm = _identity_string(raw, "model_hash_algorithm")
    if alg_present and model_hash == "":
        raise FrameError("model_hash_algorithm", "model_hash_algorithm requires model_hash")
    if alg_present and not canonical_algorithm(algorithm):
        raise FrameError("model_hash_algorithm", "unsupported model_hash_algorithm")
    if alg_present and not valid_sha256(model_hash):
        raise FrameError("model_hash", "model_hash must be a lowercase SHA-256 digest")
    weights_present, weights = _identity_string(raw, "weights_manifest_sha256")
    walg_present, walg = _identity_string(raw, "weights_manifest_algorithm")
    if weights_present != walg_present:
        raise FrameError(
            "weights_manifest_algorithm",
            "weights_manifest_sha256 and weights_manifest_algorithm must be reported together",
        )
    if walg_present and walg != SAFETENSORS_MANIFEST_V1:
        raise FrameError("weights_manifest_algorithm", "unsupported weights_manifest_algorithm")
    if weights_present and not valid_sha256(weights):
        raise FrameError(
            "weights_manifest_sha256", "weights_manifest_sha256 must be a lowercase SHA-256 digest"
        )
    return ModelIdentity(model_hash, algorithm, weights, walg)


CATALOG_FIELDS: Final = (
    "catalog_release_id",
    "catalog_policy_version",
    "catalog_candidate_sha256",
    "catalog_signer_key_id",
    "catalog_row_identity",
)


def _catalog_metadata(raw: GoObject) -> dict[str, str]:
    out = {}
    for name in CATALOG_FIELDS:
        if name not in raw:
            out[name] = ""
            continue
        value = raw[name]
        if not isinstance(value, str):
            raise FrameError(name)
        decoded = gojson.text(value)
        if not decoded.strip() or contains_control_char(decoded):
            raise FrameError(name)
        if len(decoded.encode()) > MAX_METADATA_BYTES:
            raise FrameError(name, f"{name} exceeds {MAX_METADATA_BYTES} bytes")
        out[name] = decoded
    return out


def _compatibility_set_id(raw: GoObject) -> str:
    # Parsed leniently: a non-string leaves it empty; admission checks syntax.
    value = raw.get("compatibility_set_id")
    return gojson.text(value) if isinstance(value, str) else ""


def _relay_blind_key_records(raw: GoObject) -> int:
    if "relay_blind_key_records" not in raw:
        return 0
    value = raw["relay_blind_key_records"]
    if value is None:
        raise FrameError("relay_blind_key_records", "relay_blind_key_records must be an array")
    if not isinstance(value, list) or len(value) > MAX_RELAY_BLIND_RECORDS:
        raise FrameError(
            "relay_blind_key_records",
            f"relay_blind_key_records must contain at most {MAX_RELAY_BLIND_RECORDS} records",
        )
    if not all(isinstance(record, GoObject) for record in value):
        raise FrameError("relay_blind_key_records", "relay_blind_key_records must hold objects")
    return len(value)


def _referral_code(raw: GoObject) -> str:
    value = raw.get("referral_code")
    if value is None:
        return ""
    decoded = gojson.text(value) if isinstance(value, str) else None
    if (
        decoded is None
        or len(decoded.encode()) > MAX_REFERRAL_CODE_BYTES
        or contains_control_char(decoded)
    ):
        raise FrameError(
            "referral_code",
            f"referral_code must be a string of at most {MAX_REFERRAL_CODE_BYTES} bytes",
        )
    return decoded


def _bytes_limited(raw: GoObject, name: str, limit: int, *, hostname: bool = False) -> str:
    value = _require_string(raw, name)
    if len(value.encode()) > limit:
        raise FrameError(name, f"{name} exceeds {limit} bytes")
    return value


def _endpoint_url(raw: GoObject) -> str | None:
    return _optional_string(raw, "endpoint_url")


def _optional_int64(raw: GoObject, name: str) -> int:
    value = raw.get(name)
    if value is None:
        return 0
    try:
        decoded = unmarshal_int(value, "int64")
    except GoJSONError as exc:
        raise FrameError(name, str(exc)) from None
    return 0 if decoded is ABSENT else decoded  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# The first message: hello (v1) and auth_request (v2)


def parse_first(payload: str | bytes) -> tuple[str, int]:
    """``(type, version)`` of a connection's first message (``parseFirstAuthMessageWithField``).

    Raises :class:`FrameError`; the coordinator closes 4000 for any of them.
    """
    raw, _ = _object(payload)
    typ = _require_string(raw, "type")
    return typ, _require_auth_version(raw)


@dataclass(frozen=True, slots=True)
class Tier2Caps:
    """``tier2_capabilities`` of an initial ``auth_request``."""

    encrypted_leg: bool = False
    attestation: bool = False
    aead_suites: tuple[str, ...] = ()
    response_chunk_plaintext_envelope: bool = False
    in_band_aead_rekey_v1: bool = False
    trusted_pool_v1: bool = False
    catalog_material_hold_v1: bool = False


_TIER2_CAPS_FIELDS = {
    "encrypted_leg": unmarshal_bool,
    "attestation": unmarshal_bool,
    "aead_suites": unmarshal_strings,
    "response_chunk_plaintext_envelope": unmarshal_bool,
    "in_band_aead_rekey_v1": unmarshal_bool,
    "trusted_pool_v1": unmarshal_bool,
    "catalog_material_hold_v1": unmarshal_bool,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Registration:
    """A ``hello`` or an initial ``auth_request``: what the coordinator registers.

    For a v2 initial, the v1-only fields take Go's ``AuthRequest.Hello()``
    values (``version`` 1, ``tier`` 1).
    """

    type: str
    version: int
    tier: int
    provider_id: str
    hostname: str
    model_id: str
    runtime_source: str = ""
    model_hash: str = ""
    model_hash_algorithm: str = ""
    weights_manifest_sha256: str = ""
    weights_manifest_algorithm: str = ""
    model_params_b: float = 0.0
    ram_gb: int = 0
    max_context_tokens: int = 0
    max_concurrency: int = 0
    throughput_tps_estimate: float = 0.0
    model_load_time_ms: int = 0
    binary_version: str = ""
    attestation: str | None = None
    endpoint_url: str | None = None
    credential_bootstrap: bool = False
    referral_code: str = ""
    catalog_release_id: str = ""
    catalog_policy_version: str = ""
    catalog_candidate_sha256: str = ""
    catalog_signer_key_id: str = ""
    catalog_row_identity: str = ""
    compatibility_set_id: str = ""
    relay_blind_key_records: int = 0
    # v2 initial only
    stage: str = ""
    provider_ecdh_public_key: str = ""
    provider_receipt_public_key: bytes | None = None
    provider_admission_public_key: bytes | None = None
    provider_admission_next_public_key: bytes | None = None
    provider_admission_recovery: bool = False
    tier2_capabilities: Tier2Caps | None = None
    supported_models: tuple[str, ...] | None = None
    publishes_supported_models: bool = False
    supported_models_present: bool = False
    publishes_present: bool = False

    @property
    def catalog_metadata(self) -> tuple[str, str, str, str, str]:
        return (
            self.catalog_release_id,
            self.catalog_policy_version,
            self.catalog_signer_key_id,
            self.catalog_candidate_sha256,
            self.catalog_row_identity,
        )


def _registration_common(raw: GoObject, text: str) -> dict[str, Any]:
    """The fields ``hello`` and the initial ``auth_request`` share, in Go's order."""
    out: dict[str, Any] = {}
    out["provider_id"] = _require_string(raw, "provider_id")
    if not valid_provider_id(out["provider_id"]):
        raise FrameError("provider_id", f"invalid provider_id {out['provider_id']!r}")
    out["hostname"] = _bytes_limited(raw, "hostname", MAX_HOSTNAME_BYTES)
    out["model_id"] = _bytes_limited(raw, "model_id", MAX_MODEL_ID_BYTES)
    out["runtime_source"] = _runtime_source(raw)
    model_hash = _model_hash(raw)
    identity = _model_identity(raw, model_hash)
    out["model_hash"] = identity.model_hash
    out["model_hash_algorithm"] = identity.model_hash_algorithm
    out["weights_manifest_sha256"] = identity.weights_manifest_sha256
    out["weights_manifest_algorithm"] = identity.weights_manifest_algorithm
    out["model_params_b"] = _require_float(raw, "model_params_b")
    out["ram_gb"] = _require_int(raw, "ram_gb")
    out["max_context_tokens"] = _require_int(raw, "max_context_tokens")
    out["max_concurrency"] = _require_int(raw, "max_concurrency")
    out["throughput_tps_estimate"] = _require_float(raw, "throughput_tps_estimate")
    out["model_load_time_ms"] = _optional_int64(raw, "model_load_time_ms")
    out["binary_version"] = _bytes_limited(raw, "binary_version", MAX_BINARY_VERSION_BYTES)
    return out


def parse_hello(payload: str | bytes) -> Registration:
    """A v1 ``hello`` (``ParseHello``); the coordinator closes 4001 ``invalid_hello: <field>``."""
    raw, text = _object(payload)
    typ = _require_string(raw, "type")
    if typ != "hello":
        raise FrameError("type", f"expected hello, got {typ!r}")
    version = _require_int(raw, "version")
    tier = _require_int(raw, "tier")
    out = _registration_common(raw, text)
    attestation = None
    if "attestation" in raw:
        attestation = gojson.raw_member(text, "attestation")
        if attestation is not None and len(attestation.encode()) > MAX_METADATA_BYTES:
            raise FrameError("attestation", f"attestation exceeds {MAX_METADATA_BYTES} bytes")
    endpoint = _endpoint_url(raw)
    bootstrap = _optional_bool_strict(raw, "credential_bootstrap")
    referral = _referral_code(raw)
    catalog = _catalog_metadata(raw)
    compat = _compatibility_set_id(raw)
    records = _relay_blind_key_records(raw)
    return Registration(
        type=typ,
        version=version,
        tier=tier,
        attestation=attestation,
        endpoint_url=endpoint,
        credential_bootstrap=bootstrap,
        referral_code=referral,
        compatibility_set_id=compat,
        relay_blind_key_records=records,
        **catalog,
        **out,
    )


def _ed25519_key(raw: GoObject, name: str) -> bytes | None:
    value = raw.get(name)
    if value is None:
        return None
    try:
        encoded = unmarshal_string(value)
    except GoJSONError as exc:
        raise FrameError(name, str(exc)) from None
    assert isinstance(encoded, str)
    try:
        key = decode_std_base64(encoded)
    except ValueError as exc:
        raise FrameError(name, str(exc)) from None
    if len(key) != 32:
        raise FrameError(name, f"{name} must decode to 32 bytes")
    return key


def _supported_models_initial(raw: GoObject) -> tuple[tuple[str, ...] | None, bool]:
    if "supported_models" not in raw:
        return None, False
    message = "supported_models must be array of strings"
    value = raw["supported_models"]
    if value is None:
        raise FrameError(message)
    try:
        models = unmarshal_strings(value)
    except GoJSONError:
        raise FrameError(message) from None
    return tuple(models), True  # type: ignore[arg-type]


def _publishes(raw: GoObject) -> tuple[bool, bool]:
    if "publishes_supported_models" not in raw:
        return False, False
    value = raw["publishes_supported_models"]
    if not isinstance(value, bool):
        raise FrameError("publishes_supported_models", "publishes_supported_models must be a bool")
    return value, True


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthProof:
    """An ``auth_request`` at stage ``proof``."""

    type: str
    version: int
    stage: str
    auth_attempt_id: str
    provider_id: str
    attestation_token: str | None = None
    identity_signature: str = ""
    identity_signature_transcript_sha256: str = ""
    credential_bootstrap: bool = False
    referral_code: str = ""
    supported_models: tuple[str, ...] | None = None
    publishes_supported_models: bool = False
    supported_models_present: bool = False
    publishes_present: bool = False


def parse_auth_request(payload: str | bytes) -> Registration | AuthProof:
    """An ``auth_request`` at either stage (``ParseAuthRequest``)."""
    raw, text = _object(payload)
    typ = _require_string(raw, "type")
    if typ != "auth_request":
        raise FrameError("type", f"expected auth_request, got {typ!r}")
    version = _require_auth_version(raw)
    if version != 2:
        raise FrameError("version", f"unsupported auth_request version {version}")
    stage = _require_string(raw, "stage")
    if stage == "initial":
        return _auth_initial(raw, text, version)
    if stage == "proof":
        return _auth_proof(raw, text, version)
    raise FrameError("stage", f"unsupported auth_request stage {stage!r}")


def _auth_initial(raw: GoObject, text: str, version: int) -> Registration:
    out = _registration_common(raw, text)
    endpoint = _endpoint_url(raw)
    bootstrap = _optional_bool_strict(raw, "credential_bootstrap")
    recovery = _optional_bool_strict(raw, "provider_admission_recovery")
    referral = _referral_code(raw)
    ecdh = _require_string(raw, "provider_ecdh_public_key")
    receipt_key = _ed25519_key(raw, "provider_receipt_public_key")
    admission_key = _ed25519_key(raw, "provider_admission_public_key")
    next_key = _ed25519_key(raw, "provider_admission_next_public_key")
    if "tier2_capabilities" not in raw:
        raise FrameError("missing tier2_capabilities")
    try:
        caps = decode_struct(raw["tier2_capabilities"], _TIER2_CAPS_FIELDS, "Tier2Caps")
    except GoJSONError as exc:
        raise FrameError("tier2_capabilities", str(exc)) from None
    caps["aead_suites"] = tuple(caps.get("aead_suites") or ())
    supported, supported_present = _supported_models_initial(raw)
    publishes, publishes_present = _publishes(raw)
    if supported_present:
        assert supported is not None
        if not supported:
            raise FrameError("supported_models cannot be empty")
        if any(len(model.encode()) > 256 for model in supported):
            raise FrameError("supported_models entry exceeds 256 bytes")
        if len(supported) > MAX_SUPPORTED_MODELS:
            raise FrameError("supported_models exceeds 64 entries")
        seen: set[str] = set()
        for model in supported:
            key = normalize_supported_model(model)
            if key in seen:
                raise FrameError("supported_models contains duplicate entries")
            seen.add(key)
        if normalize_supported_model(out["model_id"]) not in seen:
            raise FrameError("model_id not in supported_models")
    catalog = _catalog_metadata(raw)
    compat = _compatibility_set_id(raw)
    records = _relay_blind_key_records(raw)
    return Registration(
        type="auth_request",
        version=version,
        tier=1,
        stage="initial",
        endpoint_url=endpoint,
        credential_bootstrap=bootstrap,
        provider_admission_recovery=recovery,
        referral_code=referral,
        provider_ecdh_public_key=ecdh,
        provider_receipt_public_key=receipt_key,
        provider_admission_public_key=admission_key,
        provider_admission_next_public_key=next_key,
        tier2_capabilities=Tier2Caps(**caps),
        supported_models=supported,
        supported_models_present=supported_present,
        publishes_supported_models=publishes,
        publishes_present=publishes_present,
        compatibility_set_id=compat,
        relay_blind_key_records=records,
        **catalog,
        **out,
    )


def _auth_proof(raw: GoObject, text: str, version: int) -> AuthProof:
    attempt = _require_string(raw, "auth_attempt_id")
    provider_id = _require_string(raw, "provider_id")
    if not valid_provider_id(provider_id):
        raise FrameError("provider_id", f"invalid provider_id {provider_id!r}")
    token = None
    if "attestation_token" in raw:
        token = gojson.raw_member(text, "attestation_token")
        if token is not None and len(token.encode()) > MAX_METADATA_BYTES:
            raise FrameError(
                "attestation_token", f"attestation_token exceeds {MAX_METADATA_BYTES} bytes"
            )
    signature = _optional_string(raw, "identity_signature", control=False) or ""
    transcript = _optional_string(raw, "identity_signature_transcript_sha256", control=False) or ""
    bootstrap = _optional_bool_strict(raw, "credential_bootstrap")
    referral = _referral_code(raw)
    supported: tuple[str, ...] | None = None
    supported_present = "supported_models" in raw
    if supported_present:
        if raw["supported_models"] is None:
            raise FrameError("supported_models", "supported_models must be an array of strings")
        try:
            supported = tuple(unmarshal_strings(raw["supported_models"]))  # type: ignore[arg-type]
        except GoJSONError as exc:
            raise FrameError("supported_models", str(exc)) from None
    publishes, publishes_present = _publishes(raw)
    _relay_blind_key_records(raw)
    return AuthProof(
        type="auth_request",
        version=version,
        stage="proof",
        auth_attempt_id=attempt,
        provider_id=provider_id,
        attestation_token=token,
        identity_signature=signature,
        identity_signature_transcript_sha256=transcript,
        credential_bootstrap=bootstrap,
        referral_code=referral,
        supported_models=supported,
        supported_models_present=supported_present,
        publishes_supported_models=publishes,
        publishes_present=publishes_present,
    )


# ---------------------------------------------------------------------------
# After registration


def envelope_type(payload: str | bytes) -> str:
    """The ``type`` by which the read loop dispatches (``struct{ Type string }``).

    Raises :class:`FrameError` when Go's envelope decode fails: such a frame
    is logged and does not even count as liveness.
    """
    try:
        value = gojson.loads(payload)
        fields = decode_struct(value, {"type": unmarshal_string}, "envelope")
    except GoJSONError as exc:
        raise FrameError("json", str(exc)) from None
    return fields.get("type", "")


@dataclass(frozen=True, slots=True)
class HardwareSummary:
    chip: str = ""
    bandwidth_gb_per_s: int = 0
    network_power_kw: float = 0.0
    gpu_cores_total: int = 0
    cpu_cores_total: int = 0


_HARDWARE_FIELDS = {
    "chip": unmarshal_string,
    "bandwidth_gb_per_s": lambda v: unmarshal_int(v, "int64"),
    "network_power_kw": unmarshal_float,
    "gpu_cores_total": unmarshal_int,
    "cpu_cores_total": unmarshal_int,
}

_TELEMETRY_REQUIRED = (
    "schema_version",
    "provider_id",
    "model_id",
    "model_loaded",
    "runtime_state",
    "hardware_tier",
    "requests_in_flight",
    "requests_queued",
    "memory_rss_mb",
    "memory_capacity_mb",
    "memory_pressure",
    "thermal_state",
    "thermally_throttled",
    "restart_count",
    "uptime_s",
    "coordinator_connected",
    "observation_id",
    "observed_at",
    "valid_for_ms",
)
_TELEMETRY_V2_REQUIRED = (
    "coordinator_session_id",
    "cpu_utilization_pct",
    "gpu_utilization_pct",
    "gpu_utilization_scope",
    "power_source",
    "binary_version",
    "compatibility_set_id",
    "model_hash",
    "model_hash_algorithm",
)
_TELEMETRY_FIELDS: dict[str, Any] = {
    "schema_version": unmarshal_int,
    "provider_id": unmarshal_string,
    "model_id": unmarshal_string,
    "model_loaded": unmarshal_bool,
    "runtime_state": unmarshal_string,
    "hardware_tier": unmarshal_string,
    "requests_in_flight": unmarshal_int,
    "requests_queued": unmarshal_int,
    "memory_rss_mb": unmarshal_int,
    "memory_capacity_mb": unmarshal_int,
    "memory_pressure": unmarshal_string,
    "thermal_state": unmarshal_string,
    "thermally_throttled": unmarshal_bool,
    "restart_count": unmarshal_int,
    "uptime_s": unmarshal_int,
    "coordinator_connected": unmarshal_bool,
    "observation_id": unmarshal_string,
    "observed_at": unmarshal_string,
    "valid_for_ms": unmarshal_int,
    "coordinator_session_id": unmarshal_string,
    "cpu_utilization_pct": pointer(unmarshal_float),
    "gpu_utilization_pct": pointer(unmarshal_float),
    "gpu_utilization_scope": unmarshal_string,
    "power_source": unmarshal_string,
    "binary_version": unmarshal_string,
    "compatibility_set_id": unmarshal_string,
    "model_hash": unmarshal_string,
    "model_hash_algorithm": unmarshal_string,
    "weights_manifest_sha256": unmarshal_string,
    "weights_manifest_algorithm": unmarshal_string,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    """A ``heartbeat`` the coordinator accepted (``ParseHeartbeat``)."""

    type: str = "heartbeat"
    status: str
    model_id: str
    model_params_b: float
    ram_gb: int
    max_context_tokens: int
    max_concurrency: int
    slots_free: int
    slots_total: int
    throughput_tps_estimate: float
    requests_served_since_last: int
    avg_latency_ms_since_last: float
    throughput_tps_since_last: float
    model_hash: str = ""
    model_hash_algorithm: str = ""
    weights_manifest_sha256: str = ""
    weights_manifest_algorithm: str = ""
    model_hash_present: bool = False
    model_hash_algorithm_present: bool = False
    loading: bool = False
    loading_present: bool = False
    last_autoupdate_event: str | None = None
    last_supervisor_event: str | None = None
    service_instance_id: str = ""
    hardware_summary: HardwareSummary | None = None
    safety_telemetry: dict[str, Any] | None = None


def parse_heartbeat(payload: str | bytes) -> Heartbeat:
    """A ``heartbeat`` (``ParseHeartbeat``); a failure drops the frame.

    A failure on ``model_hash`` or ``model_hash_algorithm`` makes the
    coordinator fence the session (close 4001 ``invalid_model_hash_identity``).
    """
    raw, text = _object(payload)
    typ = _require_string(raw, "type")
    if typ != "heartbeat":
        raise FrameError("type", f"expected heartbeat, got {typ!r}")
    out: dict[str, Any] = {}
    out["status"] = _require_string(raw, "status")
    out["model_id"] = _bytes_limited(raw, "model_id", MAX_MODEL_ID_BYTES)
    out["model_params_b"] = _require_float(raw, "model_params_b")
    for name in ("ram_gb", "max_context_tokens", "max_concurrency", "slots_free", "slots_total"):
        out[name] = _require_int(raw, name)
    out["throughput_tps_estimate"] = _require_float(raw, "throughput_tps_estimate")
    out["requests_served_since_last"] = _require_int(raw, "requests_served_since_last")
    out["avg_latency_ms_since_last"] = _require_float(raw, "avg_latency_ms_since_last")
    out["throughput_tps_since_last"] = _require_float(raw, "throughput_tps_since_last")
    hash_present = "model_hash" in raw
    model_hash = ""
    if hash_present:
        if raw["model_hash"] is None:
            raise FrameError("model_hash", "model_hash must be a string")
        model_hash = _optional_string(raw, "model_hash", control=False) or ""
        if contains_control_char(model_hash):
            raise FrameError("model_hash")
    alg_present, algorithm = _identity_string(raw, "model_hash_algorithm")
    weights_present, weights = _identity_string(raw, "weights_manifest_sha256")
    walg_present, walg = _identity_string(raw, "weights_manifest_algorithm")
    if alg_present and not hash_present:
        raise FrameError("model_hash_algorithm", "model_hash_algorithm requires model_hash")
    if alg_present and not canonical_algorithm(algorithm):
        raise FrameError("model_hash_algorithm", "unsupported model_hash_algorithm")
    if alg_present and not valid_sha256(model_hash):
        raise FrameError("model_hash", "model_hash must be a lowercase SHA-256 digest")
    if weights_present != walg_present:
        raise FrameError(
            "weights_manifest_algorithm",
            "weights_manifest_sha256 and weights_manifest_algorithm must be reported together",
        )
    if walg_present and walg != SAFETENSORS_MANIFEST_V1:
        raise FrameError("weights_manifest_algorithm", "unsupported weights_manifest_algorithm")
    if weights_present and not valid_sha256(weights):
        raise FrameError(
            "weights_manifest_sha256", "weights_manifest_sha256 must be a lowercase SHA-256 digest"
        )
    loading_present = "loading" in raw
    loading = False
    if loading_present:
        if not isinstance(raw["loading"], bool):
            raise FrameError("loading", "loading must be a bool")
        loading = raw["loading"]
    autoupdate = None
    if raw.get("last_autoupdate_event") is not None:
        autoupdate = gojson.raw_member(text, "last_autoupdate_event")
        if not _event_object(raw["last_autoupdate_event"], autoupdate):
            raise FrameError("last_autoupdate_event")
    supervisor = None
    if raw.get("last_supervisor_event") is not None:
        candidate = gojson.raw_member(text, "last_supervisor_event")
        if _event_object(raw["last_supervisor_event"], candidate):
            supervisor = candidate
    instance = ""
    sid = raw.get("service_instance_id")
    if isinstance(sid, str):
        sid = gojson.text(sid)
        if len(sid.encode()) <= 128 and not contains_control_char(sid):
            instance = sid
    hardware = _hardware_summary(raw.get("hardware_summary"))
    telemetry = None
    if raw.get("safety_telemetry") is not None:
        telemetry = _safety_telemetry(
            raw["safety_telemetry"],
            out["model_id"],
            out["status"],
            hash_present=hash_present,
            alg_present=alg_present,
            model_hash=model_hash,
            algorithm=algorithm,
            weights=(weights_present, weights, walg),
        )
    _relay_blind_key_records(raw)
    return Heartbeat(
        model_hash=model_hash,
        model_hash_algorithm=algorithm,
        weights_manifest_sha256=weights,
        weights_manifest_algorithm=walg,
        model_hash_present=hash_present,
        model_hash_algorithm_present=alg_present,
        loading=loading,
        loading_present=loading_present,
        last_autoupdate_event=autoupdate,
        last_supervisor_event=supervisor,
        service_instance_id=instance,
        hardware_summary=hardware,
        safety_telemetry=telemetry,
        **out,
    )


def _event_object(value: Any, raw: str | None) -> bool:
    """``validAutoupdateEventObject``: a JSON object of 1..4096 raw bytes."""
    if raw is None or not 0 < len(raw.encode()) <= MAX_EVENT_OBJECT_BYTES:
        return False
    return isinstance(value, GoObject)


def _hardware_summary(value: Any) -> HardwareSummary | None:
    # Invalid hardware summaries are dropped silently, never rejected.
    if value is None:
        return None
    try:
        fields = decode_struct(value, _HARDWARE_FIELDS, "HardwareSummary")
    except GoJSONError:
        return None
    summary = HardwareSummary(**fields)
    chip = summary.chip.strip()
    power = summary.network_power_kw
    if (
        len(chip.encode()) > 120
        or contains_control_char(chip)
        or not 0 <= summary.bandwidth_gb_per_s <= 10_000
        or not 0 <= power <= 10.0
        or not 0 <= summary.gpu_cores_total <= 4096
        or not 0 <= summary.cpu_cores_total <= 1024
    ):
        return None
    return HardwareSummary(
        chip,
        summary.bandwidth_gb_per_s,
        power,
        summary.gpu_cores_total,
        summary.cpu_cores_total,
    )


def _safety_telemetry(
    value: Any,
    model_id: str,
    status: str,
    *,
    hash_present: bool,
    alg_present: bool,
    model_hash: str,
    algorithm: str,
    weights: tuple[bool, str, str],
) -> dict[str, Any]:
    if not isinstance(value, GoObject):
        raise FrameError("safety_telemetry", f"cannot unmarshal {gojson.type_name(value)}")
    for name in _TELEMETRY_REQUIRED:
        if value.get(name) is None:
            raise FrameError("safety_telemetry." + name, f"missing safety telemetry field {name}")
    try:
        schema = unmarshal_int(value["schema_version"])
    except GoJSONError as exc:
        raise FrameError("safety_telemetry.schema_version", str(exc)) from None
    if schema == 2:
        for name in _TELEMETRY_V2_REQUIRED:
            if name not in value:
                raise FrameError(
                    "safety_telemetry." + name, f"missing safety telemetry field {name}"
                )
    try:
        t = decode_struct(value, _TELEMETRY_FIELDS, "ProviderSafetyTelemetry")
    except GoJSONError as exc:
        raise FrameError("safety_telemetry", str(exc)) from None

    def s(name: str) -> str:
        return t.get(name, "")

    def n(name: str) -> int:
        return t.get(name, 0)

    if (
        n("schema_version") not in (1, 2)
        or s("provider_id") == ""
        or s("model_id") != model_id
        or s("runtime_state") != status
        or s("hardware_tier") == ""
        or len(s("provider_id").encode()) > 256
        or len(s("model_id").encode()) > MAX_MODEL_ID_BYTES
        or len(s("hardware_tier").encode()) > 128
        or len(s("observation_id").encode()) > 128
        or len(s("observed_at").encode()) > 64
        or any(
            contains_control_char(s(k))
            for k in ("provider_id", "model_id", "hardware_tier", "observation_id")
        )
        or n("requests_in_flight") < 0
        or n("requests_queued") < 0
        or n("memory_rss_mb") < 0
        or n("memory_capacity_mb") < 1
        or n("restart_count") < 0
        or n("uptime_s") < 0
        or s("observation_id") == ""
        or not 1 <= n("valid_for_ms") <= 300_000
    ):
        raise FrameError("safety_telemetry", "invalid safety telemetry")
    if n("schema_version") == 2:
        session = s("coordinator_session_id")
        if (
            session == ""
            or s("gpu_utilization_scope") != "host"
            or s("binary_version") == ""
            or s("compatibility_set_id") == ""
            or len(session.encode()) > 256
            or len(s("binary_version").encode()) > MAX_BINARY_VERSION_BYTES
            or len(s("compatibility_set_id").encode()) > 1024
            or any(
                contains_control_char(s(k))
                for k in ("coordinator_session_id", "binary_version", "compatibility_set_id")
            )
        ):
            raise FrameError("safety_telemetry", "invalid version 2 safety telemetry identity")
        if not canonical_algorithm(s("model_hash_algorithm")):
            raise FrameError("safety_telemetry.model_hash_algorithm", "unsupported algorithm")
        if not valid_sha256(s("model_hash")):
            raise FrameError("safety_telemetry.model_hash", "invalid safety telemetry model_hash")
        if not hash_present or not alg_present:
            raise FrameError(
                "safety_telemetry.model_hash",
                "version 2 safety telemetry requires the outer heartbeat model identity",
            )
        if s("model_hash") != model_hash:
            raise FrameError("safety_telemetry.model_hash", "does not match heartbeat")
        if s("model_hash_algorithm") != algorithm:
            raise FrameError("safety_telemetry.model_hash_algorithm", "does not match heartbeat")
        tw = "weights_manifest_sha256" in value
        if tw != ("weights_manifest_algorithm" in value):
            raise FrameError(
                "safety_telemetry.weights_manifest_algorithm", "must be reported together"
            )
        if tw:
            present, outer, outer_alg = weights
            if s("weights_manifest_algorithm") != SAFETENSORS_MANIFEST_V1:
                raise FrameError("safety_telemetry.weights_manifest_algorithm", "unsupported")
            if not valid_sha256(s("weights_manifest_sha256")):
                raise FrameError("safety_telemetry.weights_manifest_sha256", "invalid")
            if not present:
                raise FrameError(
                    "safety_telemetry.weights_manifest_sha256", "requires the outer weights"
                )
            if s("weights_manifest_sha256") != outer:
                raise FrameError("safety_telemetry.weights_manifest_sha256", "does not match")
            if s("weights_manifest_algorithm") != outer_alg:
                raise FrameError("safety_telemetry.weights_manifest_algorithm", "does not match")
        for name in ("cpu_utilization_pct", "gpu_utilization_pct"):
            pct = t.get(name)
            if pct is not None and not 0 <= pct <= 100:
                raise FrameError("safety_telemetry." + name, "invalid utilization")
        if s("power_source") not in ("external", "battery", "unknown"):
            raise FrameError("safety_telemetry.power_source", "invalid power source")
    if s("memory_pressure") not in ("normal", "warning", "critical"):
        raise FrameError("safety_telemetry.memory_pressure", "invalid memory pressure")
    if s("thermal_state") not in ("nominal", "fair", "serious", "critical"):
        raise FrameError("safety_telemetry.thermal_state", "invalid thermal state")
    if not parse_rfc3339(s("observed_at")):
        raise FrameError("safety_telemetry.observed_at", "not RFC 3339")
    return t


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    slots_free: int | None = None
    slots_total: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StateUpdate:
    """A ``state_update`` (``ParseStateUpdate``); a failure drops it."""

    type: str = "state_update"
    state: str
    reason: str = ""
    since: str = ""
    metrics_snapshot: MetricsSnapshot = field(default_factory=MetricsSnapshot)
    last_autoupdate_event: str | None = None
    service_instance_id: str = ""


def parse_state_update(payload: str | bytes) -> StateUpdate:
    raw, text = _object(payload)
    typ = _require_string(raw, "type")
    if typ != "state_update":
        raise FrameError("type", f"expected state_update, got {typ!r}")
    state = _require_string(raw, "state")
    reason = ""
    if "reason" in raw:
        # Go ignores a decode error here and keeps "".
        value = raw["reason"]
        reason = gojson.text(value) if isinstance(value, str) else ""
        if contains_control_char(reason):
            raise FrameError("reason")
    since = ""
    if "since" in raw:
        value = raw["since"]
        since = gojson.text(value) if isinstance(value, str) else ""
        if contains_control_char(since):
            raise FrameError("since")
    snapshot = MetricsSnapshot()
    if raw.get("metrics_snapshot") is not None:
        try:
            fields = decode_struct(
                raw["metrics_snapshot"],
                {"slots_free": pointer(unmarshal_int), "slots_total": pointer(unmarshal_int)},
                "MetricsSnapshot",
            )
        except GoJSONError as exc:
            raise FrameError("metrics_snapshot", str(exc)) from None
        snapshot = MetricsSnapshot(**fields)
    autoupdate = None
    if raw.get("last_autoupdate_event") is not None:
        autoupdate = gojson.raw_member(text, "last_autoupdate_event")
        if not _event_object(raw["last_autoupdate_event"], autoupdate):
            raise FrameError("last_autoupdate_event")
    instance = ""
    sid = raw.get("service_instance_id")
    if isinstance(sid, str):
        sid = gojson.text(sid)
        if len(sid.encode()) <= 128 and not contains_control_char(sid):
            instance = sid
    return StateUpdate(
        state=state,
        reason=reason,
        since=since,
        metrics_snapshot=snapshot,
        last_autoupdate_event=autoupdate,
        service_instance_id=instance,
    )


def _struct(payload: str | bytes, fields: dict[str, Any], go_type: str) -> dict[str, Any]:
    """``json.Unmarshal(payload, &GoStruct)`` of a whole frame."""
    try:
        value = gojson.loads(payload)
        return decode_struct(value, fields, go_type)
    except GoJSONError as exc:
        raise FrameError("json", str(exc)) from None


@dataclass(frozen=True, slots=True, kw_only=True)
class PreflightAck:
    type: str = "preflight_ack"
    request_id: str
    accepted: bool = False
    estimated_wait_ms: int = 0
    reason: str = ""
    max_context_tokens: int = 0


def parse_preflight_ack(payload: str | bytes) -> PreflightAck:
    """A ``preflight_ack`` (``ParsePreflightAck``); a failure drops it."""
    fields = _struct(
        payload,
        {
            "type": unmarshal_string,
            "request_id": unmarshal_string,
            "accepted": unmarshal_bool,
            "estimated_wait_ms": unmarshal_int,
            "reason": unmarshal_string,
            "max_context_tokens": unmarshal_int,
        },
        "PreflightAck",
    )
    if fields.get("type", "") != "preflight_ack":
        raise FrameError("type", f"expected preflight_ack, got {fields.get('type', '')!r}")
    request_id = fields.get("request_id", "")
    if request_id == "":
        raise FrameError("request_id", "missing request_id")
    if contains_control_char(request_id):
        raise FrameError("request_id")
    if not fields.get("accepted", False) and fields.get("reason", "") not in (
        PREFLIGHT_REJECTION_REASONS
    ):
        raise FrameError("reason", "invalid reason")
    return PreflightAck(**fields)


@dataclass(frozen=True, slots=True, kw_only=True)
class DrainStatus:
    type: str = "drain_status"
    phase: str
    inflight_requests: int = 0
    estimated_drain_seconds: int = 0


def parse_drain_status(payload: str | bytes) -> DrainStatus:
    """A ``drain_status`` (``ParseDrainStatus``); a failure drops it."""
    fields = _struct(
        payload,
        {
            "type": unmarshal_string,
            "phase": unmarshal_string,
            "inflight_requests": unmarshal_int,
            "estimated_drain_seconds": unmarshal_int,
        },
        "DrainStatus",
    )
    if fields.get("type", "") != "drain_status":
        raise FrameError("type", f"expected drain_status, got {fields.get('type', '')!r}")
    if fields.get("phase", "") not in DRAIN_PHASES:
        raise FrameError("phase", "invalid phase")
    if fields.get("inflight_requests", 0) < 0:
        raise FrameError("inflight_requests", "invalid inflight_requests")
    if fields.get("estimated_drain_seconds", 0) < 0:
        raise FrameError("estimated_drain_seconds", "invalid estimated_drain_seconds")
    fields.setdefault("phase", "")
    return DrainStatus(**fields)


@dataclass(frozen=True, slots=True)
class NakError:
    code: str
    message: str = ""
    details: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Nak:
    type: str = "nak"
    in_reply_to: str
    error: NakError


def _details(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, GoObject):
        raise GoJSONError(f"cannot unmarshal {gojson.type_name(value)} into map")
    return dict(value)


def parse_nak(payload: str | bytes) -> Nak:
    """A ``nak`` (``ParseNak``); a failure drops it (logged)."""
    fields = _struct(
        payload,
        {
            "type": unmarshal_string,
            "in_reply_to": unmarshal_string,
            "error": lambda v: decode_struct(
                v,
                {"code": unmarshal_string, "message": unmarshal_string, "details": _details},
                "NakError",
            ),
        },
        "Nak",
    )
    if fields.get("type", "") != "nak":
        raise FrameError("type", f"expected nak, got {fields.get('type', '')!r}")
    in_reply_to = fields.get("in_reply_to", "")
    error = fields.get("error", {})
    if in_reply_to == "":
        raise FrameError("in_reply_to", "missing in_reply_to")
    if error.get("code", "") == "":
        raise FrameError("error.code", "missing error.code")
    if contains_control_char(in_reply_to):
        raise FrameError("in_reply_to")
    if contains_control_char(error["code"]):
        raise FrameError("error.code")
    if contains_control_char(error.get("message", "")):
        raise FrameError("error.message")
    return Nak(in_reply_to=in_reply_to, error=NakError(**error))


@dataclass(frozen=True, slots=True, kw_only=True)
class DiagnosticStatus:
    type: str = "diagnostic_status"
    schema_version: int
    provider_id: str
    assigned_id: str
    status: str
    model_id: str
    model_loaded: bool
    optional: dict[str, Any] = field(default_factory=dict)


_DIAGNOSTIC_OPTIONAL: dict[str, Any] = {
    "binary_version": unmarshal_string,
    "reason": unmarshal_string,
    "observed_at": unmarshal_string,
    "model_hash": unmarshal_string,
    "model_hash_algorithm": unmarshal_string,
    "uptime_s": unmarshal_int,
    "requests_total": unmarshal_int,
    "requests_in_flight": unmarshal_int,
    "errors_total": unmarshal_int,
    "restart_count": unmarshal_int,
    "memory_rss_mb": unmarshal_int,
    "memory_pressure": unmarshal_string,
    "thermal_state": unmarshal_string,
    "thermally_throttled": unmarshal_bool,
}


def parse_diagnostic_status(payload: str | bytes) -> DiagnosticStatus:
    """A ``diagnostic_status`` (``ParseDiagnosticStatus``); a failure drops it.

    A bad optional field only drops that field.
    """
    size = len(payload if isinstance(payload, bytes) else payload.encode())
    if size > MAX_DIAGNOSTIC_BYTES:
        raise FrameError("payload", f"diagnostic_status exceeds {MAX_DIAGNOSTIC_BYTES} bytes")
    raw, _ = _object(payload)
    typ = _require_string(raw, "type")
    if typ != "diagnostic_status":
        raise FrameError("type", f"expected diagnostic_status, got {typ!r}")
    schema = _require_int(raw, "schema_version")
    if schema != 1:
        raise FrameError("schema_version", "unsupported diagnostic_status schema")
    provider_id = _require_string(raw, "provider_id")
    assigned_id = _require_string(raw, "assigned_id")
    status = _require_string(raw, "status")
    model_id = _bytes_limited(raw, "model_id", MAX_MODEL_ID_BYTES)
    loaded = _require_bool(raw, "model_loaded")
    optional: dict[str, Any] = {}
    for name, decode in _DIAGNOSTIC_OPTIONAL.items():
        if name in raw:
            try:
                value = decode(raw[name])
            except GoJSONError:
                continue
            if value is not ABSENT:
                optional[name] = value
    for name in (
        "binary_version",
        "model_hash",
        "model_hash_algorithm",
        "memory_pressure",
        "thermal_state",
    ):
        if contains_control_char(optional.get(name, "")):
            raise FrameError(name, f"{name} contains control characters")
    return DiagnosticStatus(
        schema_version=schema,
        provider_id=provider_id,
        assigned_id=assigned_id,
        status=status,
        model_id=model_id,
        model_loaded=loaded,
        optional=optional,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class IdlePrewarmEvent:
    type: str = "idle_prewarm_event"
    event: str
    reason: str = ""


def parse_idle_prewarm_event(payload: str | bytes) -> IdlePrewarmEvent:
    """An ``idle_prewarm_event`` (``ParseIdlePrewarmEvent``); a failure drops it."""
    raw, _ = _object(payload)
    typ = _require_string(raw, "type")
    if typ != "idle_prewarm_event":
        raise FrameError("type", f"expected idle_prewarm_event, got {typ!r}")
    event = _require_string(raw, "event")
    if event not in IDLE_PREWARM_EVENTS:
        raise FrameError("event", f"invalid idle prewarm event {event!r}")
    reason = _optional_string(raw, "reason", control=False) or ""
    if raw.get("reason") is not None and reason not in IDLE_PREWARM_REASONS:
        raise FrameError("reason", f"invalid idle prewarm reason {reason!r}")
    if event == "idle_prewarm_skipped" and reason == "":
        raise FrameError("reason", "idle_prewarm_skipped requires reason")
    if event != "idle_prewarm_skipped" and reason != "":
        raise FrameError("reason", "reason is only valid for idle_prewarm_skipped")
    return IdlePrewarmEvent(event=event, reason=reason)


# ---------------------------------------------------------------------------
# Responses (relay.go)


@dataclass(frozen=True, slots=True)
class AEADBody:
    """``enc``: the AEAD envelope of an encrypted frame (byte fields base64url)."""

    alg: str = ""
    seq: int = 0
    nonce: str = ""
    aad: str = ""
    ciphertext: str = ""
    tag: str = ""
    kid: str = ""


_AEAD_FIELDS = {
    "alg": unmarshal_string,
    "seq": unmarshal_uint64,
    "nonce": unmarshal_string,
    "aad": unmarshal_string,
    "ciphertext": unmarshal_string,
    "tag": unmarshal_string,
    "kid": unmarshal_string,
}


def _aead_body(value: Any) -> AEADBody:
    return AEADBody(**decode_struct(value, _AEAD_FIELDS, "AEADEnvelopeBody"))


@dataclass(frozen=True, slots=True)
class ResponseEnvelope:
    """The outer fields of a chunk or end frame (``encryptedInferenceResponse*``)."""

    type: str
    request_id: str
    encrypted: bool
    enc: AEADBody


def parse_response_envelope(payload: str | bytes, go_type: str) -> ResponseEnvelope:
    """Outer fields of ``inference_response_chunk``/``_end``; a failure drops the frame."""
    fields = _struct(
        payload,
        {
            "type": unmarshal_string,
            "request_id": unmarshal_string,
            "encrypted": unmarshal_bool,
            "enc": _aead_body,
        },
        go_type,
    )
    return ResponseEnvelope(
        fields.get("type", ""),
        fields.get("request_id", ""),
        fields.get("encrypted", False),
        fields.get("enc", AEADBody()),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseChunk:
    """An ``inference_response_chunk`` (plain, or the opened plaintext of an encrypted one)."""

    type: str = "inference_response_chunk"
    request_id: str
    seq: int
    data: str
    encrypted: bool = False


def parse_chunk(payload: str | bytes) -> ResponseChunk:
    """A plaintext chunk (``json.Unmarshal`` into ``InferenceResponseChunk``)."""
    fields = _struct(
        payload,
        {
            "type": unmarshal_string,
            "request_id": unmarshal_string,
            "seq": unmarshal_int,
            "data": unmarshal_string,
        },
        "InferenceResponseChunk",
    )
    return ResponseChunk(
        request_id=fields.get("request_id", ""),
        seq=fields.get("seq", 0),
        data=fields.get("data", ""),
    )


def parse_chunk_plaintext_envelope(plaintext: bytes, request_id: str) -> ResponseChunk:
    """The JSON plaintext of an encrypted chunk when the envelope was negotiated."""
    try:
        value = gojson.loads(plaintext)
    except GoJSONError:
        raise FrameError(
            "plaintext", "encrypted chunk plaintext envelope must be valid JSON"
        ) from None
    if not isinstance(value, GoObject):
        raise FrameError("plaintext", "encrypted chunk plaintext envelope must be valid JSON")
    if "type" not in value:
        raise FrameError("plaintext", "encrypted chunk plaintext type is required")
    if not isinstance(value["type"], str | None):
        raise FrameError("plaintext", "encrypted chunk plaintext type must be a string")
    if (value["type"] or "") != "inference_response_chunk_plaintext":
        raise FrameError("plaintext", "encrypted chunk plaintext type mismatch")
    try:
        fields = decode_struct(
            value,
            {"seq": pointer(unmarshal_int), "data": pointer(unmarshal_string)},
            "encryptedInferenceChunkPlaintextDecode",
        )
    except GoJSONError as exc:
        raise FrameError("plaintext", str(exc)) from None
    if fields.get("seq") is None:
        raise FrameError("plaintext", "encrypted chunk plaintext seq is required")
    if fields["seq"] < 0:
        raise FrameError("plaintext", "encrypted chunk plaintext seq must be >= 0")
    if fields.get("data") is None:
        raise FrameError("plaintext", "encrypted chunk plaintext data is required")
    return ResponseChunk(
        request_id=request_id, seq=fields["seq"], data=fields["data"], encrypted=True
    )


@dataclass(frozen=True, slots=True)
class Usage:
    """``usage`` of an end frame as the buyer side reads it (``json.RawMessage``).

    A count the coordinator cannot read as a Go ``int`` is ``None``.
    """

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    macprovider_model_hash_observed: str | None = None


def _usage(raw: Any) -> Usage:
    if not isinstance(raw, GoObject):
        return Usage()
    values: dict[str, Any] = {}
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        try:
            number = unmarshal_int(gojson.struct_value(raw, name))
        except GoJSONError:
            number = None
        values[name] = None if number is ABSENT else number
    observed = gojson.struct_value(raw, "macprovider_model_hash_observed")
    values["macprovider_model_hash_observed"] = (
        gojson.text(observed) if isinstance(observed, str) else None
    )
    return Usage(**values)


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseEnd:
    """An ``inference_response_end`` (``json.Unmarshal`` into ``InferenceResponseEnd``)."""

    type: str = "inference_response_end"
    request_id: str
    status: str = ""
    chunks_sent: int = 0
    usage: Usage = field(default_factory=Usage)
    usage_present: bool = False
    error: str = ""
    retryable: bool | None = None
    terminal_state_ts_unix_ms: int = 0
    receipt_pending_deadline_seconds: int = 0
    late_receipt_settlement: str = ""
    receipt: str = ""
    encrypted: bool = False


def _raw(value: Any) -> Any:
    return value


_END_FIELDS: dict[str, Any] = {
    "type": unmarshal_string,
    "request_id": unmarshal_string,
    "status": unmarshal_string,
    "chunks_sent": unmarshal_int,
    "usage": _raw,
    "error": unmarshal_string,
    "retryable": pointer(unmarshal_bool),
    "terminal_state_ts_unix_ms": lambda v: unmarshal_int(v, "int64"),
    "receipt_pending_deadline_seconds": lambda v: unmarshal_int(v, "int64"),
    "late_receipt_settlement": unmarshal_string,
    "receipt": unmarshal_string,
    "relay_blind_validation": _raw,
}


def parse_end(payload: str | bytes, *, encrypted: bool = False) -> ResponseEnd:
    """An end frame or the opened plaintext of an encrypted one."""
    fields = _struct(payload, _END_FIELDS, "InferenceResponseEnd")
    usage_raw = fields.pop("usage", None)
    fields.pop("relay_blind_validation", None)
    fields.pop("type", None)
    fields.setdefault("request_id", "")
    return ResponseEnd(
        usage=_usage(usage_raw),
        usage_present=usage_raw is not None,
        encrypted=encrypted,
        **fields,
    )


# ---------------------------------------------------------------------------
# In-band rekey replies


@dataclass(frozen=True, slots=True, kw_only=True)
class RekeyResponse:
    type: str
    version: int
    rekey_id: str
    assigned_id: str
    old_kid: str
    new_kid: str
    provider_ecdh_public_key: str


def parse_rekey_response(payload: str | bytes) -> RekeyResponse:
    """``aead_rekey_response`` (``json.Unmarshal`` into ``AEADRekeyResponse``)."""
    fields = _struct(
        payload,
        {
            "type": unmarshal_string,
            "version": unmarshal_int,
            "rekey_id": unmarshal_string,
            "assigned_id": unmarshal_string,
            "old_kid": unmarshal_string,
            "new_kid": unmarshal_string,
            "provider_ecdh_public_key": unmarshal_string,
        },
        "AEADRekeyResponse",
    )
    defaults = dict.fromkeys(
        ("type", "rekey_id", "assigned_id", "old_kid", "new_kid", "provider_ecdh_public_key"), ""
    )
    return RekeyResponse(**{**defaults, "version": 0, **fields})


@dataclass(frozen=True, slots=True, kw_only=True)
class RekeyConfirmation:
    type: str
    version: int
    rekey_id: str
    assigned_id: str
    old_kid: str
    new_kid: str
    encrypted: bool
    enc: AEADBody


def parse_rekey_confirmation(payload: str | bytes) -> RekeyConfirmation:
    """``aead_rekey_committed`` (``json.Unmarshal`` into ``AEADRekeyConfirmation``)."""
    fields = _struct(
        payload,
        {
            "type": unmarshal_string,
            "version": unmarshal_int,
            "rekey_id": unmarshal_string,
            "assigned_id": unmarshal_string,
            "old_kid": unmarshal_string,
            "new_kid": unmarshal_string,
            "encrypted": unmarshal_bool,
            "enc": _aead_body,
        },
        "AEADRekeyConfirmation",
    )
    defaults: dict[str, Any] = dict.fromkeys(
        ("type", "rekey_id", "assigned_id", "old_kid", "new_kid"), ""
    )
    defaults.update(version=0, encrypted=False, enc=AEADBody())
    return RekeyConfirmation(**{**defaults, **fields})
