"""The idle dead path, for real: nftables drops one connection's packets in a
network namespace of its own (:mod:`tests.faults.dead_path`), and
``TCP_USER_TIMEOUT`` is what ends it.

Needs Linux, ``unshare``, ``ip`` and ``nft`` (``apt-get install nftables``;
``.ci/run`` installs it) and the right to create a network namespace (root,
or unprivileged user namespaces). Without them the test is skipped and says
which is missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def _missing() -> str | None:
    if sys.platform != "linux":
        return "network namespaces and nftables are Linux-only"
    for tool, package in (("unshare", "util-linux"), ("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install {package})"
    return None


@pytest.mark.slow
async def test_idle_dead_path_is_ended_by_tcp_user_timeout() -> None:
    if (missing := _missing()) is not None:
        pytest.skip(missing)
    namespace = ["unshare", "--net"]
    if os.geteuid() != 0:
        namespace = ["unshare", "--user", "--map-root-user", "--net"]
    proc = await asyncio.create_subprocess_exec(
        *namespace, sys.executable, "-m", "tests.faults.dead_path",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 240)
    if proc.returncode != 0 and err.startswith(b"unshare:"):
        pytest.skip(f"cannot create a network namespace: {err.decode().strip()}")
    assert proc.returncode == 0, err.decode()[-3000:]
    result = json.loads(out.decode().strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["cause"] == "tcp_timeout", result
    assert "(TCP_USER_TIMEOUT)" in result["detail"] and "15 s" in result["detail"]
    # The kernel's limit is 15 s from the first unacknowledged heartbeat,
    # which leaves within a tick (1 s) of the drop.
    assert 14.0 <= result["left_dead_connection_after_s"] <= 25.0, result
    assert result["ready_again_after_s"] <= 30.0, result
    # Heartbeats kept completing into the kernel's buffer all along, so the
    # watchdog (15 s without a completed send) had nothing to see.
    assert result["heartbeats_completed_while_dead"] >= 10, result
    assert result["reconnects"] == 1 and result["agent_running"], result
