"""Catalog admission: the coordinator's signed autotune feed and our model's row in it.

A production coordinator routes only providers that send the five
``catalog_*`` fields of its active autotune catalog release. They come from
``GET /v1/autotune-candidates`` and its detached signature
``GET /v1/autotune-candidates.sig`` on the coordinator's HTTPS origin:

- the sidecar is exactly ``{"key_id", "alg": "ed25519", "signature"}``, the
  signature canonical standard base64 of 64 bytes, the key id one of the
  trusted keys (``catalog_public_keys``; the production keys by default);
- the signature is Ed25519 over the feed's exact bytes;
- the feed is a JSON object with a non-empty ``version`` (the release id),
  ``policy_version`` (``legacy-spec-023`` when empty), ``rows`` keyed by
  catalog key, and ``generated_at`` not in the future and not older than 30
  days (the official provider's freshness rule), when present.

The row is the coordinator's ``HighestClaimedTier(model_id)``: the row keyed
by the lowercased model id, else the row whose ``model_id`` matches with the
highest ``min_ram_gb`` (ties: smallest key). ``catalog_row_identity`` is the
coordinator's ``Catalog.RowIdentity`` (ported below), ``catalog_candidate_sha256``
the SHA-256 of the feed bytes. The row's ``model_sha256`` is the model hash the
coordinator will require: a different local hash means connected but never
routed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from provider.coordinator.canonical import canonical_sha256

__all__ = [
    "PRODUCTION_PUBLIC_KEYS",
    "CatalogAdmission",
    "CatalogError",
    "admission_for",
    "default_feed_url",
    "fetch_admission",
    "row_identity",
    "select_row",
    "verify_feed",
]

#: ``autotune.public_keys`` of the production coordinator (dist/coordinator.yaml).
PRODUCTION_PUBLIC_KEYS: dict[str, str] = {
    "streamvc-autotune-static-v4": "zTKDIdMmKKkO1Cgf5OdTzMOytVqW7U8SGsJ9XrzAltU=",
    "streamvc-autotune-static-v5": "vpTgWfvvrnbc1QhdTAxULFisoDU7jQ4mB1yZIHIGjBA=",
}
FEED_PATH = "/v1/autotune-candidates"
LEGACY_POLICY_VERSION = "legacy-spec-023"
MAX_FEED_AGE = timedelta(days=30)
MAX_FEED_SKEW = timedelta(minutes=10)
MAX_FEED_BYTES = 4 * 1024 * 1024


class CatalogError(Exception):
    """The feed cannot be used; the message says what is wrong."""


@dataclass(frozen=True)
class CatalogAdmission:
    """The five ``catalog_*`` fields for one model, and the hash its row requires."""

    release_id: str
    policy_version: str
    signer_key_id: str
    candidate_sha256: str
    row_identity: str
    row_key: str
    model_sha256: str | None

    def fields(self) -> dict[str, str]:
        return {
            "catalog_release_id": self.release_id,
            "catalog_policy_version": self.policy_version,
            "catalog_signer_key_id": self.signer_key_id,
            "catalog_candidate_sha256": self.candidate_sha256,
            "catalog_row_identity": self.row_identity,
        }


def _std_b64(text: Any, size: int, what: str) -> bytes:
    if not isinstance(text, str):
        raise CatalogError(f"{what} is not a string")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CatalogError(f"{what} is not standard base64") from None
    if len(raw) != size or base64.b64encode(raw).decode() != text:
        raise CatalogError(f"{what} is not the canonical base64 of {size} bytes")
    return raw


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise CatalogError("duplicate keys in JSON")
    return dict(pairs)


def _strict_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{what} is not valid JSON: {exc}") from None


def verify_feed(
    feed: bytes, sidecar: bytes, public_keys: dict[str, str], *, now: datetime | None = None
) -> tuple[dict[str, Any], str]:
    """Check the signature and the shape of a candidate catalog; returns it and the signer."""
    sig = _strict_json(sidecar, "the signature sidecar")
    if not isinstance(sig, dict) or set(sig) != {"key_id", "alg", "signature"}:
        raise CatalogError("the signature sidecar must hold exactly key_id, alg and signature")
    key_id = sig["key_id"]
    if not isinstance(key_id, str) or key_id != key_id.strip() or not key_id:
        raise CatalogError("the signature sidecar's key_id is not a key id")
    if key_id not in public_keys:
        raise CatalogError(
            f"the feed is signed with {key_id!r}, which is not a trusted key "
            f"({', '.join(sorted(public_keys)) or 'none configured'})"
        )
    if sig["alg"] != "ed25519":
        raise CatalogError(f"the signature algorithm is {sig['alg']!r}, not ed25519")
    signature = _std_b64(sig["signature"], 64, "the signature")
    public = _std_b64(public_keys[key_id], 32, f"trusted key {key_id}")
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, feed)
    except InvalidSignature:
        raise CatalogError(f"the feed's signature does not verify with {key_id}") from None
    catalog = _strict_json(feed, "the feed")
    if not isinstance(catalog, dict):
        raise CatalogError("the feed is not a JSON object")
    version = catalog.get("version")
    if not isinstance(version, str) or not version.strip():
        raise CatalogError("the feed has no version (release id)")
    rows = catalog.get("rows")
    if not isinstance(rows, dict) or not rows:
        raise CatalogError("the feed has no rows")
    generated = catalog.get("generated_at")
    if generated is not None:
        try:
            when = datetime.fromisoformat(str(generated).replace("Z", "+00:00"))
        except ValueError:
            raise CatalogError(f"the feed's generated_at {generated!r} is not a time") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        now = now or datetime.now(UTC)
        if when > now + MAX_FEED_SKEW:
            raise CatalogError(f"the feed's generated_at {generated} is in the future")
        if now - when > MAX_FEED_AGE:
            raise CatalogError(f"the feed's generated_at {generated} is older than 30 days")
    return catalog, key_id


def select_row(catalog: dict[str, Any], model_id: str) -> tuple[str, dict[str, Any]] | None:
    """``HighestClaimedTier``: the row the coordinator holds this model to."""
    rows: dict[str, Any] = catalog["rows"]
    normalized = model_id.strip().lower()
    if isinstance(rows.get(normalized), dict):
        return normalized, rows[normalized]
    best: tuple[str, dict[str, Any]] | None = None
    for key, row in rows.items():
        if not isinstance(row, dict):
            continue
        if str(row.get("model_id", "")).strip().lower() != normalized:
            continue
        ram = _int(row.get("min_ram_gb"))
        if best is None:
            best = (key, row)
            continue
        best_ram = _int(best[1].get("min_ram_gb"))
        if ram > best_ram or (ram == best_ram and key < best[0]):
            best = (key, row)
    return best


def _int(value: Any) -> int:
    """Go decodes a missing int as 0 and refuses a fraction."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise CatalogError(f"{value!r} is not an integer")
    return value


