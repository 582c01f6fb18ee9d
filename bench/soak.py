"""Soak: the provider under steady buyer traffic and a cycle of coordinator faults.

The coordinator stub runs in this process with its hostile timers at the real
coordinator's defaults; ``mlx-provider serve`` runs as a real subprocess with
the MLX engine (the tiny random-weight model unless ``--model`` is given).
For ``--minutes`` of traffic, ``--buyers`` tasks send a mix of streaming,
non-streaming and buyer-cancelled chat completions (random prompts, 4-64
max_tokens) through the stub's OpenAI API, while every ``--fault-every``
seconds one fault from a fixed cycle is injected: drop, stalled reads, drop
then refused connections, drop then accept-then-close, delayed frames,
duplicated frames, coordinator restart on the same ports. The provider speaks
protocol v2 (``--protocol``; v1 for older coordinators): every request and
answer goes over the encrypted leg, so a frame the stub writes twice is a
replay, which the provider refuses by name (``tier2_aead_decrypt_failed``,
logged as an error and counted apart) and on which the stub closes the leg
as the real coordinator does; the provider then reconnects with fresh keys.

What it measures:

- every request's outcome. A request is *lost* when it got no terminal
  answer within 120 s, when a 200 stream ended without ``data: [DONE]`` and
  without an error event, or when a 200 body was cut or incomplete. HTTP
  errors, SSE error events and an unreachable coordinator are answers.
- per fault: when it was injected and how long until the provider was ready
  (warmed, ``ready`` or ``busy``) in the stub again; over 60 s is unrecovered.
- the longest gap between heartbeats the stub received while the provider
  was connected (hello to first heartbeat included; gaps spanning a stall
  are excluded and listed; gaps across a reconnect are reconnect times).
- reconnect times: a session's drop to the provider's next registration
  (``hello`` or ``auth_request``).
- the provider's RSS after warm-up and at the end, and its exit code after
  SIGTERM (it must drain and exit 0).

Prints ONE JSON object on stdout (exit status 1 if a check failed);
progress goes to stderr, logs to a temp directory named in the JSON.

    python bench/soak.py --minutes 10
    python bench/soak.py --minutes 3 --fault-every 20
    python bench/soak.py --minutes 2 --fault-every 15 --seed 1 --protocol v1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coordinator_stub.app import CoordinatorStub  # noqa: E402
from coordinator_stub.config import StubConfig  # noqa: E402
from coordinator_stub.observe import RejectRecord  # noqa: E402
from coordinator_stub.pool import DropRecord, ProviderRecord  # noqa: E402

PROVIDER_ID = "soak-provider"
TOKEN = "soak_provider_token_local"

#: A request without a terminal answer this long after it was sent is lost.
REQUEST_BOUND_S = 120.0
#: How long the coordinator stays stalled unless the provider leaves it first.
STALL_HOLD_S = 30.0
#: A fault after which the provider is not ready again this long is unrecovered.
RECOVERY_BOUND_S = 60.0
#: How long the delay and duplicate faults stay on.
WINDOW_S = 10.0
#: How long the coordinator stays down during a restart.
RESTART_DOWN_S = 5.0
#: First model load and registration (cold MLX import, model build).
STARTUP_BOUND_S = 180.0
#: SIGTERM to exit: the provider drains; buyers have stopped by then.
EXIT_BOUND_S = 60.0
#: The provider's default stable_after_s (provider/config.py).
PROVIDER_STABLE_S = 10.0
#: No fault is injected this close to the end of the traffic.
FAULT_TAIL_S = 20.0
RSS_EVERY_S = 10.0
PROGRESS_EVERY_S = 30.0
MAX_REQUESTS_PER_BUYER = 1_000_000
#: Frames kept per direction by each stub: far above what a run produces
#: (the tiny model makes well under 200 frames/s), so no heartbeat is evicted.
FRAMES_PER_SECOND_KEPT = 1_000

HEARTBEAT_GAP_TARGET_S = 6.0
RSS_GROWTH_TARGET_PCT = 10.0

FAULT_KINDS = (
    "drop",
    "stall_reads",
    "drop_then_refuse_connections_5s",
    "drop_then_accept_then_close_3",
    "delay_frames_0.2s",
    "duplicate_frames",
    "coordinator_restart",
)
REQUEST_KINDS = ("stream", "non_stream", "cancelled")
REQUEST_WEIGHTS = (45, 35, 20)
WORDS = (
    "lighthouse harbour tide lantern keeper storm gull rope anchor fog bell "
    "island reef signal beacon night wave shore captain compass map voyage "
    "ledger market price token latency buyer provider model stream answer"
).split()


def say(text: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# State


@dataclass
class Generation:
    """What one stub instance saw (a restart starts a new one): read after it stopped."""

    index: int
    heartbeats: dict[int, list[float]]
    heartbeat_bytes: list[int]
    hellos: list[tuple[int, float]]
    drops: list[DropRecord]
    rejections: list[RejectRecord]
    counters: dict[str, Any]
    frames_in: int
    log_full: bool


@dataclass
class Soak:
    args: argparse.Namespace
    config: StubConfig
    stub: CoordinatorStub
    http_url: str = ""
    model_id: str = ""
    t0: float = 0.0
    end: float = 0.0
    generations: list[Generation] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    answer_s: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    lost: list[dict[str, Any]] = field(default_factory=list)
    unreachable_at: list[float] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    stall_windows: list[tuple[float, float]] = field(default_factory=list)
    restart_windows: list[tuple[float, float]] = field(default_factory=list)
    rss_samples: list[tuple[float, float]] = field(default_factory=list)

    def at(self, when: float | None = None) -> float:
        """Seconds since traffic started, rounded for the report."""
        return round((time.monotonic() if when is None else when) - self.t0, 2)


# --------------------------------------------------------------------------
# Provider process


def provider_env(workdir: Path) -> dict[str, str]:
    # Keep the user's own config file, keys and MLX_PROVIDER_* settings out of the run.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_PROVIDER_")}
    config = workdir / "provider.toml"
    # The stub serves no catalog here (its dev profile admits without one).
    config.write_text('catalog_feed_url = "off"\n')
    config.chmod(0o600)
    env["MLX_PROVIDER_CONFIG"] = str(config)
    env["HOME"] = str(workdir / "home")  # the receipt key and model-identity cache
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def start_provider(
    ws_url: str, model: str, max_concurrency: int, workdir: Path, protocol: str
) -> asyncio.subprocess.Process:
    with (workdir / "provider.log").open("wb") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "provider", "serve", "--coordinator", ws_url,
            "--model", model, "--provider-id", PROVIDER_ID, "--token", TOKEN,
            "--max-concurrency", str(max_concurrency), "--status-port", "0",
            "--log-level", "info", "--protocol", protocol,
            cwd=ROOT, env=provider_env(workdir), stdin=asyncio.subprocess.DEVNULL,
            stdout=log, stderr=log,
        )  # fmt: skip


async def stop_provider(proc: asyncio.subprocess.Process) -> tuple[int, bool]:
    """SIGTERM and wait for the drain; returns (exit code, whether it had to be killed)."""
    if proc.returncode is not None:
        return proc.returncode, False
    proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(proc.wait(), EXIT_BOUND_S), False
    except TimeoutError:
        proc.kill()
        return await proc.wait(), True


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
        return None
    except FileNotFoundError:
        pass
    if sys.platform != "darwin":
        return None
    out = subprocess.run(
        ["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True, timeout=5
    )
    return round(int(out.stdout.strip()) / 1024, 1) if out.stdout.strip() else None


async def sample_rss(soak: Soak, pid: int) -> float | None:
    value = await asyncio.to_thread(rss_mb, pid)
    if value is not None:
        soak.rss_samples.append((soak.at(), value))
    return value


#: The error the provider logs for a replayed sealed frame (the duplicate fault on v2).
REPLAY_ERROR = "does not decrypt"


def error_log_lines(path: Path) -> list[str]:
    lines = []
    with path.open(errors="replace") as f:
        for line in f:
            if '"level": "error"' in line or '"level": "critical"' in line:
                lines.append(line.strip()[:300])
    return lines


# --------------------------------------------------------------------------
# Stub observation


def ready_record(stub: CoordinatorStub, not_session: int | None) -> ProviderRecord | None:
    """The provider's record once it is registered, warmed and serving.

    ``busy`` counts as ready: it is ``ready`` with every slot taken, which the
    buyers cause within milliseconds of the warm-up passing.
    """
    record = stub.provider(PROVIDER_ID)
    if record is None or not record.connected or not record.warmed:
        return None
    if record.state not in ("ready", "busy"):
        return None
    if not_session is not None and record.session_id == not_session:
        return None
    return record


async def wait_ready(
    stub: CoordinatorStub, deadline: float, not_session: int | None = None
) -> float | None:
    """Monotonic time the provider was ready (on a session other than ``not_session``)."""
    timeout = max(0.01, deadline - time.monotonic())
    try:
        await stub.wait_for(lambda: ready_record(stub, not_session), timeout, "provider ready")
    except TimeoutError:
        return None
    return time.monotonic()


def current_session(stub: CoordinatorStub) -> int | None:
    record = stub.provider(PROVIDER_ID)
    return record.session_id if record is not None and record.connected else None


def registration_times(stub: CoordinatorStub) -> list[tuple[int, float]]:
    """(session, time) of each registration: its ``hello`` or first ``auth_request``."""
    first: dict[int, float] = {}
    for kind in ("hello", "auth_request"):
        for frame in stub.frames_received(PROVIDER_ID, kind):
            first.setdefault(frame.session_id, frame.time)
    return sorted(first.items(), key=lambda item: item[1])


def harvest(soak: Soak, stub: CoordinatorStub) -> None:
    """Copy what a stopped stub saw; its frame log goes away with it."""
    heartbeats: dict[int, list[float]] = defaultdict(list)
    sizes = []
    for frame in stub.frames_received(PROVIDER_ID, "heartbeat"):
        heartbeats[frame.session_id].append(frame.time)
        sizes.append(len(frame.raw))
    frames_in = len(stub.frames_received(PROVIDER_ID))
    soak.generations.append(
        Generation(
            index=len(soak.generations),
            heartbeats=dict(heartbeats),
            heartbeat_bytes=sizes,
            hellos=registration_times(stub),
            drops=[d for d in stub.drops if d.provider_id == PROVIDER_ID],
            rejections=stub.rejections,
            counters=stub.pool.counters(),
            frames_in=frames_in,
            log_full=frames_in >= soak.config.frame_log_size,
        )
    )


# --------------------------------------------------------------------------
# Buyers


def random_body(rng: random.Random, model_id: str, stream: bool) -> dict[str, Any]:
    prompt = " ".join(rng.choices(WORDS, k=rng.randint(3, 40)))
    body: dict[str, Any] = {
        "model": model_id,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": rng.randint(4, 64),
        "stream": stream,
        "temperature": rng.choice((0.0, 0.7, 1.0)),
    }
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    return body


async def error_code(resp: aiohttp.ClientResponse) -> str:
    try:
        error = (await resp.json(content_type=None))["error"]
        return str(error.get("code") or error.get("type") or "unknown")
    except (ValueError, KeyError, TypeError, AttributeError):
        return "unparsed"


async def read_completion(resp: aiohttp.ClientResponse) -> str:
    try:
        body = json.loads(await resp.read())
        tokens = body["usage"]["completion_tokens"]
        finish = body["choices"][0]["finish_reason"]
    except (ValueError, KeyError, TypeError, IndexError):
        return "lost_bad_completion_body"
    # Random weights may sample EOS first: 0 tokens, finish_reason "stop" is
    # a complete answer.
    complete = isinstance(tokens, int) and finish in ("stop", "length")
    return "ok_non_stream" if complete else "lost_bad_completion_body"


async def read_stream(resp: aiohttp.ClientResponse, cancel_after: int | None) -> str:
    done = False
    error: str | None = None
    events = 0
    async for raw in resp.content:
        line = raw.decode(errors="replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            continue
        try:
            event = json.loads(data)
        except ValueError:
            return "lost_bad_sse_event"
        if isinstance(event, dict) and "error" in event:
            error = str((event["error"] or {}).get("code") or "unknown")
            continue
        events += 1
        if cancel_after is not None and events >= cancel_after and not done:
            # Walking away mid-stream: the stub must send cancel_request
            # (buyer_disconnected) and the provider must free the slot.
            resp.close()
            return "cancelled_by_buyer"
    if error is not None:
        return f"stream_error_{error}"
    if done:
        return "ok_stream" if cancel_after is None else "ok_stream_finished_before_cancel"
    return "lost_stream_without_done"


async def exchange(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], cancel_after: int | None
) -> str:
    try:
        resp = await http.post(url, json=body)
    except aiohttp.ClientConnectorError:
        return "unreachable_refused"
    except (aiohttp.ClientError, OSError) as exc:
        # No status line: the request never got to a live handler (a
        # coordinator restart closing pooled connections).
        return f"unreachable_{type(exc).__name__}"
    async with resp:
        try:
            if resp.status != 200:
                return f"http_{resp.status}_{await error_code(resp)}"
            if not body["stream"]:
                return await read_completion(resp)
            return await read_stream(resp, cancel_after)
        except (aiohttp.ClientError, OSError) as exc:
            return f"lost_cut_after_200_{type(exc).__name__}"


async def one_request(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], cancel_after: int | None
) -> str:
    try:
        async with asyncio.timeout(REQUEST_BOUND_S):
            return await exchange(http, url, body, cancel_after)
    except TimeoutError:
        return "lost_no_answer_in_bound"


async def buyer(soak: Soak, http: aiohttp.ClientSession, index: int) -> None:
    rng = random.Random(f"{soak.args.seed}-buyer-{index}")
    url = f"{soak.http_url}/v1/chat/completions"
    for _ in range(MAX_REQUESTS_PER_BUYER):
        if time.monotonic() >= soak.end:
            return
        kind = rng.choices(REQUEST_KINDS, REQUEST_WEIGHTS)[0]
        body = random_body(rng, soak.model_id, stream=kind != "non_stream")
        cancel_after = rng.randint(1, 3) if kind == "cancelled" else None
        sent = time.monotonic()
        outcome = await one_request(http, url, body, cancel_after)
        soak.outcomes[outcome] += 1
        soak.answer_s[outcome_group(outcome)].append(time.monotonic() - sent)
        if outcome.startswith("lost"):
            soak.lost.append(
                {"at_s": soak.at(sent), "kind": kind, "outcome": outcome,
                 "waited_s": round(time.monotonic() - sent, 2)}
            )  # fmt: skip
            say(f"LOST request: {soak.lost[-1]}")
        if outcome.startswith("unreachable"):
            soak.unreachable_at.append(sent)
        # Errors come back at once; pausing keeps a provider-less stub from
        # turning the buyers into a hot loop.
        failed = not outcome.startswith(("ok", "cancelled"))
        await asyncio.sleep(rng.uniform(0.2, 0.3) if failed else rng.uniform(0.0, 0.05))


# --------------------------------------------------------------------------
# Faults


def fault_result(
    soak: Soak,
    kind: str,
    injected: float,
    ready: float | None,
    *,
    held_s: float = 0.0,
    before: tuple[int, int | None],
    since: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """``recovered_after_s`` counts from ``since`` (default: the injection)."""
    after = (len(soak.generations), current_session(soak.stub))
    base = injected if since is None else since
    return {
        "kind": kind,
        "injected_at_s": soak.at(injected),
        "held_s": round(held_s, 2),
        "recovered_after_s": None if ready is None else round(ready - base, 2),
        "reconnected": after != before,
        **extra,
    }


async def fault_drop(soak: Soak, kind: str) -> dict[str, Any]:
    stub = soak.stub
    session = current_session(stub)
    before = (len(soak.generations), session)
    injected = time.monotonic()
    dropped = stub.drop(PROVIDER_ID)
    # Same loop turn as the drop: in place before the provider can reconnect.
    if kind == "drop_then_refuse_connections_5s":
        stub.refuse_connections(5)
    elif kind == "drop_then_accept_then_close_3":
        stub.accept_then_close(3)
    ready = await wait_ready(stub, injected + RECOVERY_BOUND_S, not_session=session)
    stub.reset_faults()
    return fault_result(soak, kind, injected, ready, before=before, dropped=dropped)


async def fault_stall(soak: Soak, kind: str) -> dict[str, Any]:
    """The coordinator stops reading and writing for up to STALL_HOLD_S.

    A provider that is streaming fills the socket buffers, its bounded send
    trips and it reconnects (``detected_by_provider``). An idle one cannot
    tell a hung coordinator from a quiet one: the coordinator sends nothing
    unsolicited and WebSocket pings are off (the real coordinator drops
    sessions that ping), and the coordinator's kernel still acknowledges the
    heartbeats. For it, recovery is serving again as soon as the coordinator
    resumes, with nothing lost; recovered_after_s then counts from the lift.
    """
    stub = soak.stub
    session = current_session(stub)
    before = (len(soak.generations), session)
    injected = time.monotonic()
    stub.stall_reads(PROVIDER_ID)
    ready = await wait_ready(stub, injected + STALL_HOLD_S, not_session=session)
    lifted = time.monotonic()
    stub.reset_faults()
    soak.stall_windows.append((injected, lifted))
    extra: dict[str, Any] = {"detected_by_provider": ready is not None}
    if ready is None:
        back = await wait_ready(stub, lifted + RECOVERY_BOUND_S)
        extra["ready_after_lift_s"] = None if back is None else round(back - lifted, 2)
        if back is not None:
            extra["recovered_counted_from"] = "lift"
            return fault_result(
                soak, kind, injected, back, held_s=lifted - injected, before=before,
                since=lifted, **extra,
            )  # fmt: skip
    return fault_result(
        soak, kind, injected, ready, held_s=lifted - injected, before=before, **extra
    )


async def fault_window(soak: Soak, kind: str) -> dict[str, Any]:
    stub = soak.stub
    before = (len(soak.generations), current_session(stub))
    drops_before = len(stub.drops)
    injected = time.monotonic()
    if kind == "delay_frames_0.2s":
        stub.delay_frames(0.2)
    else:
        stub.duplicate_frames(True)
    await asyncio.sleep(WINDOW_S)
    stub.reset_faults()
    ready = await wait_ready(stub, injected + RECOVERY_BOUND_S)
    return fault_result(
        soak, kind, injected, ready, held_s=WINDOW_S, before=before,
        drops_during=len(stub.drops) - drops_before,
    )  # fmt: skip


async def start_stub(config: StubConfig) -> CoordinatorStub:
    """Start a stub, retrying briefly: the old one's ports may still be settling."""
    for attempt in range(20):
        stub = CoordinatorStub(config)
        try:
            await stub.start()
            return stub
        except OSError as exc:
            say(f"stub start failed ({exc}); retry {attempt + 1}")
            await asyncio.sleep(0.5)
    raise RuntimeError("could not restart the coordinator stub on the same ports")


