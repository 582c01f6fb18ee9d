"""A/B of two provider configurations: which one relays tokens faster.

Starts two coordinator stub + ``mlx-provider serve`` pairs (``max_concurrency``
1) on the same model, each with its own environment overrides (``--a`` and
``--b``, ``MLX_PROVIDER_*`` settings or anything else the provider reads), and
runs ``--rounds`` rounds: one raw :func:`mlx_lm.stream_generate` request, then
one end-to-end request to each side, alternating which side goes first. Each
side's ratio is its buyer-side decode tok/s over the same round's raw decode
tok/s (this host's speed drifts by up to 2x over minutes, so only ratios taken
within a round compare).

A process launch carries its own speed on this host: two providers started
alike differ by up to 3% for as long as they run. So the whole comparison is
repeated ``--launches`` times with fresh processes, and the medians are over
every round of every launch; per-launch medians are reported too.

Prints ONE JSON line on stdout; progress goes to stderr.

    python bench/relay_ab.py --b MLX_PROVIDER_CHUNK_INTERVAL_MS=1000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import relay


def parse_env(pairs: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            parser.error(f"expected KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def summary(
    env: dict[str, str], ratios: list[list[float]], ttft: list[list[float]]
) -> dict[str, Any]:
    every = [r for launch in ratios for r in launch]
    q = statistics.quantiles(every, n=4)
    return {
        "env": env,
        "decode_ratio_median": round(statistics.median(every), 3),
        "decode_ratio_q1": round(q[0], 3),
        "decode_ratio_q3": round(q[2], 3),
        "decode_ratio_per_launch": [round(statistics.median(launch), 3) for launch in ratios],
        "ttft_delta_ms_median": round(statistics.median(t for launch in ttft for t in launch), 2),
    }


async def launch(
    model: Path, prompts: relay.Prompts, raw: Any, envs: dict[str, dict[str, str]], rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """One launch of both sides: ``rounds`` rounds of raw, a and b."""
    import aiohttp

    ratios: dict[str, list[float]] = {"a": [], "b": []}
    ttft: dict[str, list[float]] = {"a": [], "b": []}
    async with (
        relay.serving(model, max_concurrency=1, env=envs["a"]) as a_url,
        relay.serving(model, max_concurrency=1, env=envs["b"]) as b_url,
        aiohttp.ClientSession() as http,
    ):
        urls = {"a": f"{a_url}/v1/chat/completions", "b": f"{b_url}/v1/chat/completions"}
        for url in urls.values():
            await relay.stream_chat(http, url, relay.chat_body(model, prompts))
        for i in range(rounds):
            r = raw()
            for side in ("a", "b") if i % 2 == 0 else ("b", "a"):
                e = await relay.stream_chat(http, urls[side], relay.chat_body(model, prompts))
                ratios[side].append(e["decode_tps"] / r["decode_tps"])
                ttft[side].append(e["ttft_ms"] - r["ttft_ms"])
    return ratios, ttft


def run(model: Path, envs: dict[str, dict[str, str]], launches: int, rounds: int) -> dict[str, Any]:
    prompts = relay.Prompts(model)
    raw = relay.raw_runner(model, prompts)
    raw()
    ratios: dict[str, list[list[float]]] = {"a": [], "b": []}
    ttft: dict[str, list[list[float]]] = {"a": [], "b": []}
    for n in range(launches):
        relay.log(f"launch {n + 1} of {launches}")
        r, t = asyncio.run(launch(model, prompts, raw, envs, rounds))
        for side in ("a", "b"):
            ratios[side].append(r[side])
            ttft[side].append(t[side])
    return {
        "launches": launches,
        "rounds": rounds,
        "a": summary(envs["a"], ratios["a"], ttft["a"]),
        "b": summary(envs["b"], ratios["b"], ttft["b"]),
    }


def main(argv: list[str] | None = None) -> int:
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    relay.add_model_args(parser)
    parser.add_argument("--launches", type=int, default=4, help="fresh process pairs")
    parser.add_argument("--rounds", type=int, default=20, help="rounds per launch")
    parser.add_argument("--a", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--b", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.launches < 1:
        parser.error("--rounds must be at least 2 and --launches at least 1")
    a, b = parse_env(args.a, parser), parse_env(args.b, parser)
    if why := relay.end_to_end_available():
        parser.error(why)
    with relay.model_dir(args) as model:
        result = run(model, {"a": a, "b": b}, args.launches, args.rounds)
    result["model"] = str(model) if args.model else model.name
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
