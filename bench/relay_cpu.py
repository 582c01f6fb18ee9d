"""Event-loop CPU per relayed frame: what the provider's relay path costs.

On a 2-core host every bit of CPU the relay takes comes out of generation
(and the loop thread also holds the GIL the generation thread needs), so the
relay's own cost is worth measuring apart from decode speed, which this host
makes noisy. Here a thread plays the generation thread: 128 tokens at about
1,400 tok/s (the tiny test model's speed), holding the GIL for part of each
step as graph building does, handing text over through the engine's real
hand-off (``GenerationJob.publish``, every ``--interval-ms``). The event loop relays
it two ways to a WebSocket sink in another process:

- ``relay``: what ``mlx-provider`` does on v1, :func:`provider.coordinator.jobs.relay`
  writing through :class:`provider.coordinator.sender.Sender`;
- ``relay_v2``: the same on the v2 encrypted leg: each chunk and the end
  frame sealed (plaintext envelope, AES-256-GCM, base64url) as the session
  seals them, with keys from a real X25519 exchange;
- ``bare``: one ``ws.send`` per hand-off, the least any relay can do.

``relay`` and ``relay_v2`` alternate in ``--rounds`` rounds (this host drifts);
each figure is the median over rounds.

Prints ONE JSON line: loop-thread CPU per request and per frame, and event
loop iterations per frame, for both. Progress goes to stderr.

    python bench/relay_cpu.py --requests 80
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from websockets.asyncio.client import connect

from provider.coordinator import tier2
from provider.coordinator.jobs import Job, Outcome, end_frame, relay
from provider.coordinator.messages import (
    EncryptedChunk,
    EncryptedEnd,
    InferenceResponseChunk,
    encode,
    encode_text,
)
from provider.coordinator.sender import Sender
from provider.engine import TokenBatch
from provider.engine.job import GenerationJob, RequestStats
from provider.engine.mlx import MlxEngine
from provider.openai.request import ChatCompletionRequest, ChatMessage

TOKENS = 128
#: Per token: GIL held (graph building), then released (MLX evaluating).
HOLD_S = 0.0004
RELEASE_S = 0.0003

SINK = """
import asyncio
from websockets.asyncio.server import serve

async def drain(ws):
    async for _ in ws:
        pass

async def main():
    async with serve(drain, "127.0.0.1", 0, compression=None) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()

asyncio.run(main())
"""


class FakeGeneration:
    """Engine stand-in: a thread produces tokens; the real ``_Job`` hands them over."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        # Only for its _results(): the loop side of the hand-off. Loads nothing.
        self._engine = MlxEngine("unused", handoff_interval=interval)

    async def generate(
        self, request: ChatCompletionRequest, cancel: threading.Event
    ) -> AsyncIterator[TokenBatch]:
        stats = RequestStats(request_id="r", prompt_tokens=128, max_tokens=TOKENS)
        job = GenerationJob(
            request_id="r", prompt=[0] * 128, max_tokens=TOKENS, temperature=0.0, top_p=1.0,
            seed=None, stop=[], cancel=cancel, loop=asyncio.get_running_loop(), stats=stats,
            handoff_interval=self.interval,
        )  # fmt: skip

        def run() -> None:
            for n in range(TOKENS):
                start = time.perf_counter()
                while time.perf_counter() - start < HOLD_S:
                    pass
                time.sleep(RELEASE_S)
                stats.completion_tokens = n + 1
                job.publish(" tok")
            job.finish("length")

        thread = threading.Thread(target=run)
        thread.start()
        try:
            async for batch in self._engine._results(job):
                yield batch
        finally:
            thread.join()


def count_iterations(loop: asyncio.AbstractEventLoop) -> Callable[[], int]:
    """Count event-loop iterations (one selector poll each)."""
    selector = loop._selector  # type: ignore[attr-defined]
    select = selector.select
    count = 0

    def counted(timeout: float | None = None) -> Any:
        nonlocal count
        count += 1
        return select(timeout)

    selector.select = counted
    return lambda: count


async def measure(
    name: str, one: Callable[[], Awaitable[int]], requests: int, iterations: Callable[[], int]
) -> dict[str, float]:
    await one()  # warm-up
    frames = 0
    loops = iterations()
    cpu = time.thread_time()
    for _ in range(requests):
        frames += await one()
    cpu = time.thread_time() - cpu
    loops = iterations() - loops
    print(f"[relay_cpu] {name}: {cpu / requests * 1e3:.2f} ms per request", file=sys.stderr)
    return {
        "loop_cpu_ms_per_request": round(cpu / requests * 1e3, 3),
        "loop_cpu_us_per_frame": round(cpu / frames * 1e6, 1),
        "frames_per_request": round(frames / requests, 2),
        "loop_iterations_per_frame": round(loops / frames, 2),
    }


