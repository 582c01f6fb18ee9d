"""The signed autotune candidate catalog the stub serves, and catalog admission.

The real coordinator loads an operator-curated catalog and serves it at
``GET /v1/autotune-candidates`` with a detached signature at
``GET /v1/autotune-candidates.sig``; providers take the five ``catalog_*``
values of their handshake from it, and the coordinator admits them against
its active release (``internal/autotune/catalog.go``, ``server.go``).

The stub builds its catalog from ``StubConfig.catalog_models``: one row per
model, its ``model_sha256`` computed by :mod:`coordinator_stub.manifest` from
a model directory (or given as a digest). The feed bytes are signed with an
Ed25519 key the stub generates or loads; the sidecar is
``{"alg":"ed25519","key_id":...,"signature":base64std(sig over the feed bytes)}``.

Identity rules ported from Go:

* ``catalog_candidate_sha256`` = SHA-256 of the exact feed bytes;
* ``catalog_row_identity`` = SHA-256 of the framed row fields
  ``"len:field|len:field|..."`` over policy version, row key, model id,
  revision, sha256, ``min_ram_gb``, bandwidth tier, ``"%.6f"`` of
  ``min_sustained_tps``, ``max_4k_ttft_ms`` and runtime status;
* the row of a model is :meth:`CatalogFeed.highest_claimed_tier`: the row
  keyed by the normalised (trimmed, lower-cased) model id, else the row of
  that model with the largest ``min_ram_gb``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import gojson
from .gojson import GoJSONError, GoObject, decode_struct, unmarshal_float, unmarshal_int
from .gojson import unmarshal_string as _string
from .manifest import model_identity
from .rules import SNAPSHOT_MANIFEST_V1, valid_sha256
from .tier2 import ed25519_verify, receipt_key_id

SOURCE: Final = "operator_curated_autotune_candidate_catalog"
RELEASE_ID: Final = "coordinator-stub-catalog-v1"
POLICY_VERSION: Final = "coordinator-stub-policy-v1"
DEFAULT_KEY_ID: Final = "coordinator-stub-autotune-v1"
#: How long the catalog is valid (``catalog_expires_at_unix_ms`` of route snapshots).
VALIDITY: Final = dt.timedelta(days=30)

ROW_KEY_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9._/-]{0,127}")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


class CatalogError(ValueError):
    """A catalog, feed or key the stub cannot build or accept."""


def normalize_model_id(model_id: str) -> str:
    """``normalizeModelID``: trimmed and lower-cased."""
    return model_id.strip().lower()


# ---------------------------------------------------------------------------
# Signing key


class CatalogKey:
    """The Ed25519 key that signs the feed.

    ``public_key_b64`` (standard base64 of the raw 32 bytes) and ``key_id`` are
    what a provider is configured with to trust the stub's feed.
    """

    def __init__(self, private: Ed25519PrivateKey, key_id: str = DEFAULT_KEY_ID) -> None:
        if not key_id or len(key_id) > 128 or any(ord(c) < 0x21 or ord(c) > 0x7E for c in key_id):
            raise CatalogError(f"invalid catalog key id {key_id!r}")
        self.private = private
        self.key_id = key_id
        self.public_key = private.public_key().public_bytes_raw()

    @classmethod
    def generate(cls, key_id: str = DEFAULT_KEY_ID) -> CatalogKey:
        return cls(Ed25519PrivateKey.generate(), key_id)

    @classmethod
    def from_seed(cls, seed: bytes, key_id: str = DEFAULT_KEY_ID) -> CatalogKey:
        if len(seed) != 32:
            raise CatalogError(f"Ed25519 seed must be 32 bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed), key_id)

    @classmethod
    def load(cls, path: str | os.PathLike[str], key_id: str = DEFAULT_KEY_ID) -> CatalogKey:
        """A key file: the 32-byte seed, raw or as standard base64 text."""
        data = Path(path).read_bytes()
        if len(data) != 32:
            try:
                data = base64.b64decode(data.strip(), validate=True)
            except ValueError as exc:
                raise CatalogError(f"{path}: not a 32-byte seed nor base64 of one") from exc
        return cls.from_seed(data, key_id)

    @property
    def public_key_b64(self) -> str:
        return base64.b64encode(self.public_key).decode()

    @property
    def fingerprint(self) -> str:
        """``ed25519-sha256:<hex>`` of the public key (route snapshots carry it)."""
        return receipt_key_id(self.public_key)

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)


# ---------------------------------------------------------------------------
# Rows and the feed


@dataclass(frozen=True, slots=True)
class CatalogRow:
    """One row of the candidate catalog (``autotune.Row``)."""

    model_id: str
    model_revision: str = ""
    model_sha256: str = ""
    min_ram_gb: int = 0
    min_bandwidth_tier: str = ""
    min_sustained_tps: float = 0.0
    max_4k_ttft_ms: int = 0
    runtime_status: str = ""
    has_policy: bool = False

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {"model_id": self.model_id}
        if self.model_revision:
            row["model_revision"] = self.model_revision
        if self.model_sha256:
            row["model_sha256"] = self.model_sha256
        row["min_ram_gb"] = self.min_ram_gb
        row["min_bandwidth_tier"] = self.min_bandwidth_tier
        row["bench_gate"] = {
            "min_sustained_tps": self.min_sustained_tps,
            "max_4k_ttft_ms": self.max_4k_ttft_ms,
            "provenance": {"source": "policy"},
        }
        row["runtime_status"] = self.runtime_status
        return row


def _go_percent_6f(value: float) -> str:
    # fmt.Sprintf("%.6f"): round half to even on the binary value, like C.
    return f"{value:.6f}"


def row_identity(policy_version: str, key: str, row: CatalogRow) -> str:
    """``Catalog.RowIdentity`` for a row without draft/workload policy."""
    if row.has_policy:
        raise CatalogError("rows with draft_candidates/workload_profiles are not supported")
    fields = [
        policy_version,
        key,
        row.model_id,
        row.model_revision,
        row.model_sha256,
        str(row.min_ram_gb),
        row.min_bandwidth_tier,
        _go_percent_6f(row.min_sustained_tps),
        str(row.max_4k_ttft_ms),
        row.runtime_status,
    ]
    framed = "|".join(f"{len(field.encode())}:{field}" for field in fields)
    return hashlib.sha256(framed.encode()).hexdigest()


@dataclass(frozen=True)
class CatalogFeed:
    """A parsed catalog: the exact feed bytes and what admission reads from them."""

    raw: bytes
    version: str
    policy_version: str
    rows: Mapping[str, CatalogRow]
    generated_at: str = ""

    @property
    def sha256(self) -> str:
        """``catalog_candidate_sha256``: SHA-256 of the exact feed bytes."""
        return hashlib.sha256(self.raw).hexdigest()

    def highest_claimed_tier(self, model_id: str) -> tuple[str, CatalogRow] | None:
        """``HighestClaimedTier``: the row a provider of ``model_id`` is held to."""
        normalized = normalize_model_id(model_id)
        if normalized in self.rows:
            return normalized, self.rows[normalized]
        keys = [k for k, row in self.rows.items() if normalize_model_id(row.model_id) == normalized]
        if not keys:
            return None
        best = min(keys, key=lambda k: (-self.rows[k].min_ram_gb, k))
        return best, self.rows[best]

    def row_identity(self, key: str) -> str:
        return row_identity(self.policy_version, key, self.rows[key])

    def expected_model_hash(self, model_id: str) -> str | None:
        """The row's ``model_sha256`` for ``model_id`` (``None``: uncatalogued)."""
        found = self.highest_claimed_tier(model_id)
        if found is None or not found[1].model_sha256:
            return None
        return found[1].model_sha256


