"""End to end through the stub with real mlx-lm generation and the openai client."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import openai
import pytest

from provider.coordinator.jobs import Job
from provider.engine.mlx import RequestStats, StepKind

from .conftest import PID

Q = [{"role": "user", "content": "Tell me about lighthouses."}]


def prompt_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)  # BatchEncoding in 5.x


async def test_non_streamed_completion_with_exact_usage(system: Any, tokenizer: Any) -> None:
    async with system(ignore_eos=True) as s:
        done = await s.buyer.chat.completions.create(model=s.model, messages=Q, max_tokens=12)
        assert done.object == "chat.completion" and done.choices[0].finish_reason == "length"
        assert done.choices[0].message.content
        assert done.usage.prompt_tokens == prompt_tokens(tokenizer, Q)
        assert done.usage.completion_tokens == 12
        assert done.usage.total_tokens == done.usage.prompt_tokens + 12
        stats = next(reversed(s.engine.last_stats.values()))
        assert stats.completion_tokens == 12


async def test_streamed_completion_with_usage_chunk(system: Any, tokenizer: Any) -> None:
    async with system(ignore_eos=True) as s:
        stream = await s.buyer.chat.completions.create(
            model=s.model,
            messages=Q,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
        roles, text, finish, usage = [], [], None, None
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                roles += [choice.delta.role] if choice.delta.role else []
                text += [choice.delta.content] if choice.delta.content else []
                finish = choice.finish_reason or finish
        assert roles == ["assistant"] and finish == "length" and "".join(text)
        assert usage.prompt_tokens == prompt_tokens(tokenizer, Q)
        assert usage.completion_tokens == 20
        # Same greedy request, not streamed: same text.
        whole = await s.buyer.chat.completions.create(model=s.model, messages=Q, max_tokens=20)
        assert whole.choices[0].message.content == "".join(text)


async def test_stop_string_across_tokens_is_not_emitted(system: Any) -> None:
    async with system(ignore_eos=True) as s:
        full = await s.buyer.chat.completions.create(model=s.model, messages=Q, max_tokens=40)
        text = full.choices[0].message.content
        assert len(text) > 12
        stop = text[8:12]  # four characters from the middle, likely over a token boundary
        cut = await s.buyer.chat.completions.create(
            model=s.model, messages=Q, max_tokens=40, stop=[stop]
        )
        out = cut.choices[0].message.content
        assert stop not in out and out == text[: text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"


async def test_cancel_mid_decode_stops_within_one_step(
    system: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with system(ignore_eos=True) as s:
        cancelled_at: dict[str, float] = {}
        steps: list[tuple[float, StepKind, int]] = []
        real_cancel = Job.request_cancel

        def request_cancel(job: Job, reason: str) -> None:
            cancelled_at.setdefault("t", time.perf_counter())
            real_cancel(job, reason)

        def hook(stats: RequestStats, kind: StepKind) -> None:
            steps.append((time.perf_counter(), kind, stats.decode_steps))

        monkeypatch.setattr(Job, "request_cancel", request_cancel)
        s.engine.step_hook = hook
        stream = await s.buyer.chat.completions.create(
            model=s.model, messages=Q, max_tokens=3000, stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        await stream.close()  # the buyer goes away: stub sends cancel_request
        end = await s.stub.wait_frame(
            PID,
            "inference_response_end",
            where=lambda f: not f.message.request_id.startswith("warmup"),
            timeout=30,
        )
        assert end.message.status == "cancelled"
        after = [st for st in steps if st[0] > cancelled_at["t"] and st[1] == "decode"]
        assert len(after) <= 1, after
        assert 0 < end.message.usage.completion_tokens < 3000
        await s.stub.wait_provider_state(PID, "ready")
        assert s.run.agent.state.in_flight == 0 and s.engine.active == 0


@pytest.mark.parametrize(
    "options",
    [{"prefill_step_size": 16, "prefill_slice_ms": 0}, {"prefill_slice_ms": 5}],
    ids=["fixed-16-token-chunks", "5ms-slices"],
)
async def test_cancel_mid_prefill_stops_within_one_chunk(
    system: Any, options: dict[str, Any]
) -> None:
    async with system(**options) as s:
        chunks: list[int] = []
        long = [{"role": "user", "content": "lighthouse " * 300}]  # ~1,200 tokens
        cancel_sent = asyncio.Event()
        loop = asyncio.get_running_loop()

        def hook(stats: RequestStats, kind: StepKind) -> None:
            if kind == "prefill" and stats.prompt_tokens > 1000:
                chunks.append(stats.prefill_chunks)
                if stats.prefill_chunks == 3:
                    loop.call_soon_threadsafe(cancel_sent.set)

        s.engine.step_hook = hook
        buyer = asyncio.create_task(
            s.buyer.chat.completions.create(model=s.model, messages=long, max_tokens=5)
        )
        await asyncio.wait_for(cancel_sent.wait(), 30)
        request_id = next(r for r, f in s.stub.in_flight.items() if f.kind == "buyer")
        at_cancel = len(chunks)
        assert await s.stub.cancel(request_id, "buyer_disconnected")
        end = await s.stub.wait_frame(
            PID, "inference_response_end", where=lambda f: f.message.request_id == request_id
        )
        assert end.message.status == "cancelled" and end.message.usage.completion_tokens == 0
        stats = next(st for st in s.engine.last_stats.values() if st.prompt_tokens > 1000)
        assert stats.prefill_tokens < stats.prompt_tokens - 1  # the prefill did not run to the end
        assert len(chunks) - at_cancel <= 2  # cancel is seen at the next chunk boundary
        with pytest.raises(openai.APIStatusError):
            await buyer
        assert s.run.agent.state.in_flight == 0 and s.engine.active == 0


async def test_status_and_metrics_show_the_engines_pace(system: Any) -> None:
    from prometheus_client import generate_latest

    from provider import telemetry

    async with system(ignore_eos=True, prefill_slice_ms=50) as s:
        await s.buyer.chat.completions.create(model=s.model, messages=Q, max_tokens=30)
        model = s.run.agent.status()["model"]
        itl = model["inter_token_latency_ms"]
        assert itl["samples"] >= 29  # the warm-up's tokens count too
        assert 0 < itl["p50"] <= itl["p99"] <= itl["max"]
        assert model["prefill_slice"]["budget_ms"] == 50.0
        assert model["prefill_slice"]["tokens"] >= 1
        metrics = generate_latest(telemetry.REGISTRY).decode()
        label = f'model="{s.run.agent.model_id}"'
        assert f'mlx_provider_inter_token_latency_seconds{{{label},quantile="0.99"}}' in metrics
        assert f"mlx_provider_prefill_slice_budget_seconds{{{label}}} 0.05" in metrics


async def test_prompt_over_the_context_limit(system: Any) -> None:
    async with system(max_context_tokens=64) as s:
        too_long = [{"role": "user", "content": "lighthouse " * 200}]
        with pytest.raises(openai.BadRequestError) as err:
            await s.buyer.chat.completions.create(model=s.model, messages=too_long, max_tokens=4)
        message = str(err.value)
        assert "64" in message and "token" in message
        end = s.stub.frames_received(PID, "inference_response_end")[-1].message
        assert end.status == "error_context_exceeded" and not end.retryable
        assert s.run.agent.state.in_flight == 0


@pytest.mark.parametrize("n", [2, 4])
async def test_concurrent_requests_complete(system: Any, n: int) -> None:
    async with system(max_concurrency=4, ignore_eos=True) as s:
        prompts = [[{"role": "user", "content": f"Story number {i}."}] for i in range(n)]
        singles = []
        for p in prompts:
            one = await s.buyer.chat.completions.create(model=s.model, messages=p, max_tokens=16)
            singles.append(one.choices[0].message.content)
        together = await asyncio.gather(
            *(s.buyer.chat.completions.create(model=s.model, messages=p, max_tokens=16)
              for p in prompts)
        )  # fmt: skip
        assert [c.usage.completion_tokens for c in together] == [16] * n
        assert [c.choices[0].message.content for c in together] == singles
        assert s.run.agent.state.in_flight == 0


async def test_heartbeats_keep_cadence_during_generation(system: Any) -> None:
    async with system(ignore_eos=True) as s:
        t0 = time.monotonic()
        stream = await s.buyer.chat.completions.create(
            model=s.model, messages=Q, max_tokens=3500, stream=True
        )
        async for _ in stream:
            pass
        elapsed = time.monotonic() - t0
        beats = [f.time for f in s.stub.frames_received(PID, "heartbeat") if f.time >= t0]
        assert elapsed >= 2.0, "generation too short to observe heartbeats"
        assert len(beats) >= int(elapsed) - 1
        assert max(b - a for a, b in itertools.pairwise(beats)) <= 1.0 + 1.0
