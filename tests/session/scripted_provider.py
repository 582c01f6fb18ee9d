"""``python -m tests.session.scripted_provider URL``: the real ``serve`` path
(signals, drain, exit code) in its own process, with the scripted engine."""

from __future__ import annotations

import argparse
import asyncio
import sys

from provider.cli import serve
from provider.config import load_config

from .scripted_engine import ScriptedEngine


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("tokens", type=int)
    parser.add_argument("step", type=float)
    parser.add_argument("--block", type=float, default=0.0, help="prefill time for [block] prompts")
    parser.add_argument("--protocol", choices=["v1", "v2"], default="v2")
    args = parser.parse_args()
    config, _ = load_config(
        None,
        environ={},
        overrides={"coordinator_url": args.url, "model": "scripted", "provider_id": "prov-sub",
                   "status_port": 0, "protocol": args.protocol, "catalog_feed_url": "off"},
    )  # fmt: skip
    engine = ScriptedEngine(tokens=args.tokens, step_s=args.step, block_s=args.block)
    return asyncio.run(serve(config, engine=engine))


if __name__ == "__main__":
    sys.exit(main())
