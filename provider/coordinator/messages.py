"""Wire types of the provider <-> coordinator protocol (v1 ``hello`` and v2 ``auth_request``).

Every WebSocket message is one JSON text frame whose ``type`` field selects a
msgspec Struct below. Frames are decoded once, at the edge, by
:func:`decode_coordinator_frame` (what a provider receives) or
:func:`decode_provider_frame` (what a coordinator receives). Neither raises:
input that is not a valid message comes back as :class:`Invalid`, which
carries what a ``nak`` needs, so bad input never reaches a handler.

Encoding is :func:`encode`: every field, in declaration order, so the same
message always gives the same bytes; a field set to ``UNSET`` is left out
(the coordinator refuses ``null`` in some optional fields, e.g.
``model_hash_algorithm`` and the ``catalog_*`` fields). Every integer field
is a Python ``int``: the coordinator's Go decoder refuses ``1.0`` in an int.

The OpenAI bodies that travel inside ``inference_request.body`` and
``inference_response_chunk.data`` are :mod:`provider.openai`'s.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from provider.coordinator.tier2 import Envelope
from provider.decoding import DECODE_ERRORS, describe
from provider.openai.response import Usage

PROTOCOL_VERSION: Final = 1
AUTH_PROTOCOL_VERSION: Final = 2

#: Largest frame either side accepts (bytes). The stub closes 1009 above it.
MAX_FRAME_BYTES: Final = 4 * 1024 * 1024

ProviderState = Literal["ready", "busy", "degraded", "draining", "unavailable"]
EndStatus = Literal[
    "complete",
    "cancelled",
    "error_queue_full",
    "error_context_exceeded",
    "error_model_not_loaded",
    "error_internal",
    "provider_timeout",
    "malformed_json_response",
    "json_schema_validation_failed",
]
PreflightReason = Literal[
    "context_exceeds_capacity", "queue_full", "draining", "model_not_loaded", "unhealthy"
]
DrainPhase = Literal["starting", "in_progress", "complete", "timeout_skipped"]

NonNegInt = Annotated[int, Meta(ge=0)]
NonNegFloat = Annotated[float, Meta(ge=0)]
RequestId = Annotated[str, Meta(min_length=1, max_length=256)]


def _check_bytes(name: str, value: str | None, limit: int) -> None:
    # Meta(max_length) counts characters; the coordinator's limits are bytes.
    if value is not None and len(value.encode()) > limit:
        raise ValueError(f"`{name}` is longer than {limit} bytes")


class _Message(msgspec.Struct, tag_field="type", kw_only=True):
    """Base of every wire message; the class's tag is its ``type``.

    Every field is always encoded (``None`` as ``null``): the real coordinator
    requires some fields that have defaults here (``version``, ``tier``).
    """


# --------------------------------------------------------------------------
# Provider -> coordinator


class HardwareSummary(msgspec.Struct, omit_defaults=True, kw_only=True):
    """``heartbeat.hardware_summary`` (COORDINATOR.md 6.4): facts left out are unknown.

    The coordinator drops the whole object when a value is out of its range,
    so the ranges are checked here too; ``chip`` is at most 120 bytes.
    """

    chip: str | None = None
    bandwidth_gb_per_s: Annotated[int, Meta(ge=0, le=10_000)] | None = None
    network_power_kw: Annotated[float, Meta(ge=0, le=10.0)] | None = None
    gpu_cores_total: Annotated[int, Meta(ge=0, le=4096)] | None = None
    cpu_cores_total: Annotated[int, Meta(ge=0, le=1024)] | None = None

    def __post_init__(self) -> None:
        _check_bytes("chip", self.chip, 120)


MemoryPressure = Literal["normal", "warning", "critical"]
ThermalState = Literal["nominal", "fair", "serious", "critical"]
PowerSource = Literal["external", "battery", "unknown"]
Percent = Annotated[float, Meta(ge=0, le=100)]


class SafetyTelemetry(msgspec.Struct, kw_only=True):
    """``heartbeat.safety_telemetry`` (COORDINATOR.md 6.2), schema 1 or 2.

    The coordinator rejects the whole heartbeat when this object is invalid,
    so every constraint it checks is stated here. Schema 1 sends the first
    block only (the schema 2 fields stay ``UNSET``, so they are not encoded);
    schema 2 sets every field of the second block (``None`` is sent as
    ``null`` for the two utilisations). Built by
    :func:`provider.coordinator.safety.safety_telemetry`.
    """

    schema_version: Literal[1, 2]
    provider_id: Annotated[str, Meta(min_length=1, max_length=256)]
    model_id: Annotated[str, Meta(min_length=1)]
    model_loaded: bool
    runtime_state: ProviderState
    hardware_tier: Annotated[str, Meta(min_length=1, max_length=128)]
    requests_in_flight: NonNegInt
    requests_queued: NonNegInt
    memory_rss_mb: NonNegInt
    memory_capacity_mb: Annotated[int, Meta(ge=1)]
    memory_pressure: MemoryPressure
    thermal_state: ThermalState
    thermally_throttled: bool
    restart_count: NonNegInt
    uptime_s: NonNegInt
    coordinator_connected: bool
    observation_id: Annotated[str, Meta(min_length=1, max_length=128)]
    observed_at: Annotated[str, Meta(min_length=1, max_length=64)]
    valid_for_ms: Annotated[int, Meta(ge=1, le=300_000)]
    # Schema 2.
    coordinator_session_id: str | msgspec.UnsetType = msgspec.UNSET
    cpu_utilization_pct: Percent | msgspec.UnsetType | None = msgspec.UNSET
    gpu_utilization_pct: Percent | msgspec.UnsetType | None = msgspec.UNSET
    gpu_utilization_scope: Literal["host"] | msgspec.UnsetType = msgspec.UNSET
    power_source: PowerSource | msgspec.UnsetType = msgspec.UNSET
    binary_version: str | msgspec.UnsetType = msgspec.UNSET
    compatibility_set_id: str | msgspec.UnsetType = msgspec.UNSET
    model_hash: str | msgspec.UnsetType = msgspec.UNSET
    model_hash_algorithm: str | msgspec.UnsetType = msgspec.UNSET
    weights_manifest_sha256: str | msgspec.UnsetType = msgspec.UNSET
    weights_manifest_algorithm: str | msgspec.UnsetType = msgspec.UNSET


class Hello(_Message, tag="hello", kw_only=True):
    version: int = PROTOCOL_VERSION
    tier: int = 1
    provider_id: Annotated[str, Meta(min_length=1, max_length=256)]
    hostname: str
    model_id: Annotated[str, Meta(min_length=1)]
    model_params_b: NonNegFloat
    ram_gb: NonNegInt
    # 0 until the model has loaded; heartbeats then carry the real values.
    max_context_tokens: NonNegInt
    max_concurrency: Annotated[int, Meta(ge=1)]
    throughput_tps_estimate: NonNegFloat
    binary_version: str
    # Required on the wire even when null, so it has no default.
    attestation: dict[str, Any] | None
    model_hash: str | UnsetType = UNSET
    model_hash_algorithm: str | UnsetType = UNSET
    model_load_time_ms: NonNegInt | None = None
    supported_models: Annotated[list[str], Meta(max_length=64)] | None = None
    catalog_release_id: str | UnsetType = UNSET
    catalog_policy_version: str | UnsetType = UNSET
    catalog_signer_key_id: str | UnsetType = UNSET
    catalog_candidate_sha256: str | UnsetType = UNSET
    catalog_row_identity: str | UnsetType = UNSET
    compatibility_set_id: str | UnsetType = UNSET
    referral_code: str | UnsetType = UNSET

    def __post_init__(self) -> None:
        _check_bytes("hostname", self.hostname, 253)
        _check_bytes("model_id", self.model_id, 256)
        _check_bytes("binary_version", self.binary_version, 32)


class MetricsSnapshot(msgspec.Struct, kw_only=True):
    slots_free: NonNegInt
    slots_total: NonNegInt
    requests_served_since_last: NonNegInt = 0
    avg_latency_ms_since_last: NonNegFloat = 0.0
    throughput_tps_since_last: NonNegFloat = 0.0


class Heartbeat(_Message, tag="heartbeat", kw_only=True):
    status: ProviderState
    model_id: str
    model_params_b: NonNegFloat
    ram_gb: NonNegInt
    max_context_tokens: NonNegInt
    max_concurrency: NonNegInt
    slots_free: NonNegInt
    slots_total: NonNegInt
    throughput_tps_estimate: NonNegFloat
    requests_served_since_last: NonNegInt
    avg_latency_ms_since_last: NonNegFloat
    throughput_tps_since_last: NonNegFloat
    loading: bool | None = None
    hardware_summary: HardwareSummary | None = None
    service_instance_id: str | None = None
    # The coordinator refuses a null model_hash: absent until it is known.
    model_hash: str | UnsetType = UNSET
    model_hash_algorithm: str | UnsetType = UNSET
    safety_telemetry: SafetyTelemetry | None = None


class StateUpdate(_Message, tag="state_update", kw_only=True):
    state: ProviderState
    reason: str
    since: str
    metrics_snapshot: MetricsSnapshot


class InferenceResponseChunk(_Message, tag="inference_response_chunk", kw_only=True):
    request_id: RequestId
    seq: NonNegInt
    data: str


class EndUsage(Usage, kw_only=True):
    """``usage`` of an end frame: the token counts and the model hash served."""

    macprovider_model_hash_observed: str | UnsetType = UNSET


class InferenceResponseEnd(_Message, tag="inference_response_end", kw_only=True):
    request_id: RequestId
    status: EndStatus
    chunks_sent: NonNegInt
    usage: EndUsage
    retryable: bool = False
    terminal_state_ts_unix_ms: NonNegInt = 0
    error: str | None = None
    # With settlement metadata: the signed v0.4 receipt (receipts.py).
    receipt: str | UnsetType = UNSET
    receipt_pending_deadline_seconds: NonNegInt | UnsetType = UNSET
    late_receipt_settlement: str | UnsetType = UNSET


class PreflightAck(_Message, tag="preflight_ack", kw_only=True):
    request_id: RequestId
    accepted: bool
    estimated_wait_ms: NonNegInt = 0
    reason: PreflightReason | None = None
    max_context_tokens: NonNegInt = 0


class DrainStatus(_Message, tag="drain_status", kw_only=True):
    phase: DrainPhase
    inflight_requests: NonNegInt
    # An int on the wire: Go refuses 1.5 for it and drops the whole frame.
    estimated_drain_seconds: NonNegInt = 0


class DiagnosticStatus(_Message, tag="diagnostic_status", kw_only=True):
    """``diagnostic_status`` (COORDINATOR.md 6.3): informational, unprompted.

    Sent after registration and whenever the provider starts or stops holding
    back for its host, so the coordinator's operators can see why. Optional
    fields the provider does not know go out as ``null``, which the
    coordinator reads as absent.
    """

    schema_version: Literal[1] = 1
    provider_id: Annotated[str, Meta(min_length=1)]
    assigned_id: Annotated[str, Meta(min_length=1)]
    status: ProviderState
    model_id: Annotated[str, Meta(min_length=1)]
    model_loaded: bool
    reason: str | None = None
    observed_at: str | None = None
    binary_version: str | None = None
    uptime_s: NonNegInt | None = None
    requests_total: NonNegInt | None = None
    requests_in_flight: NonNegInt | None = None
    errors_total: NonNegInt | None = None
    restart_count: NonNegInt | None = None
    memory_rss_mb: NonNegInt | None = None
    memory_pressure: MemoryPressure | None = None
    thermal_state: ThermalState | None = None
    thermally_throttled: bool | None = None


class NakError(msgspec.Struct, kw_only=True):
    code: str
    message: str


class Nak(_Message, tag="nak", kw_only=True):
    """``in_reply_to`` is the refused message's request id, else its type."""

    in_reply_to: Annotated[str, Meta(min_length=1)]
    error: NakError


