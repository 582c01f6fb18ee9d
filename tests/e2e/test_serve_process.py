"""``mlx-provider serve`` as users run it: its own process, the real MLX engine,
flags only (no config file), against the coordinator stub.

One process serves concurrent completions, then drains on SIGTERM: the job in
flight finishes and the exit status is 0. Another is interrupted twice: the
first SIGINT starts a drain, the second exits at once (130) although a long
generation is still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from coordinator_stub.app import CoordinatorStub
from tests.session.conftest import stub_config

ROOT = Path(__file__).parents[2]
PID = "prov-serve"
TOKEN = "ptok_serve_process_5Vq8Rz1Lw3"
Q = [{"role": "user", "content": "Tell me about lighthouses."}]


def serve_command() -> list[str]:
    script = Path(sys.executable).parent / "mlx-provider"
    return [str(script)] if script.exists() else [sys.executable, "-m", "provider"]


@contextlib.asynccontextmanager
async def serving(
    stub: CoordinatorStub, model_dir: Path, log_file: Path, *extra: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    with log_file.with_suffix(".stderr").open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            *serve_command(), "serve", "--coordinator", stub.ws_url, "--model", str(model_dir),
            "--token", TOKEN, "--provider-id", PID, "--status-port", "0",
            "--log-file", str(log_file), *extra,
            cwd=ROOT, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def buyer(stub: CoordinatorStub) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stub.http_url}/v1", api_key="buyer", max_retries=0)


def log_lines(log_file: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log_file.read_text().splitlines()]


async def first_content(stream: Any) -> None:
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            return


async def sigterm_mid_stream(
    client: openai.AsyncOpenAI, proc: asyncio.subprocess.Process, model: str, tokens: int
) -> None:
    """SIGTERM while a stream generates: the job finishes whole, then the process exits 0."""
    long = await client.chat.completions.create(
        model=model, messages=Q, max_tokens=tokens, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    await first_content(long)
    proc.send_signal(signal.SIGTERM)
    rest = [chunk async for chunk in long]
    assert rest[-1].usage is not None and rest[-1].usage.completion_tokens == tokens
    assert await asyncio.wait_for(proc.wait(), 60) == 0


@pytest.mark.slow
async def test_serve_process_with_mlx_serves_then_drains_on_sigterm(
    model_dir: Path, tmp_path: Path
) -> None:
    log_file = tmp_path / "provider.log"
    async with (
        CoordinatorStub(stub_config()) as stub,
        serving(stub, model_dir, log_file, "--max-concurrency", "2") as proc,
    ):
        await stub.wait_provider_state(PID, "ready", timeout=120)
        client = buyer(stub)
        try:
            model = stub.provider(PID).model_id  # type: ignore[union-attr]
            plain, streamed = await asyncio.gather(
                client.chat.completions.create(model=model, messages=Q, max_tokens=16),
                client.chat.completions.create(
                    model=model, messages=Q, max_tokens=16, stream=True,
                    stream_options={"include_usage": True},
                ),
            )  # fmt: skip
            assert plain.choices[0].finish_reason == "length"
            assert plain.usage is not None and plain.usage.completion_tokens == 16
            chunks = [chunk async for chunk in streamed]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == plain.choices[0].message.content  # greedy: the same tokens
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16

            await sigterm_mid_stream(client, proc, model, 120)
        finally:
            await client.close()
        phases = [f.message.phase for f in stub.frames_received(PID, "drain_status")]
        assert phases[0] == "starting" and phases[-1] == "complete", phases
    entries = log_lines(log_file)
    messages = [e["msg"] for e in entries]
    assert "model loaded" in messages and "registered" in messages
    assert not [e for e in entries if e["level"] in ("error", "critical")], entries
    assert TOKEN not in log_file.read_text()


@pytest.mark.slow
async def test_second_sigint_exits_at_once_with_a_generation_running(
    model_dir: Path, tmp_path: Path
) -> None:
    log_file = tmp_path / "provider.log"
    async with (
        CoordinatorStub(stub_config()) as stub,
        serving(stub, model_dir, log_file) as proc,
    ):
        await stub.wait_provider_state(PID, "ready", timeout=120)
        client = buyer(stub)
        try:
            model = stub.provider(PID).model_id  # type: ignore[union-attr]
            # ~3,500 greedy tokens: seconds of work, far more than the test waits.
            long = await client.chat.completions.create(
                model=model, messages=Q, max_tokens=3500, stream=True
            )
            await first_content(long)
            proc.send_signal(signal.SIGINT)
            await stub.wait_frame(
                PID, "drain_status", where=lambda f: f.message.phase == "starting", timeout=30
            )
            second = time.monotonic()
            proc.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(proc.wait(), 30) == 130
            exited_after = time.monotonic() - second
            with contextlib.suppress(openai.APIError):
                async for _ in long:
                    pass
        finally:
            await client.close()
        ends = [
            f.message
            for f in stub.frames_received(PID, "inference_response_end")
            if not f.message.request_id.startswith("warmup")
        ]
        # The generation did not run to its end: the process did not wait.
        assert all(end.usage.completion_tokens < 3500 for end in ends), ends
    assert exited_after < 10, exited_after
    messages = [e["msg"] for e in log_lines(log_file)]
    assert any(m.startswith("SIGINT: draining") for m in messages), messages
    assert "second SIGINT: exiting now" in messages


@pytest.mark.slow
async def test_serve_process_in_production_bootstraps_serves_and_exits_0_on_sigterm(
    model_dir: Path, tmp_path: Path
) -> None:
    # The production profile, a config file with a referral code and no token:
    # the process bootstraps, persists the token, is routed, serves with
    # receipts verified, and a SIGTERM mid-generation drains and exits 0.
    from .test_protocol_e2e import (
        BOOTSTRAP_ID,
        REFERRAL,
        production_settings,
        production_stub,
        receipts,
        routable,
        write_config,
    )

    log_file = tmp_path / "provider.log"
    async with production_stub(model_dir) as stub:
        cfg = write_config(
            tmp_path / "config.toml", stub, model_dir,
            **production_settings(provider_id=BOOTSTRAP_ID, referral_code=REFERRAL),
        )  # fmt: skip
        with log_file.with_suffix(".stderr").open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                *serve_command(), "serve", "--config", str(cfg), "--log-file", str(log_file),
                cwd=ROOT, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr,
            )  # fmt: skip
        try:
            await routable(stub, BOOTSTRAP_ID, timeout=120)
            client = buyer(stub)
            try:
                done = await client.chat.completions.create(
                    model=model_dir.name, messages=Q, max_tokens=8
                )
                assert done.usage is not None and done.usage.completion_tokens == 8
                await receipts(stub, BOOTSTRAP_ID, verified=1)
                await sigterm_mid_stream(client, proc, model_dir.name, 60)
            finally:
                await client.close()
            counts = await receipts(stub, BOOTSTRAP_ID, verified=2)
            assert counts["failed"] == 0, counts
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    token = next(
        line.split('"')[1] for line in cfg.read_text().splitlines()
        if line.startswith("provider_token")
    )  # fmt: skip
    assert stub.bootstraps == [BOOTSTRAP_ID] and cfg.stat().st_mode & 0o777 == 0o600
    entries = log_lines(log_file)
    assert "registered" in [e["msg"] for e in entries]
    assert not [e for e in entries if e["level"] in ("error", "critical")], entries
    assert token not in log_file.read_text()
