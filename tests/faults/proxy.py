"""A loopback TCP proxy that can turn every open connection into a black hole.

``blackhole()`` stops forwarding in both directions on the connections open
now, without closing them: to both ends the TCP connection looks alive,
which is what a half-open path (a NAT that forgot us, a dead Wi-Fi) looks
like to the provider. New connections are forwarded normally: they are the
"healthy path" a provider must find again.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket


class BlackholeProxy:
    def __init__(self, target_host: str, target_port: int, *, rcvbuf: int = 4096) -> None:
        self.target = (target_host, target_port)
        self.rcvbuf = rcvbuf
        self.server: asyncio.Server | None = None
        self.connections: list[tuple[asyncio.Task[None], asyncio.Event]] = []
        self._transports: list[list[asyncio.BaseTransport]] = []
        self.accepted = 0

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task, _ in self.connections:
            task.cancel()
        await asyncio.gather(*(t for t, _ in self.connections), return_exceptions=True)

    def blackhole(self) -> int:
        """Stop forwarding on every open connection; returns how many."""
        for (_, holed), transports in zip(self.connections, self._transports, strict=True):
            holed.set()
            for transport in transports:
                # Stop reading at the socket, not just in our loop, so the
                # kernel buffers fill and stay full.
                transport.pause_reading()  # type: ignore[attr-defined]
        return len(self.connections)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        sock = writer.get_extra_info("socket")
        # Small buffers: once we stop reading, the sender's writes back up fast.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        holed = asyncio.Event()
        task = asyncio.current_task()
        assert task is not None
        transports: list[asyncio.BaseTransport] = [writer.transport]
        self.connections.append((task, holed))
        self._transports.append(transports)
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        transports.append(up_writer.transport)
        up_writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf
        )
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, holed), self._pipe(up_reader, writer, holed)
            )
        finally:
            if not holed.is_set():
                for w in (writer, up_writer):
                    w.close()
            else:
                # A black hole never closes: keep the sockets open until stop().
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.Event().wait()

    @staticmethod
    async def _pipe(
        src: asyncio.StreamReader, dst: asyncio.StreamWriter, holed: asyncio.Event
    ) -> None:
        while not holed.is_set():
            read = asyncio.ensure_future(src.read(65536))
            hole = asyncio.ensure_future(holed.wait())
            done, _ = await asyncio.wait({read, hole}, return_when=asyncio.FIRST_COMPLETED)
            if hole in done:
                read.cancel()
                return
            hole.cancel()
            data = read.result()
            if not data:
                dst.close()
                return
            dst.write(data)
            await dst.drain()