# Protocol v2: the handshake and the encrypted leg. These are not tagged
# union members: the encrypted frames share their type with the plain ones.


class _Frame(msgspec.Struct, kw_only=True):
    """A v2 frame whose ``type`` is an ordinary first field."""


class Tier2Capabilities(msgspec.Struct, kw_only=True):
    encrypted_leg: bool = True
    attestation: bool = False
    aead_suites: list[str] = msgspec.field(default_factory=lambda: ["A256GCM"])
    response_chunk_plaintext_envelope: bool = True
    in_band_aead_rekey_v1: bool = True
    trusted_pool_v1: bool = False
    catalog_material_hold_v1: bool = False


class AuthRequestInitial(_Frame, kw_only=True):
    """``auth_request`` stage ``initial``; its exact bytes are the auth transcript."""

    type: Literal["auth_request"] = "auth_request"
    version: int = AUTH_PROTOCOL_VERSION
    stage: Literal["initial"] = "initial"
    provider_id: Annotated[str, Meta(min_length=1, max_length=64)]
    hostname: str
    model_id: Annotated[str, Meta(min_length=1)]
    model_params_b: NonNegFloat
    ram_gb: NonNegInt
    max_context_tokens: NonNegInt
    max_concurrency: Annotated[int, Meta(ge=1)]
    throughput_tps_estimate: NonNegFloat
    binary_version: str
    provider_ecdh_public_key: str
    tier2_capabilities: Tier2Capabilities
    provider_receipt_public_key: str
    provider_admission_public_key: str | UnsetType = UNSET
    provider_admission_next_public_key: str | UnsetType = UNSET
    supported_models: list[str] | UnsetType = UNSET
    model_hash: str | UnsetType = UNSET
    model_hash_algorithm: str | UnsetType = UNSET
    model_load_time_ms: NonNegInt | UnsetType = UNSET
    catalog_release_id: str | UnsetType = UNSET
    catalog_policy_version: str | UnsetType = UNSET
    catalog_signer_key_id: str | UnsetType = UNSET
    catalog_candidate_sha256: str | UnsetType = UNSET
    catalog_row_identity: str | UnsetType = UNSET
    compatibility_set_id: str | UnsetType = UNSET
    credential_bootstrap: bool | UnsetType = UNSET
    referral_code: str | UnsetType = UNSET

    def __post_init__(self) -> None:
        _check_bytes("hostname", self.hostname, 253)
        _check_bytes("model_id", self.model_id, 256)
        _check_bytes("binary_version", self.binary_version, 32)


