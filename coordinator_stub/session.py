"""One registered provider connection, as the coordinator holds it.

:class:`ProviderSession` owns:

* a writer task, the only place frames go out (so faults such as delay,
  duplication and stalls apply to every frame, in order, and every TEXT write
  arms the write deadline);
* an inactivity watchdog (only well-formed TEXT frames count as liveness);
* the warm-up task, while the provider is behind the warm-up gate;
* for a v2 session, the tier-2 key epoch (:class:`~coordinator_stub.tier2.Epoch`):
  frames are sealed when queued, so the c2p sequence follows the write order.

:class:`StubConnection` is the websockets connection with the real
coordinator's quirks (the write deadline that fails a late PONG, stalls).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from .config import StubConfig
from .faults import Faults
from .frames import Registration, close_reason
from .messages import Outgoing
from .observe import FrameLog, FrameRecord
from .tier2 import Epoch


class SessionClosed(Exception):
    """The provider session ended before a frame could be written."""


class ProbeFailed(Exception):
    """Writing a routed request did not finish within the probe timeout."""


class StubConnection(ServerConnection):
    """:class:`ServerConnection` with the real coordinator's quirks.

    * Write deadline: ``write_deadline`` (monotonic) is armed by the session
      on every TEXT write and never cleared. A PING received after it calls
      ``on_pong_failure`` (the session aborts the connection) instead of
      being processed: the real coordinator's automatic PONG fails there.
      websockets has already queued its own PONG by the time the frame is
      seen, so a client may still get that PONG just before the reset.
    * Stalls: while ``stalled``, reading from the transport stays paused even
      when websockets' own flow control would resume it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.write_deadline: float | None = None
        self.on_pong_failure: Callable[[], None] | None = None
        self.stalled = False
        self._doomed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assembler_resume = self.recv_messages.resume

        def resume() -> None:
            if not self.stalled:
                assembler_resume()

        self.recv_messages.resume = resume

    def process_event(self, event: Any) -> None:
        if self._doomed:
            return
        if (
            isinstance(event, Frame)
            and event.opcode is Opcode.PING
            and self.write_deadline is not None
            and self.on_pong_failure is not None
            and time.monotonic() > self.write_deadline
        ):
            self._doomed = True
            self.on_pong_failure()
            return
        super().process_event(event)

    def set_stalled(self, stalled: bool) -> None:
        """Pause (or resume) reading from the socket."""
        self.stalled = stalled
        if stalled:
            self.transport.pause_reading()
        elif not self.recv_messages.paused:
            self.transport.resume_reading()


@dataclass(eq=False)
class _Outgoing:
    message: Outgoing | None
    raw: str | bytes
    type: str
    not_before: float
    bound: float | None
    future: asyncio.Future[None]


def _retrieve(future: asyncio.Future[Any]) -> None:
    # Fire-and-forget sends must not log "exception was never retrieved".
    if not future.cancelled():
        future.exception()


