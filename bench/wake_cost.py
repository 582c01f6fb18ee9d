"""What a woken event loop costs generation: in this process, or in another.

Would generation in its own process (no GIL shared with the event loop)
decode faster than the engine's generation thread? This measures the question
directly. ``generate_step`` decodes 128 tokens on the main thread and, every
``--interval-ms``, wakes an asyncio loop that does ``--work-us`` of Python
work spread over ``--iterations`` loop iterations (roughly what relaying one
frame costs). Three variants take turns, request by request, so the host's
speed drift cancels:

- ``none``: nobody is woken (the floor);
- ``thread``: the loop runs on a thread of this process, woken with
  ``call_soon_threadsafe`` (what the provider does);
- ``process``: the loop runs in a child process, woken through a pipe (what a
  separate generation process would do).

If the GIL were the cost, ``thread`` would fall well below ``process``.
Prints ONE JSON line: median decode tok/s of each variant and the median
per-request ratio of ``thread`` and ``process`` to ``none``.

    python bench/wake_cost.py --work-us 200 --iterations 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import relay

TOKENS = 128


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def serve_wakes(queue: asyncio.Queue[None], work_s: float, iterations: int) -> None:
    while True:
        await queue.get()
        for _ in range(iterations):
            busy(work_s / iterations)
            await asyncio.sleep(0)  # one loop iteration, as a task hop costs


def loop_thread(work_s: float, iterations: int) -> Callable[[], None]:
    """Start the loop on a thread of this process; return its wake function."""
    ready: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[None]]] = []
    started = threading.Event()

    async def main() -> None:
        ready.append((asyncio.get_running_loop(), asyncio.Queue()))
        started.set()
        await serve_wakes(ready[0][1], work_s, iterations)

    threading.Thread(target=asyncio.run, args=(main(),), daemon=True).start()
    started.wait()
    loop, queue = ready[0]
    return lambda: loop.call_soon_threadsafe(queue.put_nowait, None)


def child_main(work_s: float, iterations: int) -> None:
    """The ``process`` variant's loop: one wake per byte on stdin."""

    async def main() -> None:
        queue: asyncio.Queue[None] = asyncio.Queue()
        closed = asyncio.get_running_loop().create_future()

        def readable() -> None:
            data = os.read(0, 4096)
            if not data and not closed.done():
                closed.set_result(None)  # the parent is gone
            for _ in data:
                queue.put_nowait(None)

        asyncio.get_running_loop().add_reader(0, readable)
        server = asyncio.ensure_future(serve_wakes(queue, work_s, iterations))
        await closed
        server.cancel()

    asyncio.run(main())


def loop_process(work_s: float, iterations: int) -> Callable[[], None]:
    """Start the loop in a child process; return its wake function."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", str(work_s), str(iterations)],
        stdin=subprocess.PIPE,
    )
    assert child.stdin is not None
    fd = child.stdin.fileno()

    def wake() -> None:
        os.write(fd, b"x")

    return wake


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    relay.add_model_args(parser)
    parser.add_argument("--work-us", type=float, default=200.0, help="loop work per wake")
    parser.add_argument("--iterations", type=int, default=4, help="loop iterations per wake")
    parser.add_argument("--interval-ms", type=float, default=20.0, help="time between wakes")
    parser.add_argument("--requests", type=int, default=40, help="requests per variant")
    parser.add_argument("--child", nargs=2, type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child[0], int(args.child[1]))
        return 0

    with relay.model_dir(args) as model_path:
        result = measure(model_path, args)
    result["model"] = str(model_path) if args.model else model_path.name
    print(json.dumps(result), flush=True)
    return 0


def measure(model_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    prompts = relay.Prompts(model_path)
    model, tokenizer = load(str(model_path))
    sampler = relay.greedy_without_eos(model, tokenizer)

    interval = args.interval_ms / 1000

    def decode_tps(wake: Callable[[], None] | None) -> float:
        ids = mx.array(
            tokenizer.apply_chat_template(prompts.messages(), add_generation_prompt=True)
        )
        first = last_wake = 0.0
        n = 0
        for _ in generate_step(ids, model, max_tokens=TOKENS, sampler=sampler):
            now = time.perf_counter()
            first = first or now
            n += 1
            if wake is not None and now - last_wake >= interval:
                last_wake = now
                wake()
        return (n - 1) / (time.perf_counter() - first)

    work_s = args.work_us / 1e6
    variants: dict[str, Callable[[], None] | None] = {"none": None}
    variants["process"] = loop_process(work_s, args.iterations)
    variants["thread"] = loop_thread(work_s, args.iterations)
    for wake in variants.values():
        decode_tps(wake)
    tps: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.requests):
        names = list(variants) if i % 2 == 0 else list(reversed(variants))
        for name in names:
            tps[name].append(decode_tps(variants[name]))
    result: dict[str, Any] = {
        "work_us": args.work_us,
        "iterations": args.iterations,
        "interval_ms": args.interval_ms,
        "requests": args.requests,
        "decode_tps": {name: round(statistics.median(v), 1) for name, v in tps.items()},
    }
    for name in ("thread", "process"):
        ratios = [a / b for a, b in zip(tps[name], tps["none"], strict=True)]
        result[f"{name}_ratio"] = round(statistics.median(ratios), 3)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