def _float(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CatalogError(f"{value!r} is not a number")
    return float(value)


def _str(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CatalogError(f"{value!r} is not a string")
    return value


def _nullable_float(value: Any) -> float | None:
    return None if value is None else _float(value)


def _policy_value(row: dict[str, Any]) -> dict[str, Any]:
    """The typed policy the coordinator binds (``Row.policyDigest``): Go's zero values
    for missing fields, optional ones only when present."""
    policy: dict[str, Any] = {}
    drafts = row.get("draft_candidates")
    if drafts is not None:
        if not isinstance(drafts, list):
            raise CatalogError("draft_candidates is not a list")
        policy["draft_candidates"] = [
            {
                "draft_model": _str(d.get("draft_model")),
                "draft_model_artifact_sha256": _str(d.get("draft_model_artifact_sha256")),
            }
            for d in (x if isinstance(x, dict) else {} for x in drafts)
        ]
    workloads = row.get("workload_profiles")
    if workloads is not None:
        if not isinstance(workloads, dict):
            raise CatalogError("workload_profiles is not an object")
        out: dict[str, Any] = {}
        for workload, tiers in workloads.items():
            tiers = tiers if isinstance(tiers, dict) else {}
            out[workload] = {tier: _profile_value(p) for tier, p in tiers.items()}
        policy["workload_profiles"] = out
    return policy


def _profile_value(profile: Any) -> dict[str, Any]:
    profile = profile if isinstance(profile, dict) else {}
    gate = profile.get("gate_policy") or {}
    metrics = profile.get("profile_metrics") or {}
    value: dict[str, Any] = {
        "gate_policy": {
            "min_samples": _int(gate.get("min_samples")),
            "max_p95_ttft_ms": _int(gate.get("max_p95_ttft_ms")),
            "max_stop_token_leak_rate": _float(gate.get("max_stop_token_leak_rate")),
            "min_median_tps": _nullable_float(gate.get("min_median_tps")),
        },
        "profile_metrics": {
            "median_tps": _nullable_float(metrics.get("median_tps")),
            "p95_ttft_ms": _nullable_float(metrics.get("p95_ttft_ms")),
            "stop_token_leak_rate": _nullable_float(metrics.get("stop_token_leak_rate")),
            "spec_decode_acceptance_rate": _nullable_float(
                metrics.get("spec_decode_acceptance_rate")
            ),
            "sample_count": _int(metrics.get("sample_count")),
        },
        "source": _str(profile.get("source")),
    }
    for name in ("status", "no_winner_reason", "candidate_source"):
        if profile.get(name) is not None:
            value[name] = _str(profile[name])
    recommended = profile.get("recommended")
    if isinstance(recommended, dict):
        rec: dict[str, Any] = {
            "kv_bits": _int(recommended.get("kv_bits")),
            "max_context_override": _int(recommended.get("max_context_override")),
            "max_concurrency_override": _int(recommended.get("max_concurrency_override")),
        }
        for name in ("draft_model", "draft_model_artifact_sha256"):
            if recommended.get(name) is not None:
                rec[name] = _str(recommended[name])
        if recommended.get("num_draft_tokens") is not None:
            rec["num_draft_tokens"] = _int(recommended["num_draft_tokens"])
        value["recommended"] = rec
    return value


def row_identity(policy_version: str, key: str, row: dict[str, Any]) -> str:
    """The coordinator's ``Catalog.RowIdentity``: SHA-256 of ``len:field`` framed by ``|``."""
    gate = row.get("bench_gate") or {}
    fields = [
        policy_version,
        key,
        _str(row.get("model_id")),
        _str(row.get("model_revision")),
        _str(row.get("model_sha256")),
        str(_int(row.get("min_ram_gb"))),
        _str(row.get("min_bandwidth_tier")),
        f"{_float(gate.get('min_sustained_tps')):.6f}",
        str(_int(gate.get("max_4k_ttft_ms"))),
        _str(row.get("runtime_status")),
    ]
    policy = _policy_value(row)
    if policy:
        fields.append("policy:" + canonical_sha256(policy))
    framed = "|".join(f"{len(f.encode())}:{f}" for f in fields)
    return hashlib.sha256(framed.encode()).hexdigest()


def admission_for(
    feed: bytes,
    sidecar: bytes,
    model_id: str,
    public_keys: dict[str, str],
    *,
    now: datetime | None = None,
) -> CatalogAdmission:
    """Verify the feed and derive ``model_id``'s admission fields; CatalogError if none."""
    catalog, signer = verify_feed(feed, sidecar, public_keys, now=now)
    policy = str(catalog.get("policy_version") or "").strip() or LEGACY_POLICY_VERSION
    selected = select_row(catalog, model_id)
    if selected is None:
        raise CatalogError(
            f"the catalog (release {catalog['version']}) has no row for model {model_id!r}; "
            "serve a catalogued model (set model_id to its Hugging Face id)"
        )
    key, row = selected
    sha = row.get("model_sha256")
    return CatalogAdmission(
        release_id=str(catalog["version"]),
        policy_version=policy,
        signer_key_id=signer,
        candidate_sha256=hashlib.sha256(feed).hexdigest(),
        row_identity=row_identity(policy, key, row),
        row_key=key,
        model_sha256=sha if isinstance(sha, str) and sha else None,
    )


def default_feed_url(coordinator_url: str) -> str:
    """``wss://HOST[:PORT]/...`` -> ``https://HOST[:PORT]/v1/autotune-candidates``."""
    parts = urllib.parse.urlsplit(coordinator_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return urllib.parse.urlunsplit((scheme, parts.netloc, FEED_PATH, "", ""))


async def fetch_admission(
    url: str,
    model_id: str,
    public_keys: dict[str, str],
    *,
    timeout: float = 10.0,
) -> CatalogAdmission:
    """GET the feed and its ``.sig`` (no proxy, no redirects) and derive the admission."""
    import aiohttp  # here: only the agent and doctor fetch

    client_timeout = aiohttp.ClientTimeout(total=timeout)
    try:
        async with aiohttp.ClientSession(timeout=client_timeout, trust_env=False) as http:
            bodies = []
            for target in (url, url + ".sig"):
                async with http.get(target, allow_redirects=False) as response:
                    if response.status != 200:
                        raise CatalogError(f"GET {target}: HTTP {response.status}")
                    body = await response.content.read(MAX_FEED_BYTES + 1)
                    if len(body) > MAX_FEED_BYTES:
                        raise CatalogError(f"GET {target}: larger than {MAX_FEED_BYTES} bytes")
                    bodies.append(body)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise CatalogError(f"cannot fetch {url}: {type(exc).__name__}: {exc}") from None
    return admission_for(bodies[0], bodies[1], model_id, public_keys)
