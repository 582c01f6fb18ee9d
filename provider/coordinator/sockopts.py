"""Socket options that make a dead path show up within the watchdog's time.

Without them a half-open path can hide for minutes: the kernel's send
buffer autotunes up to several MB, so a slow token stream (a few KB/s) is
absorbed long before any send blocks, and TCP keeps retransmitting
unacknowledged data for ~15 minutes before it gives up.

- ``SO_SNDBUF`` capped (256 KiB: still far above any token stream's rate on
  a 100 ms path), so a peer that stops reading makes our sends block soon,
  which the bounded send then turns into a reconnect;
- ``TCP_USER_TIMEOUT`` (Linux) / ``TCP_RXT_CONNDROPTIME`` (macOS): data
  left unacknowledged this long drops the connection. Heartbeats guarantee
  there is data to acknowledge at least every tick.

Each option is best effort: a platform without it keeps its default.
"""

from __future__ import annotations

import contextlib
import socket
import sys

SEND_BUFFER_BYTES = 256 * 1024
_TCP_RXT_CONNDROPTIME = 0x80  # macOS <netinet/tcp.h>; not exported by Python


def harden(sock: socket.socket | None, *, unacked_timeout_s: float) -> list[str]:
    """Apply the options to a connected TCP socket; returns the ones applied."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return []
    applied = []
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        applied.append("SO_SNDBUF")
    user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)
    if user_timeout is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, user_timeout, int(unacked_timeout_s * 1000))
            applied.append("TCP_USER_TIMEOUT")
    elif sys.platform == "darwin":
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_RXT_CONNDROPTIME, int(unacked_timeout_s))
            applied.append("TCP_RXT_CONNDROPTIME")
    return applied
