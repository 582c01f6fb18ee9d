"""The ``coordinator-stub`` command: ready line, working listeners, clean exit."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from .scripted import ScriptedProvider

ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"^ready ws=(ws://127\.0\.0\.1:\d+/ws/provider) http=(http://127\.0\.0\.1:\d+)$")


def _command() -> list[str]:
    script = Path(sys.executable).parent / "coordinator-stub"
    if script.exists():
        return [str(script)]
    # Not installed as a distribution (no console script): same entry point.
    return [sys.executable, "-m", "coordinator_stub"]


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return await asyncio.create_subprocess_exec(
        *_command(),
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_ready_line_then_clean_exit_on_signal(signum: signal.Signals):
    proc = await _spawn("--ws-port", "0", "--http-port", "0", "--token", "tok")
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode().rstrip("\n")
        match = READY.match(line)
        assert match, line
        ws_url, http_url = match.groups()

        provider = ScriptedProvider(ws_url)
        ack = await provider.start()
        assert ack.assigned_id  # a session UUID
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{http_url}/v1/status") as resp:
                status = await resp.json()
        assert status["providers"][0]["provider_id"] == "p1"
        await provider.close()

        proc.send_signal(signum)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        rest = await proc.stdout.read()
        assert rest == b""  # exactly one line on stdout
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    logs = (await proc.stderr.read()).decode()
    assert "provider registered provider_id=p1" in logs


async def test_help_documents_the_flags():
    proc = await _spawn("--help")
    out, _ = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0
    text = out.decode()
    for flag in (
        "--host",
        "--ws-port",
        "--http-port",
        "--token",
        "--no-write-deadline",
        "--write-deadline",
        "--inactivity",
        "--grace",
        "--heartbeat-interval",
        "--no-warmup-gate",
        "--keepalive",
        "--request-timeout",
        "--so-rcvbuf",
        "--refuse-connections",
        "--accept-then-close",
        "--profile",
        "--catalog-model",
        "--referral-code",
        "--require-encrypted-leg",
        "--settlement-mode",
    ):
        assert flag in text, flag


def test_flags_map_to_config():
    from coordinator_stub.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        [
            "--token", "a", "--token", "b", "--no-write-deadline", "--inactivity", "1.5",
            "--no-warmup-gate", "--keepalive", "0.1", "--heartbeat-interval", "5",
        ]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.tokens == ("a", "b")
    assert config.write_deadline_s is None and config.inactivity_s == 1.5
    assert config.warmup_gate is False and config.keepalive_s == 0.1
    assert config.heartbeat_interval_s == 5 and config.host == "127.0.0.1"
    assert config.grace_s == 30.0 and config.probe_timeout_s == 0.5


def test_profile_and_gate_flags_map_to_config(tmp_path: Path) -> None:
    from coordinator_stub.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        [
            "--profile", "production", "--referral-code", "r1", "--catalog-model",
            f"org/m={'ab' * 32}", "--accept-compatibility-set", "o/n:v1.0.0@" + "a" * 40,
            "--no-require-hash-verified", "--settlement-mode", "observe",
            "--rekey-after-requests", "5", "--catalog-key-id", "k1",
        ]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.profile == "production"
    assert config.required_binary_version == "1.8.33"  # from the profile
    assert config.require_provider_tokens and config.allow_tokenless_provisional_bootstrap
    assert config.require_encrypted_leg and config.warmup_gate is False
    assert config.require_hash_verified is False  # the flag wins over the profile
    assert config.settlement_mode == "observe" and config.rekey_after_requests == 5
    assert config.referral_codes == ("r1",)
    assert config.catalog_models == (("org/m", "ab" * 32),)
    assert config.catalog_key_id == "k1"
    dev = config_from_args(build_parser().parse_args([]))
    assert dev.profile == "dev" and dev.required_binary_version == ""
    assert dev.warmup_gate is True and dev.settlement_mode == "observe"


async def test_production_profile_logs_the_catalog_key() -> None:
    proc = await _spawn(
        "--ws-port", "0", "--http-port", "0", "--profile", "production",
        "--catalog-model", f"test-model={'ab' * 32}",
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode().rstrip("\n")
        match = READY.match(line)
        assert match, line
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{match.group(2)}/v1/status") as resp:
                status = await resp.json()
        assert status["profile"] == "production"
        key_id, public_key = status["catalog"]["key_id"], status["catalog"]["public_key"]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    logs = (await proc.stderr.read()).decode()
    assert f"key_id={key_id} public_key={public_key}" in logs


async def test_a_bad_catalog_model_exits_2(tmp_path: Path) -> None:
    proc = await _spawn("--catalog-model", f"test-model={tmp_path / 'missing'}")
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 2
    assert b"cannot start" in err