async def fault_restart(soak: Soak, kind: str) -> dict[str, Any]:
    old = soak.stub
    before = (len(soak.generations), current_session(old))
    injected = time.monotonic()
    await old.stop()
    harvest(soak, old)
    await asyncio.sleep(RESTART_DOWN_S)
    config = soak.config.replace(ws_port=old.ws_port, http_port=old.http_port)
    soak.stub = await start_stub(config)
    restarted = time.monotonic()
    soak.restart_windows.append((injected, restarted))
    ready = await wait_ready(soak.stub, injected + RECOVERY_BOUND_S)
    return fault_result(soak, kind, injected, ready, held_s=restarted - injected, before=before)


FAULTS: dict[str, Callable[[Soak, str], Awaitable[dict[str, Any]]]] = {
    "drop": fault_drop,
    "stall_reads": fault_stall,
    "drop_then_refuse_connections_5s": fault_drop,
    "drop_then_accept_then_close_3": fault_drop,
    "delay_frames_0.2s": fault_window,
    "duplicate_frames": fault_window,
    "coordinator_restart": fault_restart,
}


async def wait_stable(soak: Soak) -> float | None:
    """Wait until the provider is ready on a session older than its stable_after_s.

    The provider resets its reconnect backoff only after a session stayed up
    that long; a fault on a younger session would be charged the previous
    fault's backoff too (by design), so faults are kept independent.
    """
    deadline = time.monotonic() + RECOVERY_BOUND_S
    for _ in range(3):
        if await wait_ready(soak.stub, deadline) is None:
            return None
        record = soak.stub.provider(PROVIDER_ID)
        young = 0.0 if record is None else record.registered_at + PROVIDER_STABLE_S
        if young <= time.monotonic():
            return time.monotonic()
        await asyncio.sleep(young - time.monotonic())
    return await wait_ready(soak.stub, deadline)


