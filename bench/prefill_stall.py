"""Prefill stall benchmark: does a running stream freeze while another prompt prefills?

The scenario (issue 17), on a server with ``max_concurrency`` 4: buyer A
streams a long answer; ``--b-delay`` seconds (3) after A's first token, buyer
B sends a prompt of ``--b-prompt-tokens`` (230) and streams a short answer.
Measured at the buyers (SSE arrival times), for these sides run in turn in
every round (the order rotates from round to round):

- ``sliced``: coordinator stub + ``mlx-provider serve`` with time-sliced
  prefill at the provider's default ``prefill_slice_ms``; with
  ``--slice-ms 100,250`` one side per value instead (``sliced_100ms``,
  ``sliced_250ms``), to see the trade-off between the targets in one run;
- ``fixed``: the same provider with ``MLX_PROVIDER_PREFILL_SLICE_MS=0``, the
  fixed 512-token chunks of the code before issue 17 ("today's code");
- ``server``: ``mlx_lm server`` (continuous batching, its own prefill).

Per run: A's gaps between consecutive SSE content events: the median over
A's whole stream, the median before B was sent (A alone), and the longest
gap that overlaps B's prefill (from B's request to B's first token); B's
time to first token; aggregate tokens/s (A's and B's tokens over the time
from A's request to the last token of either). Both requests generate exactly
their ``max_tokens`` (EOS suppressed: ``MLX_ENGINE_IGNORE_EOS`` for the
provider, a ``logit_bias`` for ``mlx_lm server``). They sample at
``--temperature`` 1 by default: greedy, a random-weight model soon repeats
one token forever, and some tokens are pieces of a UTF-8 character whose text
never shows, so no content event is sent and the buyer would time a "gap"
the server never had. A's length is set from a calibration (A alone and B's prefill alone on the
``fixed`` side) so that A outlives B on every side; each run says whether it
did (``a_outlived_b``) and lists A's gaps during B's prefill.

Ratios are taken within a round (this host's speed drifts over minutes), and
the summary gives their medians next to the issue's targets: A's longest gap
during B's prefill at most 3x A's median gap; B's TTFT at most 1.3x
``mlx_lm server``'s; aggregate tokens/s of ``sliced`` not below ``fixed``'s
(each checked for every sliced side).

Prints ONE JSON line on stdout (with the host's load average before and after
and every setting used); progress goes to stderr.

    python bench/prefill_stall.py --size small --quantize
    python bench/prefill_stall.py --size smollm2 --slice-ms 250,500
    python bench/prefill_stall.py --model ~/models/Llama-3.2-1B-Instruct-4bit
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import relay

CONCURRENCY = 4
SIDES = ("sliced", "fixed", "server")


def slice_of(name: str) -> str | None:
    """The ``MLX_PROVIDER_PREFILL_SLICE_MS`` of a provider side (None: the default)."""
    if name == "fixed":
        return "0"
    if name.startswith("sliced_"):
        return name.removeprefix("sliced_").removesuffix("ms")
    return None


def log(text: str) -> None:
    print(f"[prefill_stall] {text}", file=sys.stderr, flush=True)


@dataclass
class Stream:
    """One streamed request as the buyer saw it (``time.perf_counter`` values)."""

    sent: float
    events: list[float] = field(default_factory=list)  # content deltas
    first: float | None = None  # first delta of any kind (role or content)
    tokens: int = 0  # usage.completion_tokens

    @property
    def last(self) -> float:
        return self.events[-1] if self.events else (self.first or self.sent)


async def stream(
    http: Any, url: str, body: dict[str, Any], started: asyncio.Event | None
) -> Stream:
    """POST a streamed chat completion; timestamp every delta."""
    from provider.ops.demo import sse_chunks

    out = Stream(sent=time.perf_counter())
    async with http.post(url, json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        async for chunk in sse_chunks(resp):
            now = time.perf_counter()
            if chunk.get("usage"):
                out.tokens = chunk["usage"].get("completion_tokens", out.tokens)
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {})
                if out.first is None and (delta.get("role") or delta.get("content")):
                    out.first = now
                    if started is not None:
                        started.set()
                if delta.get("content"):
                    out.events.append(now)
    return out


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def measure(a: Stream, b: Stream) -> dict[str, Any]:
    """The scenario's figures from A's and B's streams (milliseconds, tokens/s)."""
    assert b.first is not None
    a_gaps = gaps(a.events)
    alone = gaps([t for t in a.events if t <= b.sent])
    # Gaps overlapping B's prefill: the interval (t_i, t_i+1) meets (b.sent, b.first).
    during = [t1 - t0 for t0, t1 in itertools.pairwise(a.events) if t1 > b.sent and t0 < b.first]
    end = max(a.last, b.last)
    median = statistics.median(a_gaps) if a_gaps else math.nan
    median_alone = statistics.median(alone) if alone else math.nan
    worst_during = max(during) if during else math.nan
    return {
        "a_tokens": a.tokens,
        "b_tokens": b.tokens,
        "a_events": len(a.events),
        "a_median_gap_ms": 1000 * median,
        "a_median_gap_alone_ms": 1000 * median_alone,
        "a_max_gap_during_b_prefill_ms": 1000 * worst_during,
        "a_median_gap_during_b_prefill_ms": 1000 * statistics.median(during)
        if during
        else math.nan,
        "a_max_gap_ms": 1000 * max(a_gaps) if a_gaps else math.nan,
        "gap_ratio": worst_during / median,
        "gap_ratio_vs_alone": worst_during / median_alone,
        "b_ttft_ms": 1000 * (b.first - b.sent),
        "aggregate_tps": (a.tokens + b.tokens) / (end - a.sent),
        "a_outlived_b": a.last > b.first,
        # Every gap of A's that overlaps B's prefill, in order: where the time went.
        "a_gaps_during_b_prefill_ms": [round(1000 * g) for g in during],
    }