class AuthRequestProof(_Frame, kw_only=True):
    """``auth_request`` stage ``proof``: what must match the initial is repeated."""

    type: Literal["auth_request"] = "auth_request"
    version: int = AUTH_PROTOCOL_VERSION
    stage: Literal["proof"] = "proof"
    auth_attempt_id: str
    provider_id: str
    attestation_token: None = None
    identity_signature: str | UnsetType = UNSET
    identity_signature_transcript_sha256: str | UnsetType = UNSET
    supported_models: list[str] | UnsetType = UNSET
    credential_bootstrap: bool | UnsetType = UNSET
    referral_code: str | UnsetType = UNSET


class EncryptedChunk(_Frame, kw_only=True):
    """``inference_response_chunk`` on the encrypted leg."""

    type: Literal["inference_response_chunk"] = "inference_response_chunk"
    request_id: str
    encrypted: Literal[True] = True
    enc: Envelope


class EncryptedEnd(_Frame, kw_only=True):
    """``inference_response_end`` on the encrypted leg: the whole end frame is the plaintext."""

    type: Literal["inference_response_end"] = "inference_response_end"
    request_id: str
    encrypted: Literal[True] = True
    enc: Envelope


class AeadRekeyResponse(_Frame, kw_only=True):
    type: Literal["aead_rekey_response"] = "aead_rekey_response"
    version: int = 1
    rekey_id: str
    assigned_id: str
    old_kid: str
    new_kid: str
    provider_ecdh_public_key: str