async def fault_loop(soak: Soak) -> None:
    every = soak.args.fault_every
    slot = 1
    for index in itertools.count():
        due = soak.t0 + slot * every
        if due > soak.end - FAULT_TAIL_S:
            return
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        kind = FAULT_KINDS[index % len(FAULT_KINDS)]
        # A fault is only meaningful on a serving provider; one that never
        # came back from the previous fault is reported, not faulted again.
        if await wait_stable(soak) is None:
            result = {"kind": kind, "injected_at_s": None, "skipped": "provider not ready"}
        else:
            say(f"fault {index + 1}: {kind} at t={soak.at():.0f}s")
            result = await FAULTS[kind](soak, kind)
        soak.faults.append(result)
        say(f"fault {index + 1} result: {json.dumps(result)}")
        # A fault that outlasted its slot moves the next one to the next free slot.
        slot = max(slot + 1, math.ceil((time.monotonic() - soak.t0) / every))


async def progress_loop(soak: Soak, pid: int) -> None:
    next_rss = next_line = time.monotonic()
    while time.monotonic() < soak.end:
        now = time.monotonic()
        if now >= next_rss:
            await sample_rss(soak, pid)
            next_rss = now + RSS_EVERY_S
        if now >= next_line:
            total = sum(soak.outcomes.values())
            top = ", ".join(f"{k}={v}" for k, v in soak.outcomes.most_common(6))
            rss = soak.rss_samples[-1][1] if soak.rss_samples else None
            state = soak.stub.state(PROVIDER_ID)
            say(f"t={soak.at():.0f}s requests={total} ({top}) provider={state} rss={rss}MB")
            next_line = now + PROGRESS_EVERY_S
        await asyncio.sleep(min(1.0, max(0.0, soak.end - time.monotonic())))