class ProviderSession:
    """One registered provider connection."""

    def __init__(
        self,
        conn: StubConnection,
        session_id: int,
        hello: Registration,
        now: float,
        *,
        config: StubConfig,
        faults: Faults,
        log: FrameLog,
        assigned_id: str = "",
        epoch: Epoch | None = None,
    ) -> None:
        self.config = config
        self.faults = faults
        self.log = log
        self.conn = conn
        self.session_id = session_id
        self.hello = hello
        self.provider_id = hello.provider_id
        self.assigned_id = assigned_id
        #: The tier-2 key epoch of a v2 session (``None``: plaintext v1).
        self.epoch = epoch
        #: A rekey handshake in progress (the endpoint's, see ``Rekey``).
        self.rekey: Any = None
        #: No more requests over the WebSocket (an ``unknown_message_type`` nak).
        self.http_only = False
        #: ``drain_status`` phase ``starting`` seen: removed at once on disconnect.
        self.draining = False
        self.started = now
        self.last_liveness = now
        self.last_text_write: float | None = None
        self.drop_cause: str | None = None
        self.drop_detail = ""
        self.closed = False
        #: Set when the provider reports ``ready``: a failed warm-up (say,
        #: model still loading) is retried then instead of after the pause.
        self.reported_ready = asyncio.Event()
        self.unstalled = asyncio.Event()
        self.unstalled.set()
        self._outbox: asyncio.Queue[_Outgoing] = asyncio.Queue()
        self._current: _Outgoing | None = None
        self._tasks: list[asyncio.Task[None]] = []
        conn.on_pong_failure = self._pong_failed

    def __repr__(self) -> str:
        return f"<ProviderSession provider_id={self.provider_id} session_id={self.session_id}>"

    @property
    def stalled(self) -> bool:
        return self.conn.stalled

    def start(self) -> None:
        name = f"{self.provider_id}#{self.session_id}"
        self._tasks.append(asyncio.create_task(self._writer(), name=f"writer {name}"))
        self._tasks.append(asyncio.create_task(self._watchdog(), name=f"watchdog {name}"))

    def add_task(self, task: asyncio.Task[None]) -> None:
        self._tasks.append(task)

    # ------------------------------------------------------------------
    # Sending

    def send(self, message: Outgoing, *, bound: float | None = None) -> asyncio.Future[None]:
        """Queue ``message``; the future resolves once it is written.

        ``bound`` limits the write itself (not the configured delay or a
        stall): past it the session is dropped with cause ``probe_failed``.
        """
        return self._enqueue(message, message.wire, message.type, bound)

    def send_raw(self, data: str | bytes) -> asyncio.Future[None]:
        """Queue an arbitrary frame (TEXT for ``str``, BINARY for ``bytes``)."""
        if isinstance(data, bytes):
            return self._enqueue(None, data, "<binary>", None)
        try:
            decoded = json.loads(data)
        except (ValueError, RecursionError):
            decoded = None
        kind = decoded.get("type") if isinstance(decoded, dict) else None
        return self._enqueue(
            None, data, kind if isinstance(kind, str) and kind else "<invalid>", None
        )

    def _enqueue(
        self, message: Outgoing | None, raw: str | bytes, kind: str, bound: float | None
    ) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        if self.closed:
            future.set_exception(SessionClosed(f"session {self.session_id} is closed"))
            return future
        not_before = time.monotonic() + self.faults.delay_s
        self._outbox.put_nowait(_Outgoing(message, raw, kind, not_before, bound, future))
        return future

    async def _writer(self) -> None:
        try:
            while True:
                item = self._current = await self._outbox.get()
                delay = item.not_before - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self.unstalled.wait()
                copies = 2 if self.faults.duplicate else 1
                try:
                    for _ in range(copies):
                        await self._write(item)
                except TimeoutError:
                    detail = f"writing {item.type} took more than {item.bound}s"
                    item.future.set_exception(ProbeFailed(detail))
                    self.abort("probe_failed", detail)
                    return
                except (ConnectionClosed, OSError, RuntimeError) as exc:
                    # RuntimeError: asyncio refuses writes on a closing transport.
                    item.future.set_exception(SessionClosed(str(exc)))
                    return
                item.future.set_result(None)
                self._current = None
        finally:
            self._fail_pending()

    async def _write(self, item: _Outgoing) -> None:
        is_text = isinstance(item.raw, str)
        if is_text and self.config.write_deadline_s is not None:
            # Armed before the write, as the real coordinator sets its
            # deadline before writing; never cleared afterwards.
            self.conn.write_deadline = time.monotonic() + self.config.write_deadline_s
        if item.bound is not None:
            await asyncio.wait_for(self.conn.send(item.raw), item.bound)
        else:
            await self.conn.send(item.raw)
        now = time.monotonic()
        if is_text:
            self.last_text_write = now
        self.log.add(
            FrameRecord(
                now, self.provider_id, self.session_id, "out", item.type, item.message, item.raw
            )
        )

    def _fail_pending(self) -> None:
        error = SessionClosed(f"session {self.session_id} of {self.provider_id} closed")
        items = [self._current] if self._current is not None else []
        self._current = None
        while not self._outbox.empty():
            items.append(self._outbox.get_nowait())
        for item in items:
            if not item.future.done():
                item.future.set_exception(error)

    # ------------------------------------------------------------------
    # Timers and faults

    async def _watchdog(self) -> None:
        limit = self.config.inactivity_s
        if limit is None:
            return
        while True:
            if self.conn.stalled:
                await self.unstalled.wait()
                continue
            idle = time.monotonic() - self.last_liveness
            if idle >= limit:
                self.abort("inactivity", f"no well-formed text frame for {idle:.3f}s")
                return
            await asyncio.sleep(limit - idle)

    def _pong_failed(self) -> None:
        since = (
            "never"
            if self.last_text_write is None
            else (f"{time.monotonic() - self.last_text_write:.3f}s")
        )
        self.abort(
            "write_deadline_pong",
            f"client ping after write deadline (last text write {since} ago, "
            f"deadline {self.config.write_deadline_s}s)",
        )

    def abort(self, cause: str, detail: str = "") -> None:
        """Drop the TCP connection without a close handshake."""
        if self.drop_cause is None:
            self.drop_cause = cause
            self.drop_detail = detail
        self.closed = True
        self.conn.transport.abort()

    def close_transport(self, cause: str, detail: str = "") -> None:
        """Close the TCP connection without a close frame (Go's ``conn.Close()``).

        Unlike :meth:`abort` (a reset), frames already written still reach
        the provider, then it sees the connection end.
        """
        if self.drop_cause is None:
            self.drop_cause = cause
            self.drop_detail = detail
        self.closed = True
        self.conn.transport.close()

    def close(self, code: int, reason: str, cause: str) -> None:
        """Close with a close frame ``code``/``reason`` (the closing handshake runs in a task)."""
        if self.drop_cause is None:
            self.drop_cause = cause
            self.drop_detail = f"code={code} reason={reason!r}"
        self.closed = True
        task = asyncio.get_running_loop().create_task(self.conn.close(code, close_reason(reason)))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def stall(self, stalled: bool) -> None:
        """Stop (or resume) reading from and writing to this provider."""
        if stalled == self.conn.stalled:
            return
        self.conn.set_stalled(stalled)
        if stalled:
            self.unstalled.clear()
        else:
            # The stub was the one hung: do not blame the provider for the
            # silence it could not deliver.
            self.last_liveness = time.monotonic()
            self.unstalled.set()

    def cancel_tasks(self) -> None:
        self.closed = True
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