def encrypted_leg() -> tier2.EncryptedLeg:
    """A leg keyed the way a v2 handshake keys it (both X25519 halves here)."""
    ours, theirs = tier2.generate_key(), tier2.generate_key()
    keys = tier2.derive_keys(
        tier2.shared_secret(ours, tier2.public_bytes(theirs)),
        "relay-cpu",
        "00000000-0000-0000-0000-000000000000",
        tier2.public_bytes(ours),
        tier2.public_bytes(theirs),
        tier2.AEAD_SUITE,
    )
    return tier2.EncryptedLeg(
        keys, "relay-cpu", "00000000-0000-0000-0000-000000000000", chunk_envelope=True
    )


def sealer(leg: tier2.EncryptedLeg) -> Callable[[Any], Any]:
    """``Session._seal``: a chunk or end frame as it goes out on the encrypted leg."""

    def seal(msg: Any) -> Any:
        if isinstance(msg, InferenceResponseChunk):
            plaintext = leg.chunk_plaintext(msg.seq, msg.data)
            enc = leg.seal("inference_response_chunk", msg.request_id, True, plaintext)
            return EncryptedChunk(request_id=msg.request_id, enc=enc)
        enc = leg.seal("inference_response_end", msg.request_id, True, encode(msg))
        return EncryptedEnd(request_id=msg.request_id, enc=enc)

    return seal


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    sink = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SINK, stdout=asyncio.subprocess.PIPE, cwd="/"
    )
    try:
        assert sink.stdout is not None
        port = int(await sink.stdout.readline())
        iterations = count_iterations(asyncio.get_running_loop())
        interval = args.interval_ms / 1000.0
        engine = FakeGeneration(interval)
        request = ChatCompletionRequest(
            messages=[ChatMessage(role="user", content="x")], max_tokens=TOKENS, stream=True
        )
        async with connect(f"ws://127.0.0.1:{port}", compression=None) as ws:
            sender = Sender(ws)
            writer = asyncio.create_task(sender.run())

            async def via_relay() -> int:
                job = Job(request_id="r", stream=True)
                outcome = await relay(
                    job, request, engine, sender.send, model_id="m",  # type: ignore[arg-type]
                    chunk_interval=interval, post=sender.post,
                )  # fmt: skip
                sender.post(end_frame(job, outcome, model_hash=None, terminal_ts_ms=0))
                return job.chunks_sent + 1

            leg = encrypted_leg()
            seal = sealer(leg)

            async def via_relay_v2() -> int:
                job = Job(request_id="r", stream=True)

                def send(chunk: InferenceResponseChunk) -> Awaitable[None]:
                    return sender.send(seal(chunk))

                def post(chunk: InferenceResponseChunk) -> None:
                    sender.post(seal(chunk))

                outcome: Outcome = await relay(
                    job, request, engine, send, model_id="m",  # type: ignore[arg-type]
                    chunk_interval=interval, post=post,
                )  # fmt: skip
                sender.post(seal(end_frame(job, outcome, model_hash=None, terminal_ts_ms=0)))
                return job.chunks_sent + 1

            async def bare() -> int:
                frames = 0
                async for batch in engine.generate(request, threading.Event()):
                    chunk = InferenceResponseChunk(request_id="r", seq=frames, data=batch.text)
                    await ws.send(encode_text(chunk))
                    frames += 1
                return frames

            ways = {"relay": via_relay, "relay_v2": via_relay_v2}
            rounds: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
            for i in range(args.rounds):
                for name in list(ways) if i % 2 == 0 else list(ways)[::-1]:
                    rounds[name].append(await measure(name, ways[name], args.requests, iterations))
            result = {name: median_of(runs) for name, runs in rounds.items()}
            result["bare"] = await measure("bare", bare, args.requests, iterations)
            writer.cancel()
        v1, v2 = result["relay"], result["relay_v2"]
        return {
            "interval_ms": args.interval_ms,
            "requests": args.requests,
            "rounds": args.rounds,
            **result,
            "v2_extra_loop_cpu_ms_per_request": round(
                v2["loop_cpu_ms_per_request"] - v1["loop_cpu_ms_per_request"], 3
            ),
        }
    finally:
        sink.kill()
        await sink.wait()


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=80, help="requests per way")
    parser.add_argument("--interval-ms", type=float, default=20.0, help="hand-off interval")
    parser.add_argument("--rounds", type=int, default=5, help="relay / relay_v2 alternations")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(bench(args))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