def _row(value: Any, key: str) -> CatalogRow:
    try:
        fields = decode_struct(
            value,
            {
                "model_id": _string,
                "model_revision": _string,
                "model_sha256": _string,
                "min_ram_gb": unmarshal_int,
                "min_bandwidth_tier": _string,
                "bench_gate": lambda v: decode_struct(
                    v,
                    {"min_sustained_tps": unmarshal_float, "max_4k_ttft_ms": unmarshal_int},
                    "BenchGate",
                ),
                "runtime_status": _string,
                "draft_candidates": lambda v: v,
                "workload_profiles": lambda v: v,
            },
            "Row",
        )
    except GoJSONError as exc:
        raise CatalogError(f"parse autotune candidate catalog: {exc}") from None
    gate = fields.pop("bench_gate", {})
    policy = fields.pop("draft_candidates", None) is not None
    policy = fields.pop("workload_profiles", None) is not None or policy
    row = CatalogRow(
        min_sustained_tps=gate.get("min_sustained_tps", 0.0),
        max_4k_ttft_ms=gate.get("max_4k_ttft_ms", 0),
        has_policy=policy,
        **{"model_id": "", **fields},
    )
    if not row.model_id.strip():
        raise CatalogError(f"autotune candidate catalog row {key!r} model_id is required")
    if row.min_ram_gb < 0:
        raise CatalogError(f"autotune candidate catalog row {key!r} min_ram_gb must be >= 0")
    if row.min_sustained_tps < 0:
        raise CatalogError(f"autotune candidate catalog row {key!r} min_sustained_tps is invalid")
    if row.max_4k_ttft_ms < 0:
        raise CatalogError(f"autotune candidate catalog row {key!r} max_4k_ttft_ms must be >= 0")
    return row


