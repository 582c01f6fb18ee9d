"""Provider credentials: tokens, self-mint, credential bootstrap and admission identities.

The coordinator's rules (COORDINATOR.md sections 0 and 1.3-1.5), as plain
state with the clock passed in:

* the upgrade's ``Authorization`` header must be ``Bearer <token>`` or
  absent; a bearer must be known; no header is refused unless tokens are
  optional or tokenless admission is allowed (4005 ``invalid_token``);
* a token minted for a provider id (self-mint or bootstrap) is bound to it;
  operator tokens (``StubConfig.tokens``) are valid for any provider id;
* tokenless, non-bootstrap admission mints a token (``self_minted``, not
  routable) unless the provider id already has an active token (4005);
* credential bootstrap checks the referral code, rate limits, mints a
  provisional token valid for 600 s until first use, and records the
  receipt key as the provider's durable admission identity: from then on its
  v2 handshakes must carry an identity signature made with that key, and v1
  is refused;
* a bearer-validated v2 handshake that offers ``provider_admission_public_key``
  enrols it as the durable identity (the signature is then required).
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

BOOTSTRAP_TOKEN_TTL_S: Final = 600.0
#: Credential bootstrap rate limits per hour (per IP, per provider id, global).
BOOTSTRAP_LIMITS: Final = (8, 3, 128)
HOUR: Final = 3600.0

AUTH_BEARER_VALIDATED: Final = "bearer_validated"
AUTH_SELF_MINTED: Final = "self_minted"
AUTH_BEARERLESS_DUPLICATE: Final = "bearerless_duplicate"


class CredentialRefusal(Exception):
    """A credential the coordinator refuses: close ``code`` with ``reason``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class MintedToken:
    """A token the coordinator minted for one provider id."""

    provider_id: str
    kind: str  # "self_minted" or "bootstrap"
    created: float
    confirmed: bool = False


@dataclass
class Identity:
    """A provider's durable admission identity (an Ed25519 public key)."""

    public_key: bytes
    generation: int = 1
    source: str = "bootstrap"


