"""Reuse benchmark: second turns, shared system prompts, speculative decoding, 4 streams.

Each section runs the provider end to end (coordinator stub + ``mlx-provider
serve`` + an HTTP buyer on the stub's OpenAI API, as ``bench/relay.py``
does) and, in the same rounds, ``mlx_lm server`` or raw mlx-lm on the same
model. Greedy, EOS suppressed (the provider with ``MLX_ENGINE_IGNORE_EOS``,
the server with a ``logit_bias``, raw with a masking sampler), so lengths
are fixed. Ratios are taken within a round; the summary is the median over
``--repeats`` rounds. The order of the systems alternates from round to
round, so a host that drifts does not favour one.

Sections:

- ``second_turn``: a chat of two turns, new in every round (a unique tag
  leads the prompt, so nothing from an earlier round is reused). Turn 1 is
  about ``--turn1-tokens`` prompt tokens (cold); turn 2 resends it with the
  answer and a new question. TTFT of both turns on the provider and on
  ``mlx_lm server``, the provider's ``cached_tokens`` (OpenAI's
  ``usage.prompt_tokens_details``). Targets: provider turn 2 TTFT <= the
  server's, and <= 0.2 x the provider's cold turn 1.
- ``system_prompt``: one long system prompt, ``--requests`` buyers with
  different questions. Per request: TTFT, prompt and cached tokens. Target:
  after the first, the system prompt is never prefilled again
  (``cached_tokens`` >= its tokens).
- ``speculative``: a repetitive prompt (repeat a list). Decode tok/s of raw
  ``stream_generate`` and of providers with prompt lookup off, on, and
  ``auto`` (and with ``--draft-model`` if given). Target: > 1.0 x raw with
  speculation on.
- ``concurrent``: 4 simultaneous 128-token prompts on a ``max_concurrency
  4`` provider and on ``mlx_lm server``, plus one alone on the provider.
  Targets: provider aggregate tok/s >= the server's; provider mean TTFT of
  the 4 <= 2.6 x its single TTFT.
- ``decode``: ``bench/relay.py``'s ``paired`` section (raw vs end to end,
  one stream). Target: decode >= 0.97 x raw.

Prints ONE JSON line on stdout (with ``os.getloadavg()`` before and after,
since other processes on the host change every figure); progress goes to
stderr.

    python bench/reuse.py --size small --quantize
    python bench/reuse.py --model ~/models/SmolLM2-135M-Instruct --sections second_turn
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.relay import (
    CONCURRENCY,
    FILLER,
    Prompts,
    add_model_args,
    bench_paired,
    eos_ids,
    greedy_without_eos,
    mlx_lm_server_process,
    model_dir,
    serving,
)

ANSWER_TOKENS = 32
#: How often a 503 "no free slot" is retried (0.2 s apart) before it counts as a failure.
BUSY_RETRIES = 10
SECOND_QUESTION = "Thank you. Could you say that again in fewer words?"
SECTIONS = ("second_turn", "system_prompt", "speculative", "concurrent", "decode")


def log(text: str) -> None:
    print(f"[reuse] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Talking to an OpenAI-compatible endpoint


class Endpoint:
    """A chat URL and how to ask it for greedy text without EOS."""

    def __init__(self, name: str, url: str, extra: dict[str, Any] | None = None) -> None:
        self.name = name
        self.url = url
        self.extra = extra or {}
        #: Requests answered 503 (no free slot yet) and asked again.
        self.busy_retries = 0

    async def chat(
        self, http: Any, messages: list[dict[str, str]], max_tokens: int
    ) -> dict[str, Any]:
        """Stream one completion; TTFT is the first delta event, as in ``bench/relay.py``."""
        from provider.ops.demo import sse_chunks

        body = {
            "model": "default_model",
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **self.extra,
        }
        for attempt in range(BUSY_RETRIES + 1):
            start = time.perf_counter()
            first = last = None
            parts: list[str] = []
            usage: dict[str, Any] = {}
            async with http.post(self.url, json=body) as resp:
                if resp.status == 503 and attempt < BUSY_RETRIES:
                    # The stub may still count the previous request against the
                    # slot for a moment after its [DONE]: ask again.
                    self.busy_retries += 1
                    await resp.read()
                    await asyncio.sleep(0.2)
                    continue
                if resp.status != 200:
                    raise RuntimeError(f"{self.name}: HTTP {resp.status}: {await resp.text()}")
                async for chunk in sse_chunks(resp):
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices", []):
                        delta = choice.get("delta", {})
                        if first is None and (delta.get("role") or delta.get("content")):
                            first = time.perf_counter()
                        if delta.get("content"):
                            last = time.perf_counter()
                            parts.append(delta["content"])
            break
        first = first or last or time.perf_counter()
        last = last or first
        tokens = int(usage.get("completion_tokens") or len(parts))
        details = usage.get("prompt_tokens_details") or {}
        return {
            "ttft_ms": (first - start) * 1000,
            "decode_tps": (tokens - 1) / (last - first) if last > first and tokens > 1 else 0.0,
            "tokens": tokens,
            "text": "".join(parts),
            "prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "cached_tokens": details.get("cached_tokens"),
            "end": last,
        }


@contextlib.asynccontextmanager
async def provider(
    model: Path, *, max_concurrency: int = 1, **settings: Any
) -> AsyncIterator[Endpoint]:
    """Stub + ``mlx-provider serve`` with ``MLX_PROVIDER_*`` ``settings``."""
    env = {f"MLX_PROVIDER_{k.upper()}": str(v) for k, v in settings.items()}
    async with serving(model, max_concurrency=max_concurrency, env=env) as http_url:
        name = "provider" + "".join(f" {k}={v}" for k, v in settings.items())
        # The provider serves its model under the directory's name and refuses others.
        yield Endpoint(name, f"{http_url}/v1/chat/completions", {"model": model.name})


@contextlib.asynccontextmanager
async def mlx_lm_server(model: Path) -> AsyncIterator[Endpoint]:
    """``mlx_lm server`` (its prompt cache on, as it ships) on a free loopback port."""
    async with mlx_lm_server_process(model) as url:
        bias = {str(t): -1e9 for t in eos_ids(model)}
        yield Endpoint("mlx_lm_server", url, {"logit_bias": bias})


def http_session() -> Any:
    import aiohttp

    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800))


def median_of(rounds: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k, v in rounds[0].items() if isinstance(v, int | float) and v is not None]
    return {
        k: round(statistics.median(r[k] for r in rounds if r.get(k) is not None), 3) for k in keys
    }


class Text:
    """Prompt text sized in the model's tokens."""

    def __init__(self, model: Path) -> None:
        from mlx_lm.utils import load_tokenizer

        self.tokenizer = load_tokenizer(model)
        self.filler = self.tokenizer.encode(FILLER * 60, add_special_tokens=False)

    def count(self, messages: list[dict[str, str]]) -> int:
        return len(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def words(self, tokens: int, offset: int = 0) -> str:
        return self.tokenizer.decode(self.filler[offset : offset + tokens])


# --------------------------------------------------------------------------
# Sections


async def bench_second_turn(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Turn 1 cold, turn 2 over its cache: provider and mlx_lm server, same rounds."""
    text = Text(model)

    def turn1() -> list[dict[str, str]]:
        tag = f"[chat {uuid.uuid4().hex[:12]}] "
        body = text.words(
            max(8, args.turn1_tokens - text.count([{"role": "user", "content": tag}]))
        )
        return [{"role": "user", "content": tag + "Please summarise this: " + body}]

    rounds = []
    async with (
        provider(model) as prov,
        mlx_lm_server(model) as server,
        http_session() as http,
    ):
        for endpoint in (prov, server):  # untimed: load, compile, warm caches of code
            await endpoint.chat(http, turn1(), 4)
        for i in range(args.repeats):
            row: dict[str, Any] = {}
            order = (prov, server) if i % 2 == 0 else (server, prov)
            for endpoint in order:
                key = "provider" if endpoint is prov else "server"
                first_msgs = turn1()
                first = await endpoint.chat(http, first_msgs, ANSWER_TOKENS)
                second_msgs = [
                    *first_msgs,
                    {"role": "assistant", "content": first["text"]},
                    {"role": "user", "content": SECOND_QUESTION},
                ]
                second = await endpoint.chat(http, second_msgs, ANSWER_TOKENS)
                row[f"{key}_turn1_ttft_ms"] = round(first["ttft_ms"], 1)
                row[f"{key}_turn2_ttft_ms"] = round(second["ttft_ms"], 1)
                row[f"{key}_turn2_cached_tokens"] = second["cached_tokens"]
                row["turn1_prompt_tokens"] = text.count(first_msgs)
                row["turn2_prompt_tokens"] = text.count(second_msgs)
            row["turn2_vs_cold_turn1"] = (
                row["provider_turn2_ttft_ms"] / row["provider_turn1_ttft_ms"]
            )
            row["turn2_vs_server"] = row["provider_turn2_ttft_ms"] / row["server_turn2_ttft_ms"]
            row["server_turn2_vs_cold_turn1"] = (
                row["server_turn2_ttft_ms"] / row["server_turn1_ttft_ms"]
            )
            log(f"second_turn round {i + 1}: {row}")
            rounds.append(row)
        retries = {"provider": prov.busy_retries, "server": server.busy_retries}
    return {
        "rounds": len(rounds),
        "median": median_of(rounds),
        "per_round": rounds,
        "busy_retries": retries,
    }


async def bench_system_prompt(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One long system prompt, several buyers: is it prefilled only once?"""
    text = Text(model)
    tag = f"[deployment {uuid.uuid4().hex[:12]}] "
    system = (
        tag
        + "You are the support assistant of a lighthouse museum. "
        + text.words(args.system_tokens)
    )
    # The system message as the template renders it, without the assistant cue.
    system_tokens = len(
        text.tokenizer.apply_chat_template(
            [{"role": "system", "content": system}], add_generation_prompt=False
        )
    )
    questions = [
        "When is the museum open?",
        "Can I bring my dog?",
        "How tall is the main tower?",
        "Is there a cafe?",
        "Do you offer school visits?",
        "Where can I park?",
    ][: args.requests]
    out: dict[str, Any] = {"system_prompt_tokens": system_tokens}
    async with http_session() as http:
        for name, serve in (("provider", provider(model)), ("mlx_lm_server", mlx_lm_server(model))):
            async with serve as endpoint:
                await endpoint.chat(http, [{"role": "user", "content": "warm up"}], 4)
                rows = []
                for q in questions:
                    messages = [
                        {"role": "system", "content": system},
                        {"role": "user", "content": q},
                    ]
                    r = await endpoint.chat(http, messages, 8)
                    rows.append(
                        {
                            "ttft_ms": round(r["ttft_ms"], 1),
                            "prompt_tokens": text.count(messages),
                            "cached_tokens": r["cached_tokens"],
                        }
                    )
                first = rows[0]["ttft_ms"]
                later = [r["ttft_ms"] for r in rows[1:]]
                out[name] = {
                    "requests": rows,
                    "first_ttft_ms": first,
                    "later_median_ttft_ms": round(statistics.median(later), 1) if later else None,
                    "later_vs_first": round(statistics.median(later) / first, 3) if later else None,
                }
                if name == "provider":
                    cached = [r["cached_tokens"] or 0 for r in rows[1:]]
                    out[name]["system_prompt_never_prefilled_again"] = all(
                        c >= system_tokens for c in cached
                    )
                log(f"system_prompt {name}: {out[name]}")
    return out


REPEAT_LIST = (
    "apples, pears, plums, cherries, grapes, lemons, limes, oranges, peaches, apricots, "
    "melons, figs, dates, kiwis, mangoes, papayas"
)


def repetitive_messages() -> list[dict[str, str]]:
    tag = uuid.uuid4().hex[:8]
    items = ", ".join([REPEAT_LIST] * 3)
    return [
        {
            "role": "user",
            "content": f"[{tag}] Copy this list exactly, item by item, three times: {items}",
        }
    ]


async def bench_speculative(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Decode speed on a repetitive prompt: raw, provider without and with speculation."""
    from mlx_lm import load, stream_generate

    loaded, tokenizer = load(str(model))
    sampler = greedy_without_eos(loaded, tokenizer)

    def raw() -> dict[str, float]:
        ids = tokenizer.apply_chat_template(repetitive_messages(), add_generation_prompt=True)
        first = last = None
        tokens = 0
        for response in stream_generate(
            loaded, tokenizer, ids, max_tokens=args.spec_tokens, sampler=sampler
        ):
            last = time.perf_counter()
            first = first or last
            tokens = response.generation_tokens
        assert first is not None and last is not None
        return {"decode_tps": (tokens - 1) / (last - first)}

    variants: dict[str, dict[str, Any]] = {
        "lookup_off": {"prompt_lookup": "off"},
        "lookup_on": {"prompt_lookup": "on"},
        "lookup_auto": {"prompt_lookup": "auto"},
    }
    if args.draft_model:
        variants["draft"] = {"draft_model": args.draft_model}
    rounds: list[dict[str, Any]] = []
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(http_session())
        endpoints = {
            name: await stack.enter_async_context(provider(model, **settings))
            for name, settings in variants.items()
        }
        raw()
        for endpoint in endpoints.values():
            await endpoint.chat(http, repetitive_messages(), 8)
        for i in range(args.repeats):
            row: dict[str, Any] = {"raw_decode_tps": raw()["decode_tps"]}
            names = list(endpoints) if i % 2 == 0 else list(reversed(endpoints))
            for name in names:
                r = await endpoints[name].chat(http, repetitive_messages(), args.spec_tokens)
                row[f"{name}_decode_tps"] = r["decode_tps"]
            for name in endpoints:
                row[f"{name}_vs_raw"] = row[f"{name}_decode_tps"] / row["raw_decode_tps"]
            log(f"speculative round {i + 1}: {row}")
            rounds.append(row)
    return {
        "tokens": args.spec_tokens,
        "rounds": len(rounds),
        "median": median_of(rounds),
        "per_round": rounds,
        "acceptance": await speculation_acceptance(model, args),
    }


async def speculation_acceptance(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """What speculation does on this model, whatever the host's load: drafts accepted,
    tokens per verifying pass, and the speed-up the measured pass costs predict."""
    import threading

    from provider.engine.mlx import MlxEngine
    from provider.openai.request import ChatCompletionRequest, ChatMessage

    out: dict[str, Any] = {}
    variants: dict[str, dict[str, Any]] = {"lookup": {"prompt_lookup": "on"}}
    if args.draft_model:
        variants["draft"] = {"draft_model": args.draft_model}
    for name, options in variants.items():
        engine = MlxEngine(model, ignore_eos=True, prompt_cache_bytes=0, **options)
        await engine.load()
        try:
            drafted = accepted = tokens = 0
            for i in range(args.repeats):
                messages = [ChatMessage(**m) for m in repetitive_messages()]  # type: ignore[arg-type]
                request = ChatCompletionRequest(messages=messages, max_tokens=args.spec_tokens)
                rid = f"{name}-{i}"
                async for _ in engine.generate(request, threading.Event(), request_id=rid):
                    pass
                stats = engine.last_stats[rid]
                drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
                tokens += stats.decode_steps
            out[name] = {
                "drafted": drafted,
                "accepted": accepted,
                "acceptance": round(accepted / drafted, 3) if drafted else None,
                "tokens": tokens,
            }
        finally:
            await engine.close()
    if "lookup" in out:
        # What verifying drafts costs on this host, measured as "auto" does at load.
        engine = MlxEngine(model, prompt_lookup="auto", prompt_cache_bytes=0)
        await engine.load()
        await engine.close()
        costs = engine.lookup_costs
        assert costs is not None
        k = engine.num_draft_tokens
        lookup = out["lookup"]
        a = min(lookup["acceptance"] or 0.0, 0.999)
        per_pass = (1 - a ** (k + 1)) / (1 - a)
        lookup |= {
            "plain_step_ms": round(costs.plain_s * 1000, 2),
            "verify_ms_by_drafts": [round(v * 1000, 2) for v in costs.verify_s],
            "tokens_per_verify_pass": round(per_pass, 2),
            "predicted_speedup": round(per_pass / costs.verify_s[k] * costs.plain_s, 3),
            "auto_drafts": costs.pays(),
        }
    return out


async def bench_concurrent(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """4 streams at once on the provider and on mlx_lm server, plus one alone."""
    prompts = Prompts(model)

    async def together(endpoint: Endpoint, http: Any) -> dict[str, float]:
        start = time.perf_counter()
        runs = await asyncio.gather(
            *(endpoint.chat(http, prompts.messages(), 128) for _ in range(CONCURRENCY))
        )
        wall = max(r["end"] for r in runs) - start
        return {
            "aggregate_tps": sum(r["tokens"] for r in runs) / wall,
            "mean_ttft_ms": statistics.mean(r["ttft_ms"] for r in runs),
        }

    rounds = []
    async with (
        provider(model, max_concurrency=CONCURRENCY) as prov,
        mlx_lm_server(model) as server,
        http_session() as http,
    ):
        for endpoint in (prov, server):
            await endpoint.chat(http, prompts.messages(), 8)
        for i in range(args.repeats):
            row: dict[str, Any] = {}
            single = await prov.chat(http, prompts.messages(), 128)
            row["provider_single_ttft_ms"] = single["ttft_ms"]
            order = (prov, server) if i % 2 == 0 else (server, prov)
            for endpoint in order:
                key = "provider" if endpoint is prov else "server"
                c = await together(endpoint, http)
                row[f"{key}_c4_aggregate_tps"] = c["aggregate_tps"]
                row[f"{key}_c4_mean_ttft_ms"] = c["mean_ttft_ms"]
            row["aggregate_vs_server"] = (
                row["provider_c4_aggregate_tps"] / row["server_c4_aggregate_tps"]
            )
            row["c4_ttft_vs_single"] = row["provider_c4_mean_ttft_ms"] / single["ttft_ms"]
            log(f"concurrent round {i + 1}: {row}")
            rounds.append(row)
    return {"rounds": len(rounds), "median": median_of(rounds), "per_round": rounds}


async def bench_decode(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``bench/relay.py``'s paired section: one stream end to end against raw."""
    result = await bench_paired(model, Prompts(model), args)
    return {"rounds": result["rounds"], "median": result["median"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument("--repeats", type=int, default=3, help="paired rounds per section")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--turn1-tokens", type=int, default=190, help="second_turn: turn 1 size")
    parser.add_argument("--system-tokens", type=int, default=300, help="system_prompt: its size")
    parser.add_argument("--requests", type=int, default=4, help="system_prompt: buyers")
    parser.add_argument("--spec-tokens", type=int, default=128, help="speculative: tokens")
    parser.add_argument("--draft-model", help="speculative: also a provider with this draft")
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")

    import mlx.core as mx
    import mlx_lm

    runners: dict[str, Callable[[Path, argparse.Namespace], Any]] = {
        "second_turn": bench_second_turn,
        "system_prompt": bench_system_prompt,
        "speculative": bench_speculative,
        "concurrent": bench_concurrent,
        "decode": bench_decode,
    }
    with model_dir(args) as model:
        results: dict[str, Any] = {
            "model": str(model) if args.model else model.name,
            "device": str(mx.default_device()),
            "mlx": mx.__version__,
            "mlx_lm": mlx_lm.__version__,
            "repeats": args.repeats,
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        }
        for name in wanted:
            started = time.perf_counter()
            try:
                results[name] = asyncio.run(runners[name](model, args))
            except Exception as exc:  # one broken section should not hide the others
                log(f"{name} failed: {exc!r}")
                results[name] = {"error": repr(exc)}
            results[name]["seconds"] = round(time.perf_counter() - started, 1)
            results[name]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
            log(f"{name} took {time.perf_counter() - started:.1f} s")
        results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
