"""The v2 handshake's proofs: transcript hash, identity signature, acceptance checks. Pure.

``auth_request`` (initial) -> ``auth_challenge`` -> ``auth_request`` (proof)
-> ``auth_response``. What the proof proves:

- ``identity_signature_transcript_sha256`` = standard base64 of SHA-256 over
  the canonical JSON of the initial request *as sent* (the coordinator
  decodes the bytes it received and canonicalises them; so do we);
- ``identity_signature`` = Ed25519 over the canonical JSON of
  ``{auth_attempt_id, provider_id, binary_version, provider_ecdh_public_key,
  transcript_sha256}``; for a credential bootstrap the tuple also holds the
  whole ``challenge`` (as received) and ``credential_bootstrap: true``, and is
  signed with the receipt key.

The key: the one whose public key the challenge names
(``admission_identity_public_key``) when it names one; else the bootstrap's
receipt key; else the admission key, or the receipt key, which the
coordinator accepts from a provider it has no identity on file for.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from provider.coordinator.canonical import canonical_json, loads
from provider.coordinator.messages import AuthResponse
from provider.coordinator.tier2 import AEAD_SUITE

__all__ = [
    "bootstrap_tuple",
    "check_accepted",
    "identity_tuple",
    "sign",
    "transcript_sha256",
]


def transcript_sha256(initial: str | bytes) -> str:
    """Standard base64 of SHA-256 over the canonical form of the initial request's bytes."""
    digest = hashlib.sha256(canonical_json(loads(initial))).digest()
    return base64.b64encode(digest).decode()


def identity_tuple(
    *,
    auth_attempt_id: str,
    provider_id: str,
    binary_version: str,
    provider_ecdh_public_key: str,
    transcript: str,
) -> dict[str, Any]:
    return {
        "auth_attempt_id": auth_attempt_id,
        "provider_id": provider_id,
        "binary_version": binary_version,
        "provider_ecdh_public_key": provider_ecdh_public_key,
        "transcript_sha256": transcript,
    }


def bootstrap_tuple(challenge: dict[str, Any], **fields: str) -> dict[str, Any]:
    """The credential-bootstrap variant: the challenge as received, and the flag."""
    return identity_tuple(**fields) | {"challenge": challenge, "credential_bootstrap": True}


def sign(key: Ed25519PrivateKey, value: dict[str, Any]) -> str:
    """Standard base64 of the Ed25519 signature over ``value``'s canonical JSON."""
    return base64.b64encode(key.sign(canonical_json(value))).decode()


def check_accepted(response: AuthResponse, kid: str) -> str | None:
    """Why an accepted ``auth_response`` cannot be used, or None (the official
    provider's checks: the leg is on, A256GCM, and the same key id)."""
    if response.tier2_session is None:
        return "auth_response has no tier2_session"
    leg = response.tier2_session.encrypted_leg
    if not leg.enabled:
        return "the coordinator did not enable the encrypted leg"
    if leg.alg != AEAD_SUITE:
        return f"the coordinator selected {leg.alg!r}, not {AEAD_SUITE}"
    if leg.kid != kid:
        return "the coordinator's key id differs from ours: the key exchange failed"
    if not response.assigned_id:
        return "auth_response has no assigned_id"
    return None