class Scenario:
    """Runs the A-then-B scenario against one OpenAI-compatible endpoint."""

    def __init__(
        self,
        url: str,
        body: Callable[[list[dict[str, str]], int], dict[str, Any]],
        a_prompts: relay.Prompts,
        b_prompts: relay.Prompts,
        args: argparse.Namespace,
    ) -> None:
        self.url = url
        self.body = body
        self.a_prompts = a_prompts
        self.b_prompts = b_prompts
        self.args = args

    async def run(self, http: Any, a_tokens: int) -> dict[str, Any]:
        a_started = asyncio.Event()
        a_task = asyncio.create_task(
            stream(http, self.url, self.body(self.a_prompts.messages(), a_tokens), a_started)
        )
        await a_started.wait()
        await asyncio.sleep(self.args.b_delay)  # the scenario: B arrives 3 s into A's answer
        b = await stream(
            http, self.url, self.body(self.b_prompts.messages(), self.args.b_tokens), None
        )
        a = await a_task
        return measure(a, b)

    async def alone(self, http: Any, prompts: relay.Prompts, tokens: int) -> Stream:
        return await stream(http, self.url, self.body(prompts.messages(), tokens), None)


@contextlib.asynccontextmanager
async def side(
    name: str, model: Path, a_prompts: relay.Prompts, b_prompts: relay.Prompts, args: Any
) -> AsyncIterator[Scenario]:
    """A running server for one side, as a :class:`Scenario`."""
    if name == "server":
        async with relay.mlx_lm_serving(model, b_prompts) as (url, make):
            template = make()

            def server_body(messages: list[dict[str, str]], tokens: int) -> dict[str, Any]:
                return {
                    **template,
                    "messages": messages,
                    "max_tokens": tokens,
                    "temperature": args.temperature,
                }

            yield Scenario(url, server_body, a_prompts, b_prompts, args)
        return
    env: dict[str, str] = {}
    if (slice_ms := slice_of(name)) is not None:
        env["MLX_PROVIDER_PREFILL_SLICE_MS"] = slice_ms
    async with relay.serving(model, max_concurrency=CONCURRENCY, env=env) as http_url:

        def provider_body(messages: list[dict[str, str]], tokens: int) -> dict[str, Any]:
            return {
                "model": model.name,
                "messages": messages,
                "max_tokens": tokens,
                "temperature": args.temperature,
                "stream": True,
                "stream_options": {"include_usage": True},
            }

        yield Scenario(f"{http_url}/v1/chat/completions", provider_body, a_prompts, b_prompts, args)


