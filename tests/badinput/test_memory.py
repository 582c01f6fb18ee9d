"""Memory stays bounded under a stream of bad frames.

A provider process (the real ``serve`` path with the scripted engine, see
``tests.session.scripted_provider``) takes the same batch of bad frames,
large ones included, several times over; its resident set after the last
round must be close to what it was after the first.

It speaks v1: the batch holds plaintext requests with bad bodies, which the
v2 encrypted leg refuses with a ``tier2_*`` nak that closes the session (by
design); what happens to a body after decryption is the same code on both.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from coordinator_stub.app import CoordinatorStub

from .strategies import frame_batch

ROOT = Path(__file__).parents[2]
PID = "prov-sub"
ROUNDS = 5
MiB = 1024 * 1024
#: Allowed growth from the first round to the last. Each round sends tens of
#: MiB (bodies over 2 MiB, request ids and types of hundreds of KiB), so
#: keeping even a fraction of what arrives would cross it.
BOUND = 40 * MiB


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid``, in bytes (Linux /proc, else ps)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True)
    return int(out.stdout.strip()) * 1024


async def test_rss_does_not_grow_with_thousands_of_bad_frames(stub: CoordinatorStub) -> None:
    batch = frame_batch(700, valid=False)
    sent_bytes = sum(len(c.render(0)[0]) for c in batch)
    assert sent_bytes > 5 * MiB and len(batch) * ROUNDS > 2500
    naks_per_round = sum(1 for c in batch if c.answer == "nak")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.session.scripted_provider",
        stub.ws_url,
        "2",
        "0",
        "--protocol",
        "v1",
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await stub.wait_provider_state(PID, "ready", timeout=30)
        samples: list[int] = []
        for r in range(ROUNDS):
            start = time.monotonic()
            for i, case in enumerate(batch):
                frame, _ = case.render(r * len(batch) + i)
                await stub.send_raw(PID, frame)
            # Frames are handled in order: this answer means the round is done.
            await stub.preflight(PID, 1, request_id=f"sentinel-{r}", timeout=60)
            naks = [f for f in stub.frames_received(PID, "nak") if f.time >= start]
            assert len(naks) == naks_per_round
            samples.append(rss_bytes(proc.pid))
        growth = samples[-1] - samples[0]
        detail = ", ".join(f"{s / MiB:.1f}" for s in samples)
        assert growth < BOUND, f"RSS per round (MiB): {detail}"
        assert stub.drops == []
        await stub.wait_provider_state(PID, "ready")
        proc.terminate()  # drains: exit 0 means it was healthy to the end
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
