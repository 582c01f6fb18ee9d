"""``python -m tests.faults.dead_path``: an idle provider whose path goes dead.

Run it inside a network namespace of its own (``unshare --net``, as root or
with ``--user --map-root-user``): it brings the namespace's loopback up,
starts the coordinator stub and a provider agent (scripted engine), waits
until the provider is registered and idle, then makes nftables drop every
packet of that one TCP connection, both ways, without closing it: a NAT that
forgot the connection, a dead Wi-Fi. New connections are untouched, so the
provider can find a healthy path again.

While idle the provider only sends heartbeats; they complete into the
kernel's send buffer, so neither the bounded send nor the watchdog can see
the dead path. What ends it is ``TCP_USER_TIMEOUT``: heartbeat data left
unacknowledged that long makes the kernel drop the connection.

Prints one JSON object: ``{"skip": reason}`` when the namespace, ``ip`` or
``nft`` cannot be used, else what happened (cause, detail, seconds from the
drop to the provider leaving the dead connection and to it being ready on a
new one, heartbeats that completed while the path was dead).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from typing import Any

from coordinator_stub.app import CoordinatorStub
from tests.session.conftest import PID, provider_config, running, stub_config
from tests.session.scripted_engine import ScriptedEngine

TABLE = "mlxp_dead_path"
BOUND_S = 60.0


def run(*argv: str) -> str | None:
    """Run a tool; ``None`` on success, else why it failed."""
    if shutil.which(argv[0]) is None:
        return f"{argv[0]} not found on PATH"
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        return f"`{' '.join(argv)}` failed: {(done.stderr or done.stdout).strip()}"
    return None


def blackhole(port: int) -> str | None:
    """Drop every packet to or from local TCP ``port`` (loopback: the output hook sees both)."""
    chain = "{ type filter hook output priority 0; policy accept; }"
    for argv in (
        ("nft", "add", "table", "inet", TABLE),
        ("nft", "add", "chain", "inet", TABLE, "out", chain),
        ("nft", "add", "rule", "inet", TABLE, "out", "tcp", "sport", str(port), "drop"),
        ("nft", "add", "rule", "inet", TABLE, "out", "tcp", "dport", str(port), "drop"),
    ):
        if (error := run(*argv)) is not None:
            return error
    return None


async def scenario() -> dict[str, Any]:
    if (error := run("ip", "link", "set", "lo", "up")) is not None:
        return {"skip": error}
    async with (
        CoordinatorStub(stub_config(heartbeat_interval_s=1)) as stub,
        running(provider_config(stub), ScriptedEngine()) as agent_run,
    ):
        await stub.wait_provider_state(PID, "ready", timeout=20)
        agent = agent_run.agent
        session = agent.session
        assert session is not None and session.ws is not None
        first = stub.session(PID)
        port = session.ws.transport.get_extra_info("sockname")[1]
        beats_before = agent.last_heartbeat_sent
        if (error := blackhole(port)) is not None:
            return {"skip": error}
        dead_at = time.monotonic()
        beats_while_dead = 0
        seen = beats_before
        # Poll our own agent: nothing outside this loop signals a heartbeat.
        while agent.session is session and time.monotonic() - dead_at < BOUND_S:
            if agent.last_heartbeat_sent != seen:
                seen = agent.last_heartbeat_sent
                beats_while_dead += 1
            await asyncio.sleep(0.05)
        left_after = time.monotonic() - dead_at
        await stub.wait_for(
            lambda: stub.session(PID) not in (None, first) and stub.state(PID) == "ready",
            timeout=BOUND_S,
            what="registered again on a new connection",
        )
        lost = agent.reconnects[-1] if agent.reconnects else {}
        return {
            "cause": lost.get("cause"),
            "detail": lost.get("detail"),
            "left_dead_connection_after_s": round(left_after, 2),
            "ready_again_after_s": round(time.monotonic() - dead_at, 2),
            "heartbeats_completed_while_dead": beats_while_dead,
            "reconnects": len(agent.reconnects),
            "agent_running": not agent_run.task.done(),
        }


def main() -> int:
    result = asyncio.run(asyncio.wait_for(scenario(), 3 * BOUND_S))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