async def bench(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    a_prompts = relay.Prompts(model, args.a_prompt_tokens)
    b_prompts = relay.Prompts(model, args.b_prompt_tokens)
    sides = side_names(args)
    sliced = [name for name in sides if name.startswith("sliced")]
    timeout = aiohttp.ClientTimeout(total=3600)
    # SIGTERM cancels the run, so the servers this run started are stopped.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    async with contextlib.AsyncExitStack() as stack:
        scenarios = {}
        for name in sides:
            log(f"starting {name}")
            scenarios[name] = await stack.enter_async_context(
                side(name, model, a_prompts, b_prompts, args)
            )
        http = await stack.enter_async_context(aiohttp.ClientSession(timeout=timeout))

        # Calibration on one side (warms every side up as well): A's decode
        # speed alone and B's prefill alone, so A can be made long enough to
        # outlive B's prefill and answer everywhere.
        for scenario in scenarios.values():
            await scenario.alone(http, a_prompts, 8)
        ref = scenarios.get("fixed") or next(iter(scenarios.values()))
        decode = await ref.alone(http, a_prompts, 32)
        # Tokens, not events: the provider coalesces tokens into 20 ms frames.
        decode_s = (decode.last - (decode.first or decode.sent)) / max(1, decode.tokens - 1)
        prefill = await ref.alone(http, b_prompts, 1)
        prefill_s = (prefill.first or prefill.sent) - prefill.sent
        a_tokens = args.a_tokens or min(
            4000,
            math.ceil(
                (args.b_delay + 2.0 * prefill_s + 2.5 * args.b_tokens * decode_s) / decode_s
                + args.b_tokens
                + 16
            ),
        )
        calibration = {
            "decode_ms_per_token": round(1000 * decode_s, 2),
            "b_prefill_alone_ms": round(1000 * prefill_s, 1),
            "a_tokens": a_tokens,
        }
        log(f"calibration: {calibration}")

        rounds = []
        for r in range(args.rounds):
            order = sides[r % len(sides) :] + sides[: r % len(sides)]
            results: dict[str, dict[str, Any]] = {}
            for name in order:
                log(f"round {r + 1}/{args.rounds}: {name}")
                results[name] = await scenarios[name].run(http, a_tokens)
                log(f"  {json.dumps(rounded(results[name]))}")
            ratios = {}
            for name in sliced:
                if "server" in results:
                    ratios[f"b_ttft_{name}_vs_server"] = (
                        results[name]["b_ttft_ms"] / results["server"]["b_ttft_ms"]
                    )
                if "fixed" in results:
                    ratios[f"aggregate_{name}_vs_fixed"] = (
                        results[name]["aggregate_tps"] / results["fixed"]["aggregate_tps"]
                    )
                    ratios[f"b_ttft_{name}_vs_fixed"] = (
                        results[name]["b_ttft_ms"] / results["fixed"]["b_ttft_ms"]
                    )
            if "fixed" in results and "server" in results:
                ratios["b_ttft_fixed_vs_server"] = (
                    results["fixed"]["b_ttft_ms"] / results["server"]["b_ttft_ms"]
                )
            rounds.append({"order": order, "sides": results, "ratios": ratios})

    medians: dict[str, Any] = {}
    for name in sides:
        keys = [
            k
            for k, v in rounds[0]["sides"][name].items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        medians[name] = {k: statistics.median(x["sides"][name][k] for x in rounds) for k in keys}
        medians[name]["a_outlived_b_in_every_round"] = all(
            x["sides"][name]["a_outlived_b"] for x in rounds
        )
    ratio_medians = {
        k: statistics.median(x["ratios"][k] for x in rounds) for k in rounds[0]["ratios"]
    }
    targets: dict[str, dict[str, bool]] = {}
    for name in sliced:
        met = targets[name] = {
            "gap_ratio_le_3": medians[name]["gap_ratio"] <= 3.0,
            "gap_ratio_vs_alone_le_3": medians[name]["gap_ratio_vs_alone"] <= 3.0,
        }
        if f"b_ttft_{name}_vs_server" in ratio_medians:
            met["b_ttft_le_1_3x_server"] = ratio_medians[f"b_ttft_{name}_vs_server"] <= 1.3
        if f"aggregate_{name}_vs_fixed" in ratio_medians:
            # Within this host's run-to-run noise (a few percent) counts as "not below".
            met["aggregate_not_below_fixed"] = ratio_medians[f"aggregate_{name}_vs_fixed"] >= 0.97
    return {
        "calibration": calibration,
        "median": rounded(medians),
        "ratios_median": rounded(ratio_medians),
        "targets_met": targets,
        "per_round": rounded(rounds),
    }


def side_names(args: argparse.Namespace) -> list[str]:
    """``--sides`` with ``sliced`` expanded to one side per ``--slice-ms`` value."""
    names = []
    for name in (s.strip() for s in args.sides.split(",") if s.strip()):
        if name == "sliced" and args.slice_ms:
            values = [float(v) for v in args.slice_ms.split(",") if v.strip()]
            if any(v <= 0 for v in values):
                raise ValueError("values must be > 0 (the fixed side is prefill_slice_ms 0)")
            names += [f"sliced_{v:g}ms" for v in values]
        else:
            names.append(name)
    return names


def rounded(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isnan(value) else round(value, 3)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    relay.add_model_args(parser)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sides", default=",".join(SIDES), help="subset of sliced,fixed,server")
    parser.add_argument(
        "--slice-ms",
        help="comma-separated prefill_slice_ms values: one sliced side each "
        "(default: one side at the provider's default)",
    )
    parser.add_argument("--a-prompt-tokens", type=int, default=64)
    parser.add_argument("--b-prompt-tokens", type=int, default=230)
    parser.add_argument("--b-delay", type=float, default=3.0, help="seconds after A's first token")
    parser.add_argument("--b-tokens", type=int, default=32, help="B's max_tokens")
    parser.add_argument("--a-tokens", type=int, help="A's max_tokens (default: calibrated)")
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="sampling temperature of A and B (0: greedy; see the module docstring)",
    )
    args = parser.parse_args(argv)
    unknown = {s.strip() for s in args.sides.split(",")} - set(SIDES)
    if unknown:
        parser.error(f"unknown sides: {', '.join(sorted(unknown))}")
    try:
        side_names(args)
    except ValueError as exc:
        parser.error(f"--slice-ms: {exc}")

    import mlx.core as mx
    import mlx_lm

    load_before = os.getloadavg()
    started = time.perf_counter()
    with relay.model_dir(args) as model:
        results: dict[str, Any] = {
            "model": str(model) if args.model else model.name,
            "scenario": {
                "max_concurrency": CONCURRENCY,
                "a_prompt_tokens": args.a_prompt_tokens,
                "b_prompt_tokens": args.b_prompt_tokens,
                "b_delay_s": args.b_delay,
                "b_tokens": args.b_tokens,
                "temperature": args.temperature,
                "sides": side_names(args),
            },
            "device": str(mx.default_device()),
            "mlx": mx.__version__,
            "mlx_lm": mlx_lm.__version__,
            "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
        }
        results |= asyncio.run(bench(model, args))
    results["host"]["loadavg_before"] = [round(x, 2) for x in load_before]
    results["host"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    results["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