# --------------------------------------------------------------------------
# Report


def heartbeat_report(soak: Soak) -> dict[str, Any]:
    """Gaps between heartbeats within each session, stalls set aside."""
    gaps: list[tuple[float, float, str]] = []
    excluded: list[float] = []
    for gen in soak.generations:
        hello_at = dict(gen.hellos)
        dropped_at = {d.session_id: d.time for d in gen.drops}
        sessions = set(gen.heartbeats) | set(hello_at)
        for session in sessions:
            points = sorted(gen.heartbeats.get(session, []))
            if session in hello_at:
                points.insert(0, hello_at[session])
            if session in dropped_at:
                points.append(dropped_at[session])
            for a, b in itertools.pairwise(points):
                if any(a < end + 1.0 and b > start for start, end in soak.stall_windows):
                    excluded.append(round(b - a, 2))
                else:
                    gaps.append((b - a, a, f"{gen.index}/{session}"))
    gaps.sort(reverse=True)
    sizes = [n for gen in soak.generations for n in gen.heartbeat_bytes]
    return {
        "heartbeat_max_gap_s": round(gaps[0][0], 3) if gaps else None,
        "heartbeat_gaps": {
            "count": len(gaps),
            "heartbeats": len(sizes),
            "median_frame_bytes": statistics.median(sizes) if sizes else None,
            "over_target": sum(1 for g in gaps if g[0] >= HEARTBEAT_GAP_TARGET_S),
            "largest": [
                {"gap_s": round(g, 3), "at_s": soak.at(a), "stub_generation/session": s}
                for g, a, s in gaps[:5]
            ],
            "excluded_stall_gaps_s": sorted(excluded, reverse=True)[:10],
        },
    }