class AeadRekeyCommitted(_Frame, kw_only=True):
    type: Literal["aead_rekey_committed"] = "aead_rekey_committed"
    version: int = 1
    rekey_id: str
    assigned_id: str
    old_kid: str
    new_kid: str
    encrypted: Literal[True] = True
    enc: Envelope


ProviderMessage = (
    Hello
    | Heartbeat
    | StateUpdate
    | InferenceResponseChunk
    | InferenceResponseEnd
    | PreflightAck
    | DrainStatus
    | Nak
    | DiagnosticStatus
)


# --------------------------------------------------------------------------
# Coordinator -> provider


class HelloAck(_Message, tag="hello_ack", kw_only=True):
    coordinator_version: int
    assigned_id: str
    heartbeat_interval_s: Annotated[int, Meta(ge=1, le=3600)] = 30
    tier: str = ""
    assigned_provider_token: str | None = None
    auth_state: str | None = None
    recommended_binary_version: str | None = None
    required_binary_version: str | None = None


class InferenceRequest(_Message, tag="inference_request", kw_only=True):
    request_id: RequestId
    stream: bool
    # Its size in bytes is checked by decode_chat_request, with a buyer-facing message.
    # Absent on the encrypted leg, where it is inside ``enc``.
    body: str | None = None
    encrypted: bool = False
    enc: Envelope | None = None
    # Checked by receipts.parse_settlement, which names the bad field.
    settlement: dict[str, Any] | None = None
    # A hint that requests belong to one conversation (for the prefix cache,
    # which keeps it hashed); never used to look anything up. On the
    # encrypted leg it is inside ``enc``.
    conversation_key: str | None = None


