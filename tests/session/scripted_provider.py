"""``python -m tests.session.scripted_provider URL``: the real ``serve`` path
(signals, drain, exit code) in its own process, with the scripted engine."""

from __future__ import annotations

import asyncio
import sys

from provider.cli import serve
from provider.config import load_config

from .scripted_engine import ScriptedEngine


def main() -> int:
    url, tokens, step = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    config, _ = load_config(
        None,
        environ={},
        overrides={"coordinator_url": url, "model": "scripted", "provider_id": "prov-sub",
                   "status_port": 0},
    )  # fmt: skip
    return asyncio.run(serve(config, engine=ScriptedEngine(tokens=tokens, step_s=step)))


if __name__ == "__main__":
    sys.exit(main())