def reconnect_times(soak: Soak) -> list[float]:
    """Each drop to the next hello, unless the provider had already moved on."""
    hellos = sorted(t for gen in soak.generations for _, t in gen.hellos)
    times = []
    for gen in soak.generations:
        session_hello = dict(gen.hellos)
        for drop in gen.drops:
            started = session_hello.get(drop.session_id, -math.inf)
            if any(started < t <= drop.time for t in hellos):
                continue  # superseded: the new session was up before this one was dropped
            later = [t for t in hellos if t > drop.time]
            if later:
                times.append(round(later[0] - drop.time, 3))
    return times


def summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "min": min(values),
        "median": round(statistics.median(values), 3),
        "max": max(values),
        "all": values,
    }


def merged_counters(soak: Soak) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for gen in soak.generations:
        for key, value in gen.counters.items():
            if isinstance(value, dict):
                bucket = total.setdefault(key, Counter())
                bucket.update(value)
            else:
                total[key] = total.get(key, 0) + value
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in total.items()}


def outcome_group(outcome: str) -> str:
    if outcome.startswith("ok"):
        return "completed_200"
    if outcome == "cancelled_by_buyer":
        return "cancelled_by_buyer"
    if outcome.startswith(("http_", "stream_error_")):
        return "error_answer"
    if outcome.startswith("unreachable"):
        return "coordinator_unreachable"
    return "lost"