class RequestPlaintext(msgspec.Struct, tag_field="type", tag="inference_request_plaintext"):
    """What an encrypted ``inference_request`` decrypts to."""

    body: str
    conversation_key: str | None = None


class CancelRequest(_Message, tag="cancel_request", kw_only=True):
    request_id: RequestId
    reason: str = ""


class Drain(_Message, tag="drain", kw_only=True):
    pass


class WarmUp(_Message, tag="warm_up", kw_only=True):
    pass


class Preflight(_Message, tag="preflight", kw_only=True):
    request_id: RequestId
    estimated_tokens: NonNegInt


class AuthChallenge(_Message, tag="auth_challenge", kw_only=True):
    version: int = AUTH_PROTOCOL_VERSION
    auth_attempt_id: Annotated[str, Meta(min_length=1)]
    assigned_id: Annotated[str, Meta(min_length=1)]
    attestation_challenge: str = ""
    attestation_formats: list[str] = msgspec.field(default_factory=list)
    coordinator_ecdh_public_key: str
    selected_aead_suite: str
    selected_aead: str = ""
    key_id: str = ""
    expires_at: str = ""
    admission_identity_public_key: str = ""
    bootstrap_identity_public_key: str = ""
    admission_identity_generation: int = 0


class EncryptedLegSession(msgspec.Struct, kw_only=True):
    enabled: bool = False
    alg: str = ""
    kid: str = ""
    rekey_after_requests: int = 0
    rekey_after_seconds: int = 0
    response_chunk_plaintext_envelope: bool = False
    in_band_aead_rekey_v1: bool = False


class Tier2Session(msgspec.Struct, kw_only=True):
    encrypted_leg: EncryptedLegSession = msgspec.field(default_factory=EncryptedLegSession)


class AuthError(msgspec.Struct, kw_only=True):
    code: str = ""
    message: str = ""


class AuthResponse(_Message, tag="auth_response", kw_only=True):
    version: int = AUTH_PROTOCOL_VERSION
    status: Literal["accepted", "rejected"]
    assigned_id: str = ""
    heartbeat_interval_s: Annotated[int, Meta(ge=0, le=3600)] = 30
    tier: str = ""
    required_binary_version: str = ""
    recommended_binary_version: str = ""
    tier2_session: Tier2Session | None = None
    error: AuthError | None = None
    assigned_provider_token: str = ""
    pair_ot: str = ""
    claim_url: str = ""
    auth_state: str = ""
    catalog_compatible: bool = False
    catalog_release_id: str = ""
    identity_admission_mode: str = ""
    identity_generation: int = 0
    admission_identity_public_key: str = ""
    compatibility_policy: str = ""
    accepted_compatibility_set_id: str = ""
    recommended_compatibility_set_id: str = ""


