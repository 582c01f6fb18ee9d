"""The one writer of a connection.

Every outbound frame of a connection goes through :class:`Sender`: callers
queue frames (:meth:`Sender.post` without waiting, :meth:`Sender.send` to
wait until the frame is written) and the writer task (:meth:`Sender.run`)
writes them one at a time, in order. No two tasks ever write to the socket.

Each write is bounded by ``timeout`` (5 s). A write that does not complete in
time means the peer stopped reading or the path is half-open: the writer
aborts the TCP connection and raises :class:`~provider.coordinator.reconnect.ConnectionLost`
(``send_timeout``), which ends the session and starts a reconnect.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec
from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed

from provider.coordinator.messages import encode_text
from provider.coordinator.reconnect import ConnectionLost


class Sender:
    def __init__(
        self,
        ws: Connection,
        *,
        timeout: float = 5.0,
        abort: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``abort(cause, detail)`` drops the connection; default: abort the transport."""
        self._ws = ws
        self._abort = abort or (lambda _cause, _detail: ws.transport.abort())
        self._timeout = timeout
        self._clock = clock
        self._queue: asyncio.Queue[tuple[str, asyncio.Future[None] | None]] = asyncio.Queue()
        self._failed: ConnectionLost | None = None
        #: Monotonic time of the last completed write (the watchdog reads it).
        self.last_ok = clock()
        self.frames_sent = 0

    def post(self, msg: msgspec.Struct) -> None:
        """Queue ``msg`` without waiting; dropped silently once the writer failed."""
        if self._failed is None:
            self._queue.put_nowait((encode_text(msg), None))

    async def send(self, msg: msgspec.Struct) -> None:
        """Queue ``msg`` and wait until it is written.

        Raises :class:`ConnectionLost` if the connection fails first.
        """
        await self.send_text(encode_text(msg))

    async def send_text(self, text: str) -> None:
        """:meth:`send` for a frame already encoded (whose exact bytes matter)."""
        if self._failed is not None:
            raise self._failed
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((text, fut))
        await fut

    async def run(self) -> None:
        """The writer task: runs until a write fails, then raises ConnectionLost."""
        try:
            while True:
                text, fut = await self._queue.get()
                try:
                    async with asyncio.timeout(self._timeout):
                        await self._ws.send(text)
                except TimeoutError:
                    detail = f"a send did not complete in {self._timeout:g} s"
                    self._abort("send_timeout", detail)
                    raise ConnectionLost("send_timeout", detail) from None
                except ConnectionClosed as exc:
                    raise ConnectionLost("closed", str(exc), close_code=_code(exc)) from None
                self.last_ok = self._clock()
                self.frames_sent += 1
                if fut is not None and not fut.done():
                    fut.set_result(None)
        except ConnectionLost as exc:
            self._fail(exc)
            raise
        except BaseException:
            self._fail(ConnectionLost("closed", "writer stopped"))
            raise

    def _fail(self, exc: ConnectionLost) -> None:
        self._failed = exc
        while not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if fut is not None and not fut.done():
                fut.set_exception(exc)


def _code(exc: ConnectionClosed) -> int | None:
    return exc.rcvd.code if exc.rcvd is not None else None
