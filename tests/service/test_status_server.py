from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from provider import telemetry
from provider.engine import EngineTimings
from provider.host.hardware import memory_info, rss_bytes
from provider.ops.status_server import StatusServer, format_status_table

NOW = 1_700_000_000.0


def sample_status(**overrides: Any) -> dict[str, Any]:
    status: dict[str, Any] = {
        "connection": "connected",
        "state": "ready",
        "state_reason": "",
        "provider_id": "mac-studio-01",
        "assigned_id": "prov_7f2c",
        "coordinator_url": "wss://coord.example/v1/provider",
        "last_heartbeat_sent_unix": NOW - 12,
        "jobs_in_flight": 1,
        "slots_free": 3,
        "slots_total": 4,
        "totals": {
            "requests": 120,
            "complete": 115,
            "cancelled": 3,
            "errors": 2,
            "tokens_generated": 45000,
        },
        "model": {
            "id": "mlx-community/Qwen2.5-7B-Instruct-4bit",
            "params_b": 7.6,
            "loading": False,
            "max_context_tokens": 32768,
            "inter_token_latency_ms": {"p50": 21.4, "p99": 130.2, "max": 151.0, "samples": 2048},
            "prefill_slice": {"budget_ms": 100.0, "tokens": 212, "tokens_per_s": 2113.5},
        },
        "memory": {"rss_bytes": 5 * 1024**3 + 200 * 1024**2},
        "reconnects": 2,
        "uptime_s": 3 * 3600 + 12 * 60 + 5,
    }
    status.update(overrides)
    return status


class Agent:
    """Stands in for the session: mutable status, health derived from it."""

    def __init__(self) -> None:
        self.status = sample_status()

    def get_status(self) -> dict[str, Any]:
        return self.status

    def is_healthy(self) -> bool:
        return self.status["connection"] == "connected" and self.status["state"] in (
            "ready",
            "busy",
        )


@pytest.fixture
async def served() -> AsyncIterator[tuple[Agent, StatusServer, aiohttp.ClientSession]]:
    agent = Agent()
    server = StatusServer(agent.get_status, agent.is_healthy, port=0)
    await server.start()
    async with aiohttp.ClientSession() as http:
        yield agent, server, http
    await server.stop()


async def test_healthz_ok_and_503_with_reason(served) -> None:
    agent, server, http = served
    assert server.port != 0 and server.url == f"http://127.0.0.1:{server.port}"
    async with http.get(f"{server.url}/healthz") as resp:
        assert resp.status == 200
        assert (await resp.text()).strip() == "ok"

    agent.status.update(state="degraded", state_reason="model failed to load")
    async with http.get(f"{server.url}/healthz") as resp:
        assert resp.status == 503
        assert (await resp.text()).strip() == (
            "connection connected, state degraded: model failed to load"
        )

    agent.status.update(connection="reconnecting", state="unavailable", state_reason="")
    async with http.get(f"{server.url}/healthz") as resp:
        assert resp.status == 503
        assert "connection reconnecting" in await resp.text()


async def test_healthz_reason_from_is_healthy() -> None:
    server = StatusServer(dict, lambda: (False, "draining for shutdown"), port=0)
    async with server, aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/healthz") as resp:
            assert resp.status == 503
            assert await resp.text() == "draining for shutdown\n"


async def test_status_is_the_session_dict(served) -> None:
    agent, server, http = served
    async with http.get(f"{server.url}/status") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert await resp.json() == agent.status


async def test_metrics_exports_the_registry(served) -> None:
    _, server, http = served
    telemetry.heartbeats_sent.inc()
    async with http.get(f"{server.url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        body = await resp.text()
    assert "# TYPE mlx_provider_heartbeats_sent_total counter" in body
    assert "mlx_provider_ttft_seconds_bucket" in body


async def test_metrics_show_each_watched_engines_pace(served) -> None:
    _, server, http = served
    pace = EngineTimings(0.021, 0.130, 0.151, 2048, 0.1, 212, 2113.5)
    telemetry.watch_engine("model-a", lambda: pace)
    telemetry.watch_engine("model-b", lambda: EngineTimings())  # loaded, nothing served yet
    try:
        async with http.get(f"{server.url}/metrics") as resp:
            body = await resp.text()
    finally:
        telemetry.unwatch_engine("model-a")
        telemetry.unwatch_engine("model-b")
    lines = set(body.splitlines())
    assert {
        'mlx_provider_inter_token_latency_seconds{model="model-a",quantile="0.5"} 0.021',
        'mlx_provider_inter_token_latency_seconds{model="model-a",quantile="0.99"} 0.13',
        'mlx_provider_inter_token_latency_seconds{model="model-a",quantile="1"} 0.151',
        'mlx_provider_inter_token_latency_samples{model="model-a"} 2048.0',
        'mlx_provider_prefill_slice_tokens{model="model-a"} 212.0',
        'mlx_provider_prefill_slice_budget_seconds{model="model-a"} 0.1',
        'mlx_provider_prefill_tokens_per_second{model="model-a"} 2113.5',
        'mlx_provider_inter_token_latency_samples{model="model-b"} 0.0',
        'mlx_provider_prefill_slice_budget_seconds{model="model-b"} 0.0',
    } <= lines
    assert not any('model="model-b",quantile' in line for line in lines)
    async with http.get(f"{server.url}/metrics") as resp:
        assert 'model="model-a"' not in await resp.text()


async def test_stop_closes_the_port(served) -> None:
    _, server, http = served
    await server.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await http.get(f"{server.url}/healthz")
    await server.stop()  # twice is fine


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "example.com", "::"])
def test_non_loopback_host_is_refused(host: str) -> None:
    with pytest.raises(ValueError, match="status_host"):
        StatusServer(dict, lambda: True, host=host)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_hosts_are_accepted(host: str) -> None:
    assert StatusServer(dict, lambda: True, host=host, port=9).host == host


def test_status_table() -> None:
    table = format_status_table(sample_status(), now=NOW)
    assert table.splitlines() == [
        "state             ready (connected)",
        "reason            -",
        "provider id       mac-studio-01",
        "assigned id       prov_7f2c",
        "coordinator       wss://coord.example/v1/provider",
        "last heartbeat    12s ago",
        "jobs in flight    1 (3 of 4 slots free)",
        "requests          120 (115 complete, 3 cancelled, 2 errors)",
        "tokens generated  45000",
        "model             mlx-community/Qwen2.5-7B-Instruct-4bit (7.6B params, context 32768)",
        "inter-token       p50 21.4 ms, p99 130.2 ms, max 151.0 ms",
        "prefill slice     212 tokens (100.0 ms budget)",
        "memory (RSS)      5.2 GiB",
        "reconnects        2",
        "uptime            3h 12m",
    ]


def test_status_table_tolerates_missing_keys() -> None:
    table = format_status_table(
        {"state": "unavailable", "model": {"id": "m", "loading": True}}, now=NOW
    )
    lines = dict(line.split("  ", 1) for line in table.splitlines())
    assert lines["state"].strip() == "unavailable (-)"
    assert lines["last heartbeat"].strip() == "never"
    assert lines["model"].strip() == "m [loading]"
    assert lines["memory (RSS)"].strip() == "-"


def test_rss_is_plausible() -> None:
    rss = rss_bytes()
    info = memory_info()
    assert 1024**2 < rss < 64 * 1024**3
    assert info["peak_rss_bytes"] >= info["rss_bytes"] // 2