@dataclass
class Credentials:
    """Token and identity state of the stub's coordinator.

    Args:
        operator_tokens: Tokens valid for any provider id.
        require_tokens: ``provider_auth.require_provider_tokens``.
        allow_tokenless: ``allow_tokenless_provisional_bootstrap``: tokenless
            connections may self-mint or bootstrap.
        referral_codes: Codes accepted for credential bootstrap.
        require_referral: ``referrals.require_for_registration``.
    """

    operator_tokens: set[str] = field(default_factory=set)
    require_tokens: bool = False
    allow_tokenless: bool = True
    referral_codes: frozenset[str] = frozenset()
    require_referral: bool = False
    minted: dict[str, MintedToken] = field(default_factory=dict)
    identities: dict[str, Identity] = field(default_factory=dict)
    _bootstraps: tuple[dict[str, deque[float]], dict[str, deque[float]], deque[float]] = field(
        default_factory=lambda: ({}, {}, deque())
    )

    @classmethod
    def create(
        cls,
        tokens: Iterable[str],
        *,
        require_tokens: bool,
        allow_tokenless: bool,
        referral_codes: Iterable[str],
        require_referral: bool,
    ) -> Credentials:
        return cls(
            operator_tokens=set(tokens),
            require_tokens=require_tokens,
            allow_tokenless=allow_tokenless,
            referral_codes=frozenset(referral_codes),
            require_referral=require_referral,
        )

    @property
    def gated(self) -> bool:
        """Whether a bearer is checked at all (tokens required, or some configured)."""
        return self.require_tokens or bool(self.operator_tokens)

    # ------------------------------------------------------------------
    # The upgrade

    def check_upgrade(self, authorization: str | None) -> str | None:
        """``validateProviderToken``: the bearer token, or ``None`` for a tokenless upgrade.

        Raises :class:`CredentialRefusal` (4005 ``invalid_token``).
        """
        if authorization is None:
            if self.gated and not self.allow_tokenless:
                raise CredentialRefusal(4005, "invalid_token")
            return None
        token = authorization[len("Bearer ") :].strip()
        if not authorization.startswith("Bearer ") or not token:
            if not self.gated:
                # Go refuses this too (4005), but a stub without tokens has
                # always let it through; the endpoint logs it.
                return None
            raise CredentialRefusal(4005, "invalid_token")
        if self.gated and token not in self.operator_tokens and token not in self.minted:
            raise CredentialRefusal(4005, "invalid_token")
        return token

    # ------------------------------------------------------------------
    # Registration

    def active_token_for(self, provider_id: str) -> str | None:
        for token, minted in self.minted.items():
            if minted.provider_id == provider_id:
                return token
        return None

    def validate(self, provider_id: str, token: str | None, now: float) -> str:
        """The ``auth_state`` of a registration, or :class:`CredentialRefusal`.

        A bearer is ``bearer_validated`` (a minted one only for its own
        provider id; a bootstrap token only within its TTL before first use,
        then confirmed). Tokenless registrations are ``""`` when tokens are
        not required, else they self-mint (see :meth:`self_mint`).
        """
        if token is None:
            return ""
        minted = self.minted.get(token)
        if minted is None:
            if self.gated and token not in self.operator_tokens:
                raise CredentialRefusal(4005, "invalid_token")
            return AUTH_BEARER_VALIDATED if self.gated else ""
        if minted.provider_id != provider_id:
            raise CredentialRefusal(4005, "invalid_token")
        if minted.kind == "bootstrap" and not minted.confirmed:
            if now - minted.created > BOOTSTRAP_TOKEN_TTL_S:
                del self.minted[token]
                raise CredentialRefusal(4005, "bootstrap_token_expired")
        minted.confirmed = True
        return AUTH_BEARER_VALIDATED

    def needs_self_mint(self, token: str | None) -> bool:
        """A tokenless, non-bootstrap registration where tokens are required."""
        return token is None and self.gated

    def self_mint(self, provider_id: str, now: float) -> str:
        """Mint a token bound to ``provider_id`` (trust on first use)."""
        if not self.allow_tokenless:
            raise CredentialRefusal(4005, "invalid_token")
        if self.active_token_for(provider_id) is not None or provider_id in self.identities:
            raise CredentialRefusal(4005, "invalid_token")
        token = secrets.token_hex(32)
        self.minted[token] = MintedToken(provider_id, "self_minted", now)
        return token

    def issue(self) -> str:
        """The dev knob ``issue_provider_token``: a token valid for any provider id."""
        token = "ptok_" + secrets.token_urlsafe(24)
        self.operator_tokens.add(token)
        return token

    # ------------------------------------------------------------------
    # Credential bootstrap

    def check_referral(self, code: str) -> None:
        if not code:
            if self.require_referral:
                raise CredentialRefusal(4005, "referral_required")
            return
        if self.referral_codes and code not in self.referral_codes:
            raise CredentialRefusal(4005, "referral_invalid")
        if not self.referral_codes and self.require_referral:
            raise CredentialRefusal(4005, "referral_invalid")

    def take_bootstrap_slot(self, remote_ip: str, provider_id: str, now: float) -> bool:
        """Count a bootstrap against the hourly limits; ``False`` when one is exceeded."""
        per_ip, per_provider, overall = self._bootstraps
        windows = (
            per_ip.setdefault(remote_ip, deque()),
            per_provider.setdefault(provider_id, deque()),
            overall,
        )
        for window in windows:
            while window and now - window[0] >= HOUR:
                window.popleft()
        if any(len(w) >= limit for w, limit in zip(windows, BOOTSTRAP_LIMITS, strict=True)):
            return False
        for window in windows:
            window.append(now)
        return True

    def mint_bootstrap(
        self, provider_id: str, receipt_key: bytes, referral_code: str, now: float
    ) -> str:
        """Mint the provisional token of a successful bootstrap.

        Raises :class:`CredentialRefusal` (4005 and the bootstrap reason).
        """
        self.check_referral(referral_code)
        identity = self.identities.get(provider_id)
        if identity is not None and identity.public_key != receipt_key:
            raise CredentialRefusal(4005, "bootstrap_identity_mismatch")
        for token, minted in list(self.minted.items()):
            if minted.provider_id == provider_id:
                del self.minted[token]
        token = secrets.token_hex(32)
        self.minted[token] = MintedToken(provider_id, "bootstrap", now)
        self.identities[provider_id] = Identity(receipt_key, 1, "bootstrap")
        return token

    def enroll(self, provider_id: str, public_key: bytes) -> Identity:
        identity = Identity(public_key, 1, "enrollment")
        self.identities[provider_id] = identity
        return identity