class AeadRekeyRequest(_Message, tag="aead_rekey_request", kw_only=True):
    version: int = 1
    rekey_id: Annotated[str, Meta(min_length=1)]
    assigned_id: str
    reason: str = ""
    old_kid: str
    coordinator_ecdh_public_key: str
    selected_aead: str
    expires_at: str = ""
    response_chunk_plaintext_envelope: bool = False


class AeadRekeyCommit(_Message, tag="aead_rekey_commit", kw_only=True):
    version: int = 1
    rekey_id: str
    assigned_id: str
    old_kid: str
    new_kid: str
    encrypted: bool = False
    enc: Envelope


CoordinatorMessage = (
    HelloAck
    | InferenceRequest
    | CancelRequest
    | Drain
    | WarmUp
    | Preflight
    | AuthChallenge
    | AuthResponse
    | AeadRekeyRequest
    | AeadRekeyCommit
)


# --------------------------------------------------------------------------
# Decoding at the edge


class Invalid(msgspec.Struct, frozen=True):
    """A frame that is not a valid message.

    ``code`` is the ``nak`` code to answer with: ``unknown_message_type`` for a
    well-formed object with a ``type`` this side does not know,
    ``malformed_message`` for everything else. ``type`` is the received
    ``type`` (``""`` when there was none) and goes in ``nak.in_reply_to``.
    """

    code: Literal["unknown_message_type", "malformed_message"]
    type: str
    message: str
    #: The frame's ``request_id`` when it had a usable one: a nak names it.
    request_id: str | None = None

    @property
    def in_reply_to(self) -> str:
        """A nak's ``in_reply_to``: the request id, else the type, else ``unknown``."""
        return self.request_id or self.type or "unknown"


class _Envelope(msgspec.Struct):
    type: str
    request_id: Any = None


_encoder = msgspec.json.Encoder()
_coordinator_decoder = msgspec.json.Decoder(CoordinatorMessage)
_provider_decoder = msgspec.json.Decoder(ProviderMessage)
_envelope_decoder = msgspec.json.Decoder(_Envelope)
_COORDINATOR_TAGS = frozenset(t.__struct_config__.tag for t in CoordinatorMessage.__args__)
_PROVIDER_TAGS = frozenset(t.__struct_config__.tag for t in ProviderMessage.__args__)


def encode(msg: msgspec.Struct) -> bytes:
    """Encode a message as compact JSON (stable: same message, same bytes)."""
    return _encoder.encode(msg)


def encode_text(msg: msgspec.Struct) -> str:
    """:func:`encode` as ``str``, for a WebSocket TEXT frame."""
    return _encoder.encode(msg).decode()


#: How much of a received ``type`` is echoed back (nak) or logged.
MAX_TYPE_ECHO = 64


def _decode(data: str | bytes, decoder: msgspec.json.Decoder, known: frozenset[str]) -> Any:
    try:
        return decoder.decode(data)
    except DECODE_ERRORS as exc:
        error = describe(exc)
    try:
        envelope = _envelope_decoder.decode(data)
    except DECODE_ERRORS:
        return Invalid("malformed_message", "", error)
    kind = envelope.type[:MAX_TYPE_ECHO]
    request_id = envelope.request_id
    if not isinstance(request_id, str) or not 0 < len(request_id) <= 256:
        request_id = None
    if kind not in known:
        return Invalid("unknown_message_type", kind, f"unknown message type {kind!r}", request_id)
    return Invalid("malformed_message", kind, error, request_id)


def decode_coordinator_frame(data: str | bytes) -> CoordinatorMessage | Invalid:
    """Decode a frame received by the provider. Never raises."""
    return _decode(data, _coordinator_decoder, _COORDINATOR_TAGS)


def decode_provider_frame(data: str | bytes) -> ProviderMessage | Invalid:
    """Decode a frame received by the coordinator. Never raises."""
    return _decode(data, _provider_decoder, _PROVIDER_TAGS)


def message_type(msg: msgspec.Struct) -> str:
    """The wire ``type`` of a message instance."""
    return type(msg).__struct_config__.tag  # type: ignore[return-value]
