"""Coordinator -> provider frames, written as the Go code marshals them (pure).

Each builder returns an :class:`Outgoing`: the exact text to send (fields in
the Go struct's declaration order, ``omitempty`` fields left out when empty,
strings escaped as ``encoding/json`` does) and a view of the message whose
attributes carry the wire names, for the frame log. For an encrypted frame
the view also carries what is inside the envelope (``body`` of an
``inference_request``), so tests read the request as the provider will.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .gojson import marshal


@dataclass(frozen=True)
class Outgoing:
    """One frame to write: its ``type``, its wire text and a readable view."""

    type: str
    wire: str
    view: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["view"][name]
        except KeyError:
            raise AttributeError(name) from None


def _omit_empty(fields: dict[str, Any], *names: str) -> dict[str, Any]:
    """Drop the ``omitempty`` fields among ``names`` that hold their zero value."""
    return {k: v for k, v in fields.items() if k not in names or v not in (None, "", 0, False)}


def outgoing(fields: dict[str, Any], *, view: dict[str, Any] | None = None) -> Outgoing:
    return Outgoing(fields["type"], marshal(fields), {**fields, **(view or {})})


def hello_ack(
    *,
    assigned_id: str,
    heartbeat_interval_s: int,
    tier: str,
    recommended_binary_version: str = "",
    required_binary_version: str = "",
    assigned_provider_token: str = "",
    auth_state: str = "",
    catalog: dict[str, str] | None = None,
    compatibility: dict[str, str] | None = None,
) -> Outgoing:
    fields = {
        "type": "hello_ack",
        "coordinator_version": 1,
        "assigned_id": assigned_id,
        "heartbeat_interval_s": heartbeat_interval_s,
        "tier": tier,
        "recommended_binary_version": recommended_binary_version,
        "required_binary_version": required_binary_version,
        "autoupdate_drain_extensions": True,
        "assigned_provider_token": assigned_provider_token,
        "pair_ot": "",
        "claim_url": "",
        "auth_state": auth_state,
        **_catalog_fields(catalog),
        **_compatibility_fields(compatibility),
    }
    return outgoing(_omit_empty(fields, *_ACK_OMITEMPTY))


_ACK_OMITEMPTY = (
    "tier",
    "recommended_binary_version",
    "required_binary_version",
    "autoupdate_drain_extensions",
    "assigned_provider_token",
    "pair_ot",
    "claim_url",
    "auth_state",
    "catalog_compatible",
    "catalog_release_id",
    "catalog_policy_version",
    "catalog_candidate_sha256",
    "catalog_signer_key_id",
    "compatibility_policy",
    "accepted_compatibility_set_id",
    "recommended_compatibility_set_id",
)


def _catalog_fields(catalog: dict[str, str] | None) -> dict[str, Any]:
    if catalog is None:
        return {}
    return {
        "catalog_compatible": True,
        "catalog_release_id": catalog["release_id"],
        "catalog_policy_version": catalog["policy_version"],
        "catalog_candidate_sha256": catalog["candidate_sha256"],
        "catalog_signer_key_id": catalog["signer_key_id"],
    }


def _compatibility_fields(compatibility: dict[str, str] | None) -> dict[str, Any]:
    if compatibility is None:
        return {}
    return {
        "compatibility_policy": compatibility.get("policy", ""),
        "accepted_compatibility_set_id": compatibility.get("accepted", ""),
        "recommended_compatibility_set_id": compatibility.get("recommended", ""),
    }


def auth_challenge_fields(
    *,
    auth_attempt_id: str,
    assigned_id: str,
    attestation_challenge: str,
    attestation_formats: list[str],
    coordinator_ecdh_public_key: str,
    key_id: str,
    expires_at: str,
    bootstrap_identity_public_key: str = "",
    admission_identity_public_key: str = "",
    admission_identity_generation: int = 0,
) -> dict[str, Any]:
    """The ``AuthChallenge`` as Go marshals it (the bootstrap signature covers this)."""
    fields = {
        "type": "auth_challenge",
        "version": 2,
        "auth_attempt_id": auth_attempt_id,
        "assigned_id": assigned_id,
        "attestation_challenge": attestation_challenge,
        "attestation_formats": attestation_formats,
        "coordinator_ecdh_public_key": coordinator_ecdh_public_key,
        "selected_aead_suite": "A256GCM",
        "selected_aead": "A256GCM",
        "key_id": key_id,
        "expires_at": expires_at,
        "bootstrap_identity_public_key": bootstrap_identity_public_key,
        "admission_identity_public_key": admission_identity_public_key,
        "admission_identity_generation": admission_identity_generation,
    }
    return _omit_empty(
        fields,
        "selected_aead",
        "key_id",
        "bootstrap_identity_public_key",
        "admission_identity_public_key",
        "admission_identity_generation",
    )


def auth_rejected(code: str, message: str) -> Outgoing:
    return outgoing(
        {
            "type": "auth_response",
            "version": 2,
            "status": "rejected",
            "error": {"code": code, "message": message},
        }
    )


def auth_accepted(
    *,
    assigned_id: str,
    heartbeat_interval_s: int,
    tier: str,
    kid: str,
    rekey_after_requests: int,
    rekey_after_seconds: int,
    response_chunk_plaintext_envelope: bool,
    in_band_aead_rekey_v1: bool,
    attestation_status: str = "not_required",
    model_hash_status: str = "",
    recommended_binary_version: str = "",
    required_binary_version: str = "",
    autoupdate_drain_extensions: bool = True,
    assigned_provider_token: str = "",
    auth_state: str = "",
    identity_admission_mode: str = "",
    identity_admission_key_role: str = "",
    identity_generation: int = 0,
    admission_identity_public_key: str = "",
    catalog: dict[str, str] | None = None,
    compatibility: dict[str, str] | None = None,
) -> Outgoing:
    leg = _omit_empty(
        {
            "enabled": True,
            "alg": "A256GCM",
            "kid": kid,
            "rekey_after_requests": rekey_after_requests,
            "rekey_after_seconds": rekey_after_seconds,
            "response_chunk_plaintext_envelope": response_chunk_plaintext_envelope,
            "in_band_aead_rekey_v1": in_band_aead_rekey_v1,
        },
        "response_chunk_plaintext_envelope",
        "in_band_aead_rekey_v1",
    )
    session = {
        "encrypted_leg": leg,
        "attestation": {"status": attestation_status, "ram_tier_attested": False},
        "model_hash": _omit_empty({"status": model_hash_status}, "status"),
    }
    fields = {
        "type": "auth_response",
        "version": 2,
        "status": "accepted",
        "assigned_id": assigned_id,
        "heartbeat_interval_s": heartbeat_interval_s,
        "tier": tier,
        "recommended_binary_version": recommended_binary_version,
        "required_binary_version": required_binary_version,
        "autoupdate_drain_extensions": autoupdate_drain_extensions,
        "tier2_session": session,
        "assigned_provider_token": assigned_provider_token,
        "pair_ot": "",
        "claim_url": "",
        "auth_state": auth_state,
        **_catalog_fields(catalog),
        "identity_admission_mode": identity_admission_mode,
        "identity_admission_key_role": identity_admission_key_role,
        "identity_generation": identity_generation,
        "admission_identity_public_key": admission_identity_public_key,
        "admission_identity_previous_valid_until": "",
        **_compatibility_fields(compatibility),
    }
    return outgoing(_omit_empty(fields, *_RESPONSE_OMITEMPTY))


_RESPONSE_OMITEMPTY = (
    "assigned_id",
    "heartbeat_interval_s",
    *_ACK_OMITEMPTY,
    "identity_admission_mode",
    "identity_admission_key_role",
    "identity_generation",
    "admission_identity_public_key",
    "admission_identity_previous_valid_until",
)


def inference_request(
    request_id: str, stream: bool, body: str, settlement: dict[str, Any] | None = None
) -> Outgoing:
    """A plaintext ``inference_request`` (no tier-2 session)."""
    fields: dict[str, Any] = {
        "type": "inference_request",
        "request_id": request_id,
        "stream": stream,
        "body": body,
    }
    if settlement is not None:
        fields["settlement"] = settlement
    return outgoing(fields)


def inference_request_plaintext(body: str) -> str:
    """What an encrypted ``inference_request`` carries inside its envelope."""
    return marshal({"type": "inference_request_plaintext", "body": body})


def encrypted_inference_request(
    request_id: str,
    stream: bool,
    enc: dict[str, Any],
    body: str,
    settlement: dict[str, Any] | None = None,
) -> Outgoing:
    """An encrypted ``inference_request``; ``body`` is only for the view."""
    fields: dict[str, Any] = {
        "type": "inference_request",
        "request_id": request_id,
        "stream": stream,
        "encrypted": True,
        "enc": enc,
    }
    if settlement is not None:
        fields["settlement"] = settlement
    return outgoing(fields, view={"body": body})


def cancel_request(request_id: str, reason: str) -> Outgoing:
    return outgoing({"type": "cancel_request", "request_id": request_id, "reason": reason})


def drain() -> Outgoing:
    return outgoing({"type": "drain"})


def warm_up() -> Outgoing:
    return outgoing({"type": "warm_up"})


def preflight(request_id: str, estimated_tokens: int) -> Outgoing:
    # Go marshals a map here, so the keys come out sorted.
    fields = {"estimated_tokens": estimated_tokens, "request_id": request_id, "type": "preflight"}
    return Outgoing("preflight", marshal(fields), fields)


def rekey_request(
    *,
    rekey_id: str,
    assigned_id: str,
    reason: str,
    old_kid: str,
    coordinator_ecdh_public_key: str,
    expires_at: str,
    response_chunk_plaintext_envelope: bool,
) -> Outgoing:
    return outgoing(
        {
            "type": "aead_rekey_request",
            "version": 1,
            "rekey_id": rekey_id,
            "assigned_id": assigned_id,
            "reason": reason,
            "old_kid": old_kid,
            "coordinator_ecdh_public_key": coordinator_ecdh_public_key,
            "selected_aead": "A256GCM",
            "expires_at": expires_at,
            "response_chunk_plaintext_envelope": response_chunk_plaintext_envelope,
        }
    )


def rekey_proof(
    *,
    rekey_id: str,
    provider_id: str,
    assigned_id: str,
    old_kid: str,
    new_kid: str,
    provider_ecdh_public_key: str,
    coordinator_ecdh_public_key: str,
    expires_at: str,
) -> bytes:
    """The ``aead_rekey_proof`` plaintext both commits carry (``json.Marshal``)."""
    return marshal(
        {
            "type": "aead_rekey_proof",
            "version": 1,
            "rekey_id": rekey_id,
            "provider_id": provider_id,
            "assigned_id": assigned_id,
            "old_kid": old_kid,
            "new_kid": new_kid,
            "provider_ecdh_public_key": provider_ecdh_public_key,
            "coordinator_ecdh_public_key": coordinator_ecdh_public_key,
            "selected_aead": "A256GCM",
            "expires_at": expires_at,
        }
    ).encode()


def rekey_commit(
    *, rekey_id: str, assigned_id: str, old_kid: str, new_kid: str, enc: dict[str, Any]
) -> Outgoing:
    return outgoing(
        {
            "type": "aead_rekey_commit",
            "version": 1,
            "rekey_id": rekey_id,
            "assigned_id": assigned_id,
            "old_kid": old_kid,
            "new_kid": new_kid,
            "encrypted": True,
            "enc": enc,
        }
    )
