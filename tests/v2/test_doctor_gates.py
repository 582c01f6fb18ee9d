"""``mlx-provider doctor`` names each production gate this provider would fail, and the fix."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from provider.host.model_identity import model_identity
from provider.ops.doctor import check_production_gates

SET_ID = "Augustas11/macprovider:v1.8.123@" + "a" * 40
SIGNER = Ed25519PrivateKey.from_private_bytes(b"\x09" * 32)
KEYS = {"k": base64.b64encode(SIGNER.public_key().public_bytes_raw()).decode()}


@pytest.fixture
def model(tmp_path: Path) -> Path:
    root = tmp_path / "tiny"
    root.mkdir()
    (root / "config.json").write_text("{}")
    return root


@pytest.fixture
async def feed_url(model: Path) -> AsyncIterator[tuple[str, str]]:
    """A signed feed whose row requires ``model``'s own hash, and one that requires another."""
    own = model_identity(model).hash

    def signed(sha: str) -> tuple[bytes, bytes]:
        doc = {"version": "rel", "rows": {"tiny": {"model_id": "tiny", "model_sha256": sha}}}
        data = json.dumps(doc).encode()
        sig = base64.b64encode(SIGNER.sign(data)).decode()
        return data, json.dumps({"key_id": "k", "alg": "ed25519", "signature": sig}).encode()

    feeds = {"good": signed(own), "bad": signed("0" * 64)}
    app = web.Application()

    async def serve(request: web.Request) -> web.Response:
        data, sig = feeds[request.match_info["which"]]
        return web.Response(body=sig if request.path.endswith(".sig") else data)

    app.router.add_get("/{which}/v1/autotune-candidates", serve)
    app.router.add_get("/{which}/v1/autotune-candidates.sig", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}"
    yield f"{base}/good/v1/autotune-candidates", f"{base}/bad/v1/autotune-candidates"
    await runner.cleanup()


async def test_a_production_ready_provider_passes(
    model: Path, feed_url: tuple[str, str], tmp_path: Path
) -> None:
    results = await check_production_gates(
        coordinator_url="wss://coordinator.example/ws/provider",
        token="tok",
        provider_id="mp-" + "1" * 32,
        compatibility_set_id=SET_ID,
        binary_version="1.8.123",
        model=str(model),
        catalog_feed_url=feed_url[0],
        catalog_public_keys=KEYS,
        key_dir=tmp_path / "cfg",
    )
    assert [r.name for r in results if not r.ok] == []


async def test_each_failing_gate_is_named_with_its_fix(
    model: Path, feed_url: tuple[str, str], tmp_path: Path
) -> None:
    key_dir = tmp_path / "cfg"
    key_dir.mkdir()
    (key_dir / "last-refusal.json").write_text(json.dumps({
        "close_code": 4004, "at": "now",
        "reason": "version_unsupported: binary_version 0.1.0 below required 1.8.33",
    }))  # fmt: skip
    results = await check_production_gates(
        protocol="v1",
        coordinator_url="wss://coordinator.example/ws/provider",
        token=None,
        provider_id="mp-" + "1" * 32,
        binary_version="0.1.0",
        model=str(model),
        max_concurrency=12,
        catalog_feed_url=feed_url[1],
        catalog_public_keys=KEYS,
        key_dir=key_dir,
    )
    failed = {r.name: r for r in results if not r.ok}
    assert set(failed) == {
        "protocol", "binary version", "credentials", "compatibility set", "catalog",
        "last refusal",
    }  # fmt: skip
    assert 'protocol = "v2"' in (failed["protocol"].fix or "")
    assert "1.8.33" in (failed["binary version"].fix or "")
    assert "referral_code" in (failed["credentials"].fix or "")
    assert "compatibility_set_id" in (failed["compatibility set"].fix or "")
    assert "never routed" in failed["catalog"].detail
    assert "1.8.33" in (failed["last refusal"].fix or "")
    concurrency = next(r for r in results if r.name == "max concurrency")
    assert "at most 8" in concurrency.detail


async def test_an_unhashable_model_fails_its_gate(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(b"w")
    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    (snapshot / "model.safetensors").symlink_to(blob)
    results = await check_production_gates(
        coordinator_url=None, token="tok", provider_id="p", compatibility_set_id=SET_ID,
        binary_version="1.8.123", model=str(snapshot), catalog_feed_url="off",
        key_dir=tmp_path / "cfg",
    )  # fmt: skip
    failed = {r.name: r for r in results if not r.ok}
    assert "symlink" in failed["model identity"].detail
    assert "--local-dir" in failed["model identity"].detail
    assert "legacy" in failed["catalog"].detail
