"""Catalog admission: the signed autotune feed, the row, its identity, the fetch."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from provider.coordinator import catalog as cat
from provider.coordinator.receipts import public_key_bytes

SIGNER = Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)
KEYS = {"test-key-v1": base64.b64encode(public_key_bytes(SIGNER)).decode()}
NOW = datetime(2026, 7, 11, 12, 0, tzinfo=UTC)


def feed(**overrides: Any) -> bytes:
    doc = {
        "version": "published-2026-07-10",
        "policy_version": "autotune-policy-v1",
        "generated_at": "2026-07-10T00:00:00Z",
        "source": "operator_curated_autotune_candidate_catalog",
        "rows": {
            "qwen3-32b": {
                "model_id": "mlx-community/Qwen3-32B-4bit",
                "model_revision": "bcaaf7f538adf166c1080a2befdb4f6019f66639",
                "model_sha256": "69169cceb643f108755f96dba26d8647862e38a7f82cb1b5b25aff8f204967aa",
                "min_ram_gb": 24,
                "min_bandwidth_tier": "B",
                "bench_gate": {"min_sustained_tps": 12.5, "max_4k_ttft_ms": 4000},
                "runtime_status": "recommendable",
            },
            "tiny-a": {"model_id": "org/Tiny", "min_ram_gb": 4, "min_bandwidth_tier": "C",
                       "bench_gate": {"min_sustained_tps": 1, "max_4k_ttft_ms": 1},
                       "runtime_status": "listed"},
            "tiny-b": {"model_id": "ORG/tiny ", "min_ram_gb": 8, "min_bandwidth_tier": "C",
                       "bench_gate": {"min_sustained_tps": 1, "max_4k_ttft_ms": 1},
                       "runtime_status": "listed",
                       "draft_candidates": [{"draft_model": "d", "extra": 1}]},
        },
    }  # fmt: skip
    doc.update(overrides)
    return json.dumps(doc, indent=2).encode()


def sidecar(data: bytes, key: Ed25519PrivateKey = SIGNER, key_id: str = "test-key-v1") -> bytes:
    sig = base64.b64encode(key.sign(data)).decode()
    return json.dumps({"key_id": key_id, "alg": "ed25519", "signature": sig}).encode()


def framed_identity(fields: list[str]) -> str:
    # Catalog.RowIdentity, written out: "<byte length>:<field>" joined by "|".
    text = "|".join(f"{len(f.encode())}:{f}" for f in fields)
    return hashlib.sha256(text.encode()).hexdigest()


def test_admission_fields_for_a_row_keyed_by_model_id() -> None:
    data = feed()
    adm = cat.admission_for(data, sidecar(data), "mlx-community/Qwen3-32B-4bit", KEYS, now=NOW)
    assert adm.fields() == {
        "catalog_release_id": "published-2026-07-10",
        "catalog_policy_version": "autotune-policy-v1",
        "catalog_signer_key_id": "test-key-v1",
        "catalog_candidate_sha256": hashlib.sha256(data).hexdigest(),
        "catalog_row_identity": framed_identity(
            [
                "autotune-policy-v1",
                "qwen3-32b",
                "mlx-community/Qwen3-32B-4bit",
                "bcaaf7f538adf166c1080a2befdb4f6019f66639",
                "69169cceb643f108755f96dba26d8647862e38a7f82cb1b5b25aff8f204967aa",
                "24",
                "B",
                "12.500000",
                "4000",
                "recommendable",
            ]
        ),
    }
    assert adm.row_key == "qwen3-32b" and adm.model_sha256.startswith("69169cce")


def test_highest_claimed_tier_and_the_policy_digest() -> None:
    data = feed(policy_version="")
    adm = cat.admission_for(data, sidecar(data), "org/tiny", KEYS, now=NOW)
    # Two rows claim org/tiny: the higher min_ram_gb wins; an empty policy is legacy.
    assert adm.row_key == "tiny-b" and adm.policy_version == "legacy-spec-023"
    policy = {"draft_candidates": [{"draft_model": "d", "draft_model_artifact_sha256": ""}]}
    canonical = json.dumps(policy, separators=(",", ":"), sort_keys=True).encode()
    digest = hashlib.sha256(canonical).hexdigest()
    assert adm.row_identity == framed_identity(
        ["legacy-spec-023", "tiny-b", "ORG/tiny ", "", "", "8", "C", "1.000000", "1", "listed",
         f"policy:{digest}"]
    )  # fmt: skip
    assert adm.model_sha256 is None
    with pytest.raises(cat.CatalogError, match="no row"):
        cat.admission_for(data, sidecar(data), "org/absent", KEYS, now=NOW)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d, s: (d + b" ", s), "does not verify"),
        (lambda d, s: (d, sidecar(d, Ed25519PrivateKey.generate())), "does not verify"),
        (lambda d, s: (d, sidecar(d, key_id="other")), "not a trusted key"),
        (lambda d, s: (d, s.replace(b'"ed25519"', b'"rsa"')), "not ed25519"),
        (lambda d, s: (d, s[:-1] + b',"x":1}'), "exactly"),
        (lambda d, s: (d, s.replace(b'"key_id"', b'"key_id":"a","key_id"', 1)), "duplicate"),
        (lambda d, s: (feed(generated_at="2026-05-01T00:00:00Z"), None), "older than 30 days"),
        (lambda d, s: (feed(generated_at="2026-07-12T00:00:00Z"), None), "future"),
        (lambda d, s: (feed(version=""), None), "no version"),
        (lambda d, s: (feed(rows={}), None), "no rows"),
    ],
)
def test_refused_feeds(mutate: Any, match: str) -> None:
    data = feed()
    data, sig = mutate(data, sidecar(data))
    sig = sig if sig is not None else sidecar(data)
    with pytest.raises(cat.CatalogError, match=match):
        cat.admission_for(data, sig, "mlx-community/Qwen3-32B-4bit", KEYS, now=NOW)


def test_padding_or_non_canonical_signature_base64_is_refused() -> None:
    data = feed()
    sig = json.loads(sidecar(data))
    sig["signature"] = sig["signature"].rstrip("=")
    with pytest.raises(cat.CatalogError, match="base64"):
        cat.verify_feed(data, json.dumps(sig).encode(), KEYS, now=NOW)


def test_default_feed_url_and_production_keys() -> None:
    assert cat.default_feed_url("wss://coordinator.malibu.tech/ws/provider") == (
        "https://coordinator.malibu.tech/v1/autotune-candidates"
    )
    assert cat.default_feed_url("ws://127.0.0.1:8080/ws/provider") == (
        "http://127.0.0.1:8080/v1/autotune-candidates"
    )
    assert set(cat.PRODUCTION_PUBLIC_KEYS) == {
        "streamvc-autotune-static-v4",
        "streamvc-autotune-static-v5",
    }
    for key in cat.PRODUCTION_PUBLIC_KEYS.values():
        assert len(base64.b64decode(key, validate=True)) == 32


async def test_fetch_from_the_coordinator_origin() -> None:
    data = feed(generated_at=(datetime.now(UTC) - timedelta(days=1)).isoformat())
    app = web.Application()

    async def candidates(request: web.Request) -> web.Response:
        return web.Response(body=data)

    async def signature(request: web.Request) -> web.Response:
        return web.Response(body=sidecar(data))

    app.router.add_get("/v1/autotune-candidates", candidates)
    app.router.add_get("/v1/autotune-candidates.sig", signature)

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/v1/autotune-candidates")

    app.router.add_get("/moved", moved)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        url = f"http://127.0.0.1:{port}/v1/autotune-candidates"
        adm = await cat.fetch_admission(url, "mlx-community/Qwen3-32B-4bit", KEYS)
        assert adm.candidate_sha256 == hashlib.sha256(data).hexdigest()
        with pytest.raises(cat.CatalogError, match="HTTP 30"):
            await cat.fetch_admission(f"http://127.0.0.1:{port}/moved", "x", KEYS)
        with pytest.raises(cat.CatalogError, match="HTTP 404"):
            await cat.fetch_admission(f"http://127.0.0.1:{port}/nothing", "x", KEYS)
    finally:
        await runner.cleanup()
