"""Back-to-back buyers on a 1-slot provider: how many find the slot still taken.

A buyer reads a streamed completion up to ``data: [DONE]`` and sends the next
request at once. The stub routes only to a provider that reported ``ready``
and whose slot it no longer counts, so a request that arrives before the
previous request's end frame and ``state_update`` gets a 503. The provider
queues the last chunk, the end frame and the state update together to keep
that window shut; this counts what still gets through it.

Prints ONE JSON line on stdout; progress goes to stderr.

    python bench/back_to_back.py --requests 200
    python bench/back_to_back.py --requests 200 --protocol v1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import relay


async def run(model: Path, requests: int, max_tokens: int, protocol: str) -> dict[str, Any]:
    import aiohttp

    refused = 0
    other: dict[int, int] = {}
    async with (
        relay.serving(model, max_concurrency=1, protocol=protocol) as url,
        aiohttp.ClientSession() as http,
    ):
        for i in range(requests):
            body = {
                "model": model.name,
                "messages": [{"role": "user", "content": f"request {i}"}],
                "max_tokens": max_tokens,
                "stream": True,
            }
            async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
                if resp.status == 503:
                    refused += 1
                elif resp.status != 200:
                    other[resp.status] = other.get(resp.status, 0) + 1
                else:
                    async for line in resp.content:
                        if line.strip() == b"data: [DONE]":
                            break
    return {
        "protocol": protocol,
        "requests": requests,
        "refused_503": refused,
        "other_errors": other,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    relay.add_model_args(parser)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--protocol", choices=["v1", "v2"], default="v2")
    args = parser.parse_args(argv)
    if why := relay.end_to_end_available():
        parser.error(why)
    with relay.model_dir(args) as model:
        result = asyncio.run(run(model, args.requests, args.max_tokens, args.protocol))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