def parse_feed(raw: bytes) -> CatalogFeed:
    """``autotune.ParseCatalog``: the coordinator's reading of a feed."""
    if not raw:
        raise CatalogError("autotune candidate catalog is empty")
    try:
        value = gojson.loads(raw)
        envelope = decode_struct(
            value,
            {
                "version": _string,
                "policy_version": _string,
                "generated_at": _string,
                "source": _string,
                "rows": lambda v: v,
            },
            "catalogEnvelope",
        )
    except GoJSONError as exc:
        raise CatalogError(f"parse autotune candidate catalog: {exc}") from None
    if envelope.get("source", "") != SOURCE:
        raise CatalogError(f"autotune candidate catalog source must be {SOURCE!r}")
    version = envelope.get("version", "")
    if not version.strip():
        raise CatalogError("autotune candidate catalog version is required")
    policy_version = envelope.get("policy_version", "")
    if not policy_version.strip():
        policy_version = "legacy-spec-023"
    rows_value = envelope.get("rows")
    if rows_value is not None and not isinstance(rows_value, GoObject):
        raise CatalogError("parse autotune candidate catalog: rows must be an object")
    rows: dict[str, CatalogRow] = {}
    for key, row_value in (rows_value or GoObject([])).items():
        rows[key] = _row(row_value, key)
    if not rows:
        raise CatalogError("autotune candidate catalog rows are required")
    for key in list(rows):
        if not key.strip():
            raise CatalogError("autotune candidate catalog row key is required")
    return CatalogFeed(raw, version, policy_version, rows, envelope.get("generated_at", ""))


def signature_sidecar(key: CatalogKey, raw: bytes) -> bytes:
    """The ``.sig`` document for ``raw``."""
    document = {
        "alg": "ed25519",
        "key_id": key.key_id,
        "signature": base64.b64encode(key.sign(raw)).decode(),
    }
    return json.dumps(document, separators=(",", ":")).encode()


def verify_sidecar(raw: bytes, sidecar: bytes, trusted: Mapping[str, bytes]) -> str:
    """The signer key id of a valid ``.sig`` over ``raw``; :class:`CatalogError` otherwise."""
    try:
        fields = decode_struct(
            gojson.loads(sidecar),
            {"alg": _string, "key_id": _string, "signature": _string},
            "catalogSignature",
        )
    except GoJSONError as exc:
        raise CatalogError(f"parse catalog signature: {exc}") from None
    if fields.get("alg", "").lower() != "ed25519":
        raise CatalogError("catalog signature alg must be ed25519")
    key_id = fields.get("key_id", "")
    public = trusted.get(key_id)
    if public is None:
        raise CatalogError(f"catalog signature key {key_id!r} is not trusted")
    try:
        signature = base64.b64decode(fields.get("signature", ""), validate=True)
    except ValueError:
        raise CatalogError("catalog signature is not base64") from None
    if not ed25519_verify(public, raw, signature):
        raise CatalogError("catalog signature does not verify")
    return key_id


# ---------------------------------------------------------------------------
# Building the stub's own catalog


def resolve_model_sha256(value: str) -> str:
    """A configured model: a 64-hex digest as is (lower-cased), else a path to hash."""
    if _HEX64.fullmatch(value):
        return value.lower()
    return model_identity(value)[1]


def build_rows(models: Mapping[str, str]) -> dict[str, CatalogRow]:
    """One row per ``model_id -> directory or sha256``, keyed by the normalised id."""
    rows: dict[str, CatalogRow] = {}
    for model_id, source in models.items():
        key = normalize_model_id(model_id)
        if not ROW_KEY_PATTERN.fullmatch(key):
            raise CatalogError(
                f"catalog model id {model_id!r} does not make a row key "
                f"(^[a-z0-9][a-z0-9._/-]{{0,127}}$ after lower-casing)"
            )
        if key in rows:
            raise CatalogError(f"catalog model id {model_id!r} is listed twice")
        sha = resolve_model_sha256(source)
        if not valid_sha256(sha):
            raise CatalogError(f"catalog model {model_id!r}: invalid sha256 {sha!r}")
        rows[key] = CatalogRow(
            model_id=model_id,
            # The stub has no Hugging Face revision for a local directory;
            # the row carries the first 40 hex digits of the digest instead.
            model_revision=sha[:40],
            model_sha256=sha,
            min_ram_gb=1,
            min_bandwidth_tier="C",
            min_sustained_tps=1.0,
            max_4k_ttft_ms=600_000,
            runtime_status="recommendable",
        )
    return rows