def outcome_groups(outcomes: Counter[str]) -> dict[str, int]:
    groups: Counter[str] = Counter()
    for outcome, n in outcomes.items():
        groups[outcome_group(outcome)] += n
    return dict(groups)


def answer_times(soak: Soak) -> dict[str, dict[str, float]]:
    """Send to terminal answer, per outcome group: median, p99, max seconds."""
    out = {}
    for group, values in sorted(soak.answer_s.items()):
        ordered = sorted(values)
        out[group] = {
            "median": round(statistics.median(ordered), 3),
            "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
            "max": round(ordered[-1], 3),
        }
    return out


def build_report(
    soak: Soak,
    *,
    rss_start: float | None,
    rss_end: float | None,
    exit_code: int | None,
    killed: bool,
    errors: list[str],
    workdir: Path,
    traffic_s: float,
    wall_s: float,
) -> dict[str, Any]:
    heartbeat = heartbeat_report(soak)
    reconnects = reconnect_times(soak)
    growth = round((rss_end - rss_start) / rss_start * 100, 2) if rss_start and rss_end else None
    drops = Counter(d.cause for gen in soak.generations for d in gen.drops)
    rejections = Counter(str(r.code) for gen in soak.generations for r in gen.rejections)
    injected = [f for f in soak.faults if "skipped" not in f]
    unrecovered = [f for f in soak.faults if f.get("recovered_after_s") is None]
    restart_margin = 2.0
    unreachable_outside_restart = sum(
        1
        for t in soak.unreachable_at
        if not any(a - restart_margin <= t <= b + restart_margin for a, b in soak.restart_windows)
    )
    gap = heartbeat["heartbeat_max_gap_s"]
    # On the encrypted leg the duplicate fault is a replay: refusing it is
    # the provider doing its job, logged as an error on purpose.
    replays = [e for e in errors if soak.args.protocol == "v2" and REPLAY_ERROR in e]
    errors = [e for e in errors if e not in replays]
    checks = {
        "lost_requests_zero": not soak.lost,
        "heartbeat_max_gap_under_6s": gap is not None and gap < HEARTBEAT_GAP_TARGET_S,
        "every_fault_recovered": bool(injected) and not unrecovered,
        "rss_growth_under_10pct": growth is not None and growth < RSS_GROWTH_TARGET_PCT,
        "provider_exit_0": exit_code == 0 and not killed,
        "no_provider_error_logs": not errors,
        "frame_logs_complete": not any(g.log_full for g in soak.generations),
    }
    config = soak.config
    args = soak.args
    return {
        "duration_s": round(traffic_s, 1),
        "wall_s": round(wall_s, 1),
        "requests": {
            "total": sum(soak.outcomes.values()),
            "by_group": outcome_groups(soak.outcomes),
            "by_outcome": dict(soak.outcomes.most_common()),
            "unreachable_outside_restart": unreachable_outside_restart,
            "answer_time_s": answer_times(soak),
        },
        "lost_requests": len(soak.lost),
        "lost_examples": soak.lost[:20],
        **heartbeat,
        "drops_by_cause": dict(drops.most_common()),
        "rejections_by_code": dict(rejections.most_common()),
        "faults": soak.faults,
        "unrecovered_faults": len(unrecovered),
        "reconnect_times_s": summary(reconnects),
        "rss_start_mb": rss_start,
        "rss_end_mb": rss_end,
        "rss_growth_pct": growth,
        "rss_max_mb": max((v for _, v in soak.rss_samples), default=None),
        "rss_samples_mb": [
            [t, v] for t, v in soak.rss_samples[:: max(1, len(soak.rss_samples) // 20)]
        ],
        "provider_exit_code": exit_code,
        "provider_killed_after_sigterm": killed,
        "provider_error_log_lines": errors[:10],
        "provider_replays_refused": len(replays),
        "stub_counters": merged_counters(soak),
        "stub_generations": len(soak.generations),
        "checks": checks,
        "ok": all(checks.values()),
        "settings": {
            "minutes": args.minutes,
            "protocol": args.protocol,
            "buyers": args.buyers,
            "max_concurrency": args.max_concurrency,
            "model": args.model or "tiny test model (built)",
            "fault_every_s": args.fault_every,
            "seed": args.seed,
            "request_mix_pct": dict(zip(REQUEST_KINDS, REQUEST_WEIGHTS, strict=True)),
            "max_tokens_range": [4, 64],
            "request_bound_s": REQUEST_BOUND_S,
            "recovery_bound_s": RECOVERY_BOUND_S,
            "fault_window_s": WINDOW_S,
            "restart_down_s": RESTART_DOWN_S,
            "stub_hostile_timers": {
                "write_deadline_s": config.write_deadline_s,
                "inactivity_s": config.inactivity_s,
                "probe_timeout_s": config.probe_timeout_s,
                "grace_s": config.grace_s,
                "heartbeat_interval_s": config.heartbeat_interval_s,
                "warmup_gate": config.warmup_gate,
                "warmup_timeout_s": config.warmup_timeout_s,
                "warmup_retry_s": config.warmup_retry_s,
                "keepalive_s": config.keepalive_s,
                "request_timeout_s": config.request_timeout_s,
                "cancel_grace_s": config.cancel_grace_s,
            },
            "stub_overrides": {
                "frame_log_size": config.frame_log_size,
                "note": "no hostile timer shrunk and socket buffers at OS defaults; "
                "only frame_log_size raised so no heartbeat is evicted",
            },
            "provider": "python -m provider serve (real MLX engine), default timers",
            "platform": sys.platform,
        },
        "workdir": str(workdir),
    }


# --------------------------------------------------------------------------
# Run


def model_dir(args: argparse.Namespace, workdir: Path) -> str:
    if args.model:
        return str(Path(args.model).expanduser())
    from provider.testing.model import build_test_model

    say("building the tiny test model (random weights, local)")
    return str(build_test_model(workdir / "tiny-model", size="tiny"))


async def traffic(soak: Soak, pid: int) -> tuple[float | None, float]:
    """Buyers, faults and sampling; returns the RSS after warm-up and the traffic time."""
    warmup_s = min(30.0, soak.args.fault_every / 2, soak.args.minutes * 60 / 4)
    timeout = aiohttp.ClientTimeout(total=REQUEST_BOUND_S + 30, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        buyers = [asyncio.create_task(buyer(soak, http, i)) for i in range(soak.args.buyers)]
        progress = asyncio.create_task(progress_loop(soak, pid))
        await asyncio.sleep(warmup_s)
        rss_start = await sample_rss(soak, pid)
        say(f"warm-up done after {warmup_s:.0f}s: rss_start={rss_start}MB")
        faults = asyncio.create_task(fault_loop(soak))
        await asyncio.gather(*buyers)
        traffic_s = time.monotonic() - soak.t0
        # Each fault is bounded by its own recovery wait.
        await faults
        await progress
    return rss_start, traffic_s


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="mlx-provider-soak-"))
    handler = logging.FileHandler(workdir / "stub.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    say(f"workdir {workdir}")
    model = model_dir(args, workdir)
    frame_log = max(100_000, int(args.minutes * 60 * FRAMES_PER_SECOND_KEPT))
    config = StubConfig(frame_log_size=frame_log)
    soak = Soak(args=args, config=config, stub=await start_stub(config))
    soak.http_url = soak.stub.http_url
    proc = await start_provider(
        soak.stub.ws_url, model, args.max_concurrency, workdir, args.protocol
    )
    say(f"stub ws={soak.stub.ws_url} http={soak.http_url}; provider pid={proc.pid}")
    rss_start = rss_end = None
    exit_code: int | None = None
    killed = False
    traffic_s = 0.0
    try:
        if await wait_ready(soak.stub, time.monotonic() + STARTUP_BOUND_S) is None:
            raise RuntimeError(f"provider not ready within {STARTUP_BOUND_S:g}s; see {workdir}")
        record = soak.stub.provider(PROVIDER_ID)
        assert record is not None
        soak.model_id = record.model_id
        soak.t0 = time.monotonic()
        soak.end = soak.t0 + args.minutes * 60
        say(f"provider ready (model {soak.model_id}); traffic for {args.minutes:g} min")
        rss_start, traffic_s = await traffic(soak, proc.pid)
        rss_end = await sample_rss(soak, proc.pid)
    finally:
        say("SIGTERM to the provider (drain)")
        exit_code, killed = await stop_provider(proc)
        say(f"provider exited {exit_code}{' (killed)' if killed else ''}")
        await soak.stub.stop()
        harvest(soak, soak.stub)
    return build_report(
        soak,
        rss_start=rss_start,
        rss_end=rss_end,
        exit_code=exit_code,
        killed=killed,
        errors=error_log_lines(workdir / "provider.log"),
        workdir=workdir,
        traffic_s=traffic_s,
        wall_s=time.monotonic() - started,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--minutes", type=float, required=True, help="minutes of buyer traffic")
    p.add_argument("--buyers", type=int, default=4)
    p.add_argument("--max-concurrency", type=int, default=2)
    p.add_argument("--model", help="model directory (default: build the tiny test model)")
    p.add_argument("--fault-every", type=float, default=60.0, metavar="S")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--protocol",
        choices=["v1", "v2"],
        default="v2",
        help="the provider's protocol (default v2: the encrypted leg)",
    )
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.buyers < 1 or args.fault_every <= 0:
        p.error("--minutes and --fault-every must be > 0, --buyers >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Whole-run bound: traffic, a last fault's recovery, startup and shutdown.
    bound = args.minutes * 60 + RECOVERY_BOUND_S * 2 + STARTUP_BOUND_S + EXIT_BOUND_S + 60
    with contextlib.suppress(KeyboardInterrupt):
        report = asyncio.run(asyncio.wait_for(run(args), bound))
        print(json.dumps(report, indent=2))
        return 0 if report["ok"] else 1
    return 130


if __name__ == "__main__":
    sys.exit(main())
