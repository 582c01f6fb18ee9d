"""Second turns end to end: cached prompt tokens in the buyer's usage, status and /metrics."""

from __future__ import annotations

from typing import Any

from prometheus_client import generate_latest

from provider import telemetry
from provider.ops.status_server import format_status_table

from .test_mlx_e2e import Q, prompt_tokens


async def test_second_turn_reports_cached_tokens(system: Any, tokenizer: Any) -> None:
    async with system(ignore_eos=True) as s:
        first = await s.buyer.chat.completions.create(model=s.model, messages=Q, max_tokens=8)
        # The stub's warm-up request shares the template's first tokens, no more.
        assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens // 2
        turn = [
            *Q,
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "And then?"},
        ]
        stream = await s.buyer.chat.completions.create(
            model=s.model,
            messages=turn,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        assert usage is not None and usage.prompt_tokens == prompt_tokens(tokenizer, turn)
        # At least the whole first prompt came from the cache.
        assert usage.prompt_tokens_details.cached_tokens >= prompt_tokens(tokenizer, Q)

        await s.engine.settled()
        status = s.run.agent.status()
        cache = status["memory"]["prompt_cache"]
        assert cache["lookups"] == 3  # the stub's warm-up request, then two turns
        assert cache["hits"] >= 1 and cache["bytes"] > 0 and cache["entries"] >= 1
        assert status["memory"]["kv_budget_bytes"] > 0
        assert "prompt cache" in format_status_table(status)
        metrics = generate_latest(telemetry.REGISTRY).decode()
        assert "mlx_provider_prompt_cache_bytes " in metrics
        assert f"mlx_provider_prompt_cache_hits_total {float(cache['hits'])}" in metrics