def build_feed(
    rows: Mapping[str, CatalogRow],
    *,
    version: str = RELEASE_ID,
    policy_version: str = POLICY_VERSION,
    generated_at: dt.datetime | None = None,
) -> CatalogFeed:
    """The feed bytes for ``rows`` (compact JSON, keys in a fixed order)."""
    when = (generated_at or dt.datetime.now(dt.UTC)).replace(microsecond=0)
    stamp = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    document = {
        "version": version,
        "policy_version": policy_version,
        "generated_at": stamp,
        "source": SOURCE,
        "rows": {key: rows[key].to_json() for key in sorted(rows)},
    }
    raw = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
    feed = parse_feed(raw)
    assert dict(feed.rows) == dict(rows), "feed does not round-trip"
    return feed


@dataclass(frozen=True)
class Catalog:
    """The stub's active catalog: the feed, its signature and the signing key."""

    feed: CatalogFeed
    key: CatalogKey
    signature: bytes
    expires_at_unix_ms: int

    @classmethod
    def create(cls, models: Mapping[str, str], key: CatalogKey) -> Catalog:
        now = dt.datetime.now(dt.UTC)
        feed = build_feed(build_rows(models), generated_at=now)
        expires = int((now + VALIDITY).timestamp() * 1000)
        return cls(feed, key, signature_sidecar(key, feed.raw), expires)

    @property
    def release_id(self) -> str:
        return self.feed.version

    @property
    def signer_key_id(self) -> str:
        return self.key.key_id

    def handshake_fields(self, model_id: str) -> dict[str, str] | None:
        """The five ``catalog_*`` values a provider of ``model_id`` must send."""
        found = self.feed.highest_claimed_tier(model_id)
        if found is None:
            return None
        return {
            "catalog_release_id": self.feed.version,
            "catalog_policy_version": self.feed.policy_version,
            "catalog_candidate_sha256": self.feed.sha256,
            "catalog_signer_key_id": self.key.key_id,
            "catalog_row_identity": self.feed.row_identity(found[0]),
        }

    def ack_fields(self) -> dict[str, str]:
        """What ``hello_ack``/``auth_response`` echo of the active release."""
        return {
            "release_id": self.feed.version,
            "policy_version": self.feed.policy_version,
            "candidate_sha256": self.feed.sha256,
            "signer_key_id": self.key.key_id,
        }


#: Outcomes of :func:`admit`.
CATALOG_NOT_REQUIRED: Final = "not_required"
CATALOG_LEGACY: Final = "legacy"
CATALOG_COMPATIBLE: Final = "compatible"


def admit(catalog: Catalog | None, model_id: str, sent: Mapping[str, str]) -> str:
    """Catalog admission of a handshake's five ``catalog_*`` values.

    Returns :data:`CATALOG_NOT_REQUIRED` (the stub has no catalog),
    :data:`CATALOG_LEGACY` (none sent: admitted, not routable) or
    :data:`CATALOG_COMPATIBLE`; raises :class:`CatalogError` for a partial or
    mismatching set (the coordinator closes 4001 ``catalog_incompatible``).
    """
    if catalog is None:
        return CATALOG_NOT_REQUIRED
    values = [sent.get(name, "") for name in _HANDSHAKE_FIELDS]
    if not any(values):
        return CATALOG_LEGACY
    if not all(values):
        raise CatalogError("catalog metadata must be sent all five or none")
    expected = catalog.handshake_fields(model_id)
    if expected is None:
        raise CatalogError(f"model {model_id!r} has no catalog row")
    for name in _HANDSHAKE_FIELDS:
        if sent.get(name, "") != expected[name]:
            raise CatalogError(f"{name} does not match the active catalog")
    return CATALOG_COMPATIBLE


_HANDSHAKE_FIELDS: Final = (
    "catalog_release_id",
    "catalog_policy_version",
    "catalog_candidate_sha256",
    "catalog_signer_key_id",
    "catalog_row_identity",
)


def model_hash_status(
    catalog: Catalog | None, model_id: str, model_hash: str, algorithm: str
) -> str:
    """``verifyProviderModelIdentity``: the provider's hash against its catalog row.

    ``invalid`` (an algorithm other than snapshot-manifest.v1, a malformed
    digest, or a digest without its algorithm), ``uncatalogued`` (no hash, or
    no row), ``catalog_unavailable`` (the stub has no catalog), ``verified``
    or ``mismatch``.
    """
    if algorithm and (algorithm != SNAPSHOT_MANIFEST_V1 or not valid_sha256(model_hash)):
        return "invalid"
    if not model_hash:
        return "uncatalogued"
    if not algorithm:
        return "invalid"
    if catalog is None:
        return "catalog_unavailable"
    expected = catalog.feed.expected_model_hash(model_id)
    if expected is None:
        return "uncatalogued"
    return "verified" if expected.lower() == model_hash.lower() else "mismatch"
